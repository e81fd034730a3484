"""delta_m (Maninis et al. 2019) against a hand computation."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "mtl_bench", Path(__file__).parents[2] / "benchmarks" / "multitask_vs_single.py")
mtl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mtl)


def test_delta_m_by_hand():
    single = {"seg": 0.80, "cls": 0.90, "gan": 2.0}
    multi = {"seg": 0.88, "cls": 0.90, "gan": 1.5}
    # seg: +0.08/0.80 = +10%; cls: 0%; gan (lower is better): -(1.5-2)/2 = +25%  -> mean 11.67%
    assert abs(mtl.delta_m(multi, single) - 35.0 / 3) < 1e-9


def test_primary_picks_one_metric_per_task():
    m = {"seg.miou": 0.5, "seg.pixel_acc": 0.9, "cls.accuracy": 0.7, "vae.psnr": 20.0}
    assert mtl.primary(m, ["seg", "cls", "vae", "gan"]) == {"seg": 0.5, "cls": 0.7, "vae": 20.0}

"""The balancer benchmarks run end to end on a tiny config and print what they promise."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "benchmarks"
TINY = ["data.dataset.params.size=16", "data.dataset.params.num_samples=32",
        "data.batch_size=16", "model.backbone.params.width=8", "tasks.vae.head.params.width=8",
        "tasks.gan.head.params.width=8", "tasks.gan.head.params.d_width=8",
        "train.gen_metric_samples=32", 'kernels="reference"']


def _load(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import each other, as when run
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(*extra: str, overrides=(*TINY, "optim.epochs=1")) -> list[str]:
    out = list(extra)
    for o in overrides:
        out += ["--set", o]
    return out


def test_balancer_sweep_trains_each_balancer_and_reuses_runs(tmp_path, monkeypatch, capsys):
    sweep = _load("balancer_sweep", monkeypatch)
    out = tmp_path / "sweep"
    assert sweep.main(_args("--balancers", "equal,dwa", "--out", str(out))) == 0
    table = capsys.readouterr().out
    rows = [r for r in table.splitlines() if r.startswith("| equal") or r.startswith("| dwa")]
    assert len(rows) == 2 and "+0.00%" in rows[0]  # the baseline against itself
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["balancers"]) == {"equal", "dwa"} and summary["baseline"] == "equal"
    seg = summary["balancers"]["dwa"]["metrics"]["seg"]
    metrics = json.loads((out / "dwa" / "metrics.json").read_text())["metrics"]
    assert seg == metrics["seg.miou"]
    (out / "equal" / "checkpoints" / "last.pt").unlink()  # --reuse reads metrics.json only
    assert sweep.main(_args("--balancers", "equal,dwa", "--out", str(out), "--reuse")) == 0
    assert "dwa" in capsys.readouterr().out and not (out / "equal" / "checkpoints" / "last.pt").exists()
    # a run trained with other settings is not reused silently
    with pytest.raises(SystemExit):
        sweep.main(_args("--balancers", "equal", "--out", str(out), "--reuse",
                         overrides=(*TINY, "optim.epochs=2")))
    assert "was trained with another config than this sweep's" in capsys.readouterr().err


def test_balancer_step_times_each_balancer(monkeypatch, capsys):
    step = _load("balancer_step", monkeypatch)
    assert step.main(_args("--balancers", "equal,cagrad", "--repeats", "2", "--warmup", "0",
                           overrides=TINY)) == 0
    out = capsys.readouterr().out
    rows = {r.split("|")[1].strip(): r for r in out.splitlines() if r.startswith("| ") and "ms" in r}
    assert set(rows) == {"equal", "cagrad"} and rows["equal"].rstrip().endswith("1.00x |")

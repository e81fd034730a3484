"""How generation metrics and samples are reported: the trainer's cheap per-epoch call, curves with
the untrained point and the real-vs-real baselines, and sample grids with one row per label."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import mtcore
from mtcore import api, artifacts
from mtcore.artifacts import curve_panels
from mtcore.cli.main import main
from mtcore.trainer import Trainer

TINY = [
    "data.dataset.params.size=16", "data.dataset.params.num_samples=32", "data.batch_size=16",
    "data.eval_batch_size=32", "model.backbone.params.width=8", "tasks.vae.head.params.width=8",
    # the noise-to-image GAN, class-conditional
    'tasks.gan={head={name="gan", params={width=8, d_width=8, conditional=true}}, '
    'loss={name="adversarial"}}', "train.progress=false",
    "kernels=\"reference\"", 'train.gen_metrics="none"', "train.samples_every=0",
    "train.max_steps_per_epoch=1", "train.num_samples=4", "train.gen_metric_samples=16",
]
KINDS = ["circle", "square", "triangle"]


def test_the_per_epoch_call_passes_final_to_heads_that_take_it():
    calls = []

    class Takes:
        def generation_metrics(self, datasets, split, num_samples, seed, final=True):
            calls.append(("takes", split, num_samples, final))
            return {"fid": 1.0}

    class Older:  # written before `final` existed: called as before
        def generation_metrics(self, datasets, split, num_samples, seed):
            calls.append(("older", split, num_samples))
            return {"fid": 2.0}

    fake = SimpleNamespace(val_split="val", model=SimpleNamespace(eval=lambda: None),
                           heads={"a": Takes(), "b": Older()}, exp=SimpleNamespace(datasets={}),
                           cfg={"train": {"gen_metric_samples": 8}, "seed": 0},
                           _rng_devices=lambda: [])
    assert Trainer.generation_metrics(fake, final=False) == {"a.fid": 1.0, "b.fid": 2.0}
    assert Trainer.generation_metrics(fake, "test") == {"a.fid": 1.0, "b.fid": 2.0}
    assert calls == [("takes", "val", 8, False), ("older", "val", 8),
                     ("takes", "test", 8, True), ("older", "test", 8)]


def test_every_epoch_records_fid_and_the_untrained_and_last_add_c2st(tmp_path, monkeypatch):
    from mtcore_tasks import heads as task_heads

    if "final" not in task_heads.GANHead.generation_metrics.__code__.co_varnames:
        # the GAN head forwarding `final` to _generation_metrics, as the core API now allows
        def gan_metrics(self, datasets, split, num_samples, seed, final=True):
            return task_heads._generation_metrics(self, datasets, split, num_samples, seed,
                                                  self.conditional, final)

        monkeypatch.setattr(task_heads.GANHead, "generation_metrics", gan_metrics)
    out = tmp_path / "run"
    result = mtcore.fit(mtcore.build(None, [*TINY, 'train.gen_metrics="every"', "optim.epochs=2",
                                            "tasks.vae.enabled=false"]), out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = {r["epoch"]: r for r in rows if r["split"] != "train"}
    assert [evaluated[e]["split"] for e in (0, 1, 2)] == ["init", "val", "val"]
    full = {"gan.fid", "gan.precision", "gan.recall", "gan.class_consistency", "gan.c2st",
            "gan.fid_real", "gan.precision_real", "gan.recall_real",
            "gan.class_consistency_real", "gan.c2st_real"}
    cheap = {"gan.fid", "gan.precision", "gan.recall", "gan.class_consistency"}
    assert full <= set(evaluated[0]) and full <= set(evaluated[2])
    assert cheap <= set(evaluated[1]) and not (full - cheap) & set(evaluated[1])
    assert evaluated[0]["gan.fid_real"] == evaluated[2]["gan.fid_real"]  # computed once
    assert result["untrained"]["gan.c2st"] == evaluated[0]["gan.c2st"]
    assert result["metrics"]["gan.fid_real"] == evaluated[2]["gan.fid_real"]
    panels = dict(curve_panels(rows))
    fid = {label: (xs, ys) for label, xs, ys, _ in panels["gan.fid"]}
    assert fid["gan.fid"] == ([0, 1, 2], [evaluated[e]["gan.fid"] for e in (0, 1, 2)])
    assert fid["real vs real"] == ([0, 2], [evaluated[2]["gan.fid_real"]] * 2)
    assert "gan.fid_real" not in panels and "gan.c2st" in panels


def test_curves_show_the_untrained_point_and_real_baselines_as_levels():
    history = [
        {"epoch": 0, "split": "init", "gan.fid": 20.0, "gan.c2st": 1.0, "gan.c2st_real": 0.52},
        {"epoch": 1, "split": "train", "gan.loss": 1.0},
        {"epoch": 1, "split": "val", "gan.loss": 1.1, "gan.fid": 9.0},
        {"epoch": 2, "split": "train", "gan.loss": 0.9},
        {"epoch": 2, "split": "val", "gan.loss": 1.0, "gan.fid": 5.0, "gan.fid_real": 0.5,
         "gan.c2st": 0.8, "gan.c2st_real": 0.5},
    ]
    panels = dict(curve_panels(history))
    assert list(panels) == ["losses (solid: train, dashed: val)", "gan.c2st", "gan.fid"]
    assert panels["gan.fid"] == [("gan.fid", [0, 1, 2], [20.0, 9.0, 5.0], "o-"),
                                 ("real vs real", [0, 2], [0.5, 0.5], ":")]
    # the latest baseline is the level; the init row holds no validation loss
    assert panels["gan.c2st"][1] == ("real vs real", [0, 2], [0.5, 0.5], ":")
    losses = {label: xs for label, xs, _, _ in panels["losses (solid: train, dashed: val)"]}
    assert losses["val gan.loss"] == [1, 2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    mtcore.fit(mtcore.build(None, [*TINY, "optim.epochs=1"]), out)
    return out / "checkpoints" / "last.pt"


def test_the_sample_grid_has_a_row_per_label_of_a_conditional_head(tmp_path, monkeypatch):
    trainer = Trainer(mtcore.build(None, TINY), None, progress=False)
    gan = trainer.model.heads["gan"]
    assert gan.conditional
    asked = []
    sample = gan.sample

    def recording(n, labels=None, generator=None):
        asked.append(None if labels is None else sorted(set(labels.tolist())))
        return sample(n, labels=labels, generator=generator)

    monkeypatch.setattr(gan, "sample", recording)
    path = artifacts.write_samples(trainer, tmp_path / "s.png")
    assert asked == [[0], [1], [2]]
    rows = ["input", "seg mask", "vae reconstruction", "vae samples",
            *(f"gan: {k}" for k in KINDS)]
    with Image.open(path) as img:  # 4 columns and 7 rows of 32-pixel tiles
        assert img.size == (artifacts.LABEL_W + 4 * 34 + 2, len(rows) * 34 + 2)
    captured = {}
    monkeypatch.setattr(artifacts, "save_grid", lambda r, p, **kw: captured.update(r) or p)
    artifacts.write_samples(trainer, tmp_path / "s.png")
    assert [k.split(" ")[0] for k in captured] == [r.split(" ")[0] for r in rows]
    assert list(captured)[-3:] == [f"gan: {k}" for k in KINDS]


def test_mtcore_sample_titles_rows_with_class_names(checkpoint, tmp_path, capsys):
    rows = api.sample_rows(checkpoint, 7)
    assert list(rows) == KINDS and [len(v) for v in rows.values()] == [3, 3, 3]
    rows = api.sample_rows(checkpoint, 7, label=1)
    assert list(rows) == ["square #0", "square #3", "square #6"]
    assert [len(v) for v in rows.values()] == [3, 3, 1]
    # the same images as api.sample, in rows
    assert torch.equal(torch.cat(list(rows.values())), api.sample(checkpoint, 7, label=1))
    assert list(api.sample_rows(checkpoint, 4, task="vae")) == ["#0", "#2"]  # unconditional
    png = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(checkpoint), "-n", "6", "--out", str(png)]) == 0
    assert "(rows: circle, square, triangle)" in capsys.readouterr().out
    with Image.open(png) as img:
        assert img.size == (artifacts.LABEL_W + 2 * 34 + 2, 3 * 34 + 2)

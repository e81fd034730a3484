"""train.monitor / monitor_mode / patience: which validation metric picks best.pt, and early
stopping, against histories worked out by hand and scripted validation results."""

from __future__ import annotations

import json
import math
import warnings

import pytest

import mtcore
from mtcore import checkpoint as ckpt_io
from mtcore.errors import ConfigError
from mtcore.monitor import Monitor
from mtcore.trainer import Trainer

TINY = [
    "data.dataset.params.size=16", "data.dataset.params.num_samples=32", "data.batch_size=16",
    "data.eval_batch_size=32", "model.backbone.params.width=8", "tasks.vae.head.params.width=8",
    "tasks.gan.head.params.width=8", "tasks.gan.head.params.d_width=8", "train.progress=false",
    "kernels=\"reference\"", 'train.gen_metrics="none"', "train.samples_every=0",
    "train.max_steps_per_epoch=1",
]


def heads():
    return Trainer(mtcore.build(None, TINY), None, progress=False).heads


def test_the_default_monitor_is_the_first_tasks_primary_metric():
    h = heads()
    assert Monitor.from_config({}, h) == Monitor("seg.miou", True)
    assert Monitor.from_config({"monitor": "cls.accuracy"}, h) == Monitor("cls.accuracy", True)
    # auto: losses and FID go down; max/min say it for any metric
    assert Monitor.from_config({"monitor": "vae.loss"}, h) == Monitor("vae.loss", False)
    assert Monitor.from_config({"monitor": "gan.fid"}, h) == Monitor("gan.fid", False)
    assert Monitor.from_config({"monitor": "vae.psnr", "monitor_mode": "max"}, h).higher_is_better
    psnr = Monitor.from_config({"monitor": "vae.psnr"}, h)  # direction unknown: said on use
    with pytest.raises(ConfigError, match=r"train.monitor_mode: say \"max\" or \"min\" for "
                                          r"'vae.psnr'"):
        psnr.check({"vae.psnr": 20.0})
    with pytest.raises(ConfigError, match="monitor_mode"):
        psnr.score({"vae.psnr": 20.0})
    with pytest.raises(ConfigError, match=r"'depth.rmse' is not TASK.METRIC of this run's tasks "
                                          r"\(seg, cls, vae, gan\), e.g. 'seg.miou'"):
        Monitor.from_config({"monitor": "depth.rmse"}, h)
    with pytest.raises(ConfigError, match="is not TASK.METRIC"):
        Monitor.from_config({"monitor": "seg"}, h)


def test_best_and_the_evaluations_since_it_by_hand():
    history = [
        {"epoch": 0, "split": "init", "x.loss": 0.0},  # not a validation row
        {"epoch": 1, "split": "train", "x.loss": 9.0},
        {"epoch": 1, "split": "val", "x.loss": 3.0},
        {"epoch": 2, "split": "val", "x.loss": 2.0},  # best
        {"epoch": 3, "split": "val", "x.loss": 2.0},  # a tie is no improvement
        {"epoch": 4, "split": "val", "x.loss": 2.5},
    ]
    low = Monitor("x.loss", False)
    assert low.best(history, "val") == (-2.0, 2, 2)
    assert low.value(-2.0) == 2.0
    assert Monitor("x.loss", True).best(history, "val") == (3.0, 1, 3)
    assert Monitor("y.acc", True).best(history, "val") == (None, None, 0)  # never measured
    mean = Monitor(None, False)  # no metric: the mean of the validation losses, lower is better
    assert mean.score({"a.loss": 1.0, "b.loss": 3.0, "a.acc": 0.5}) == -2.0
    assert mean.value(-2.0) == 2.0 and mean.name == "mean validation loss"
    # a NaN (a class absent from the split) is never the best, so it cannot block improvement
    nan = [{"epoch": e, "split": "val", "seg.iou/3": v}
           for e, v in enumerate((math.nan, 0.1, 0.3, math.inf, 0.2), start=1)]
    assert Monitor("seg.iou/3", True).best(nan, "val") == (0.3, 3, 2)


def scripted(trainer, monkeypatch, values):
    """The trainer's evaluation returns cls.accuracy from ``values`` in turn (a one-batch probe
    sees the metric names without using one)."""
    real = trainer.evaluate
    it = iter(values)

    def evaluate(split=None, dataset=None, max_batches=None):
        out = real(split, dataset, max_batches=1)
        if max_batches is None:
            out["cls.accuracy"] = next(it)
        return out

    monkeypatch.setattr(trainer, "evaluate", evaluate)


def test_patience_stops_a_run_and_best_pt_holds_the_best_epoch(tmp_path, monkeypatch):
    sets = [*TINY, "optim.epochs=8", 'train.monitor="cls.accuracy"', "train.patience=2"]
    values = [0.5, 0.6, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0]
    lines: list[str] = []
    trainer = Trainer(mtcore.build(None, sets), tmp_path, progress=False, log=lines.append)
    scripted(trainer, monkeypatch, values)
    result = trainer.fit()
    # best 0.6 at epoch 2; epoch 3 (0.55) and epoch 4 (0.6, a tie) do not beat it: stop after 4
    assert trainer.epoch == 4 and result["epochs"] == 4 and result["stopped_early"]
    assert result["best"] == {"metric": "cls.accuracy", "value": 0.6, "epoch": 2,
                              "best_pt_epoch": 2}
    assert json.loads((tmp_path / "metrics.json").read_text())["best"]["epoch"] == 2
    assert any("early stopping: cls.accuracy has not improved in 2 evaluation(s) "
               "(train.patience=2); best 0.6 at epoch 2" in line for line in lines)
    assert ckpt_io.load(tmp_path / "checkpoints" / "best.pt")["epoch"] == 2
    assert ckpt_io.load(tmp_path / "checkpoints" / "last.pt")["epoch"] == 4

    # resuming with the same patience trains nothing more; with more, it goes on from epoch 4
    again = Trainer(mtcore.build(None, sets), tmp_path, progress=False, log=lines.append)
    scripted(again, monkeypatch, [])
    assert again.fit(resume=True)["stopped_early"] and again.epoch == 4
    assert "raise train.patience to go on" in lines[-1]
    more = Trainer(mtcore.build(None, [*sets, "train.patience=3"]), tmp_path, progress=False,
                   log=lines.append)
    scripted(more, monkeypatch, values[4:])
    result = more.fit(resume=True)
    assert more.epoch == 8 and not result["stopped_early"]
    assert result["best"] == {"metric": "cls.accuracy", "value": 1.0, "epoch": 8,
                              "best_pt_epoch": 8}
    assert ckpt_io.load(tmp_path / "checkpoints" / "best.pt")["epoch"] == 8


def test_a_loss_monitor_keeps_the_epoch_of_the_lowest_loss(tmp_path):
    sets = [*TINY, "optim.epochs=3", 'train.monitor="vae.loss"', "train.max_steps_per_epoch=2"]
    result = mtcore.fit(mtcore.build(None, sets), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = {r["epoch"]: r["vae.loss"] for r in rows if r["split"] == "val"}
    lowest = min(val, key=val.get)
    assert result["best"] == {"metric": "vae.loss", "value": val[lowest], "epoch": lowest,
                              "best_pt_epoch": lowest}
    assert ckpt_io.load(tmp_path / "checkpoints" / "best.pt")["epoch"] == lowest


def test_a_misspelt_monitor_fails_before_training(tmp_path):
    trainer = Trainer(mtcore.build(None, [*TINY, 'train.monitor="seg.mIoU"']), tmp_path,
                      progress=False)
    with pytest.raises(ConfigError, match=r"the validation metrics have no 'seg.mIoU'. Did you "
                                          r"mean 'seg.miou'.*\? They are .*seg\.pixel_acc"):
        trainer.fit()
    assert trainer.epoch == 0 and not (tmp_path / "checkpoints").exists()
    # an earlier run's records in the folder stay when a fresh run is refused
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError):
        Trainer(mtcore.build(None, [*TINY, 'train.monitor="seg.mIoU"']), tmp_path,
                progress=False).fit()
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"


def test_a_generation_metric_is_monitored_only_when_measured_at_every_evaluation(tmp_path):
    """FID and the like come with every evaluation only under gen_metrics = "every": their names
    are checked against the untrained generator's before the first step."""
    fid = [*TINY, "optim.epochs=2", "train.gen_metric_samples=16", 'train.monitor="gan.fid"']
    with pytest.raises(ConfigError, match=r"no 'gan.fid' \(task 'gan' measures FID, precision, "
                                          r'recall and the like at every evaluation only with '
                                          r'train.gen_metrics = "every"\)'):
        Trainer(mtcore.build(None, [*fid, 'train.gen_metrics="final"']), None,
                progress=False).fit()
    typo = Trainer(mtcore.build(None, [*fid[:-1], 'train.monitor="gan.FID"',
                                       'train.gen_metrics="every"']), None, progress=False)
    with pytest.raises(ConfigError, match=r"no 'gan.FID'. Did you mean 'gan.fid'"):
        typo.fit()
    assert typo.epoch == 0
    run = Trainer(mtcore.build(None, [*fid, 'train.gen_metrics="every"']), None, progress=False)
    result = run.fit()
    fids = {r["epoch"]: r["gan.fid"] for r in run.history if r["split"] == "val"}
    best = min(fids, key=fids.get)
    assert result["best"] == {"metric": "gan.fid", "value": fids[best], "epoch": best,
                              "best_pt_epoch": None}  # no run folder, no best.pt


def test_resuming_with_another_monitor_warns_and_rescores_the_history(tmp_path):
    sets = [*TINY, "optim.epochs=2"]
    Trainer(mtcore.build(None, sets), tmp_path, progress=False).fit(stop_after=1)
    other = Trainer(mtcore.build(None, [*sets, 'train.monitor="vae.loss"']), tmp_path,
                    progress=False)
    with pytest.warns(RuntimeWarning, match=r"train.monitor changed \(\(the default\) \(auto\) "
                                            r"-> vae.loss \(auto\)\)"):
        other._resume()
    first = next(r for r in other.history if r["split"] == "val")
    assert other.best == -first["vae.loss"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = Trainer(mtcore.build(None, sets), tmp_path, progress=False)
        same._resume()
    assert same.best == first["seg.miou"]


def test_metrics_json_says_which_epoch_best_pt_holds_after_the_monitor_changed(tmp_path,
                                                                             monkeypatch):
    """best.pt keeps the old monitor's choice until the new one beats its best: metrics.json
    names the best epoch by the new monitor and, apart, the epoch best.pt holds."""
    sets = [*TINY, "optim.epochs=3", 'train.monitor="cls.accuracy"']
    first = Trainer(mtcore.build(None, sets), tmp_path, progress=False, log=lambda _: None)
    scripted(first, monkeypatch, [0.5, 0.6])
    first.fit(stop_after=2)  # best.pt: epoch 2 (0.6, higher is better)
    then = Trainer(mtcore.build(None, [*sets, 'train.monitor_mode="min"']), tmp_path,
                   progress=False, log=lambda _: None)
    scripted(then, monkeypatch, [0.7])
    with pytest.warns(RuntimeWarning, match="train.monitor changed"):
        result = then.fit(resume=True)
    # lower is better now: epoch 1's 0.5; epoch 3's 0.7 beats nothing, so best.pt stays at 2
    assert result["best"] == {"metric": "cls.accuracy", "value": 0.5, "epoch": 1,
                              "best_pt_epoch": 2}
    assert json.loads((tmp_path / "metrics.json").read_text())["best"] == result["best"]
    assert ckpt_io.load(tmp_path / "checkpoints" / "best.pt")["epoch"] == 2


def test_a_run_patience_stops_ends_as_a_finished_run_does(tmp_path, monkeypatch):
    """The stopping epoch gets the end-of-run work: the "final" generation metrics and the
    sample grid; a finished run resumed with a patience it has already spent trains no more."""
    sets = [*TINY, "optim.epochs=6", 'train.monitor="cls.accuracy"', "train.patience=1",
            'train.gen_metrics="final"', "train.gen_metric_samples=16", "train.samples_every=5"]
    trainer = Trainer(mtcore.build(None, sets), tmp_path, progress=False, log=lambda _: None)
    scripted(trainer, monkeypatch, [0.5, 0.4])
    result = trainer.fit()
    assert trainer.epoch == 2 and result["stopped_early"]
    rows = [r for r in trainer.history if r["split"] == "val"]
    assert "gan.fid" in rows[-1] and "gan.fid" not in rows[0]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["epoch_002.png"]

    done = tmp_path / "done"
    first = [*TINY, "optim.epochs=2", 'train.monitor="cls.accuracy"']
    trainer = Trainer(mtcore.build(None, first), done, progress=False, log=lambda _: None)
    scripted(trainer, monkeypatch, [0.5, 0.4])
    assert not trainer.fit()["stopped_early"]  # no patience: it ran its two epochs
    lines: list[str] = []
    more = Trainer(mtcore.build(None, [*first, "optim.epochs=4", "train.patience=1"]), done,
                   progress=False, log=lines.append)
    scripted(more, monkeypatch, [])
    assert more.fit(resume=True)["stopped_early"] and more.epoch == 2
    assert "not training on from epoch 2/4 (raise train.patience to go on)" in lines[-1]


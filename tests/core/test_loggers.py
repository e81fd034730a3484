"""Run loggers (config key ``loggers``): a plugin's logger receives exactly the run's records,
sample grids and its end; the TensorBoard logger's event files hold the same numbers as
metrics.jsonl."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
from PIL import Image

import mtcore
from mtcore.errors import ComponentNotFoundError, ConfigError, ContractError
from mtcore.plugin import LoggerSpec, RunLogger, hookimpl
from mtcore.plugin_manager import default_manager
from mtcore.registry import Registry
from mtcore.trainer import Trainer

TINY = [
    "data.dataset.params.size=16", "data.dataset.params.num_samples=32", "data.batch_size=16",
    "data.eval_batch_size=32", "model.backbone.params.width=8", "tasks.vae.head.params.width=8",
    "tasks.gan.head.params.width=8", "tasks.gan.head.params.d_width=8", "train.progress=false",
    "kernels=\"reference\"", 'train.gen_metrics="none"', "train.max_steps_per_epoch=1",
    "train.num_samples=2",
]


class Recorder(RunLogger):
    """Keeps every call it gets, in order."""

    runs: list[list[tuple]] = []

    def __init__(self, tag: str = "") -> None:
        self.calls: list[tuple] = []
        Recorder.runs.append(self.calls)

    def start(self, out_dir, config, epoch):
        self.calls.append(("start", out_dir, config["seed"], epoch))

    def log(self, row):
        self.calls.append(("log", dict(row)))

    def log_image(self, name, image, epoch):
        self.calls.append(("image", name, image, epoch))

    def close(self):
        self.calls.append(("close",))


class Failing(Recorder):
    """Fails where told to (``start`` or ``close``)."""

    def __init__(self, where: str = "start") -> None:
        super().__init__()
        self.where = where

    def start(self, out_dir, config, epoch):
        super().start(out_dir, config, epoch)
        if self.where == "start":
            raise OSError("the tracker is down")

    def close(self):
        super().close()
        if self.where == "close":
            raise OSError("disk full on flush")


def registry():
    plugin = types.ModuleType("recorder_plugin")

    @hookimpl
    def mtcore_loggers():
        yield LoggerSpec("recorder", Recorder, "Keeps every call.")
        yield LoggerSpec("failing", Failing, "Fails where told to.")
        yield LoggerSpec("not_a_logger", lambda: object(), "Builds the wrong thing.")

    plugin.mtcore_loggers = mtcore_loggers
    pm = default_manager()
    pm.register(plugin, "recorder")
    return Registry(pm)


def test_a_plugins_logger_gets_every_record_and_grid_and_the_end(tmp_path):
    Recorder.runs.clear()
    reg = registry()
    sets = [*TINY, "optim.epochs=2", 'loggers.mine={name = "recorder"}']
    Trainer(mtcore.build(None, sets, registry=reg), tmp_path, progress=False).fit()
    (calls,) = Recorder.runs
    assert calls[0] == ("start", tmp_path, 0, 0) and calls[-1] == ("close",)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [c[1] for c in calls if c[0] == "log"] == rows
    images = [c for c in calls if c[0] == "image"]
    assert [(c[1], c[3]) for c in images] == [("samples", 1), ("samples", 2)]
    grid = np.asarray(Image.open(tmp_path / "samples" / "epoch_002.png").convert("RGB"))
    assert images[1][2].dtype == np.uint8 and np.array_equal(images[1][2], grid)

    # a resumed run starts it at its epoch and sends only the new records
    Recorder.runs.clear()
    Trainer(mtcore.build(None, [*sets, "optim.epochs=3"], registry=reg), tmp_path,
            progress=False).fit(resume=True)
    (calls,) = Recorder.runs
    assert calls[0][3] == 2
    assert [(c[1]["epoch"], c[1]["split"]) for c in calls if c[0] == "log"] == [
        (3, "train"), (3, "val")]


def test_a_logger_is_closed_when_the_run_fails(tmp_path, monkeypatch):
    Recorder.runs.clear()
    trainer = Trainer(mtcore.build(None, [*TINY, 'loggers.mine={name = "recorder"}'],
                                   registry=registry()), tmp_path, progress=False)

    def broken(epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train_epoch", broken)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    (calls,) = Recorder.runs
    assert [c[0] for c in calls] == ["start", "close"]


def test_a_logger_that_cannot_start_leaves_the_run_folder_as_it_was(tmp_path):
    Recorder.runs.clear()
    reg = registry()
    out = tmp_path / "run"
    mtcore.fit(mtcore.build(None, [*TINY, "optim.epochs=1", "train.samples_every=0"],
                            registry=reg), out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    trainer = Trainer(mtcore.build(None, [*TINY, "optim.epochs=1", "seed=3",
                                          'loggers.t={name = "failing"}'],
                                   registry=reg), out, progress=False)
    with pytest.raises(ConfigError, match=r"loggers\.t: could not start: the tracker is down"):
        trainer.fit()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert Recorder.runs[-1][-1] != ("close",)  # never started, so never closed


def test_a_logger_failing_to_close_does_not_hide_the_run_or_the_other_loggers(tmp_path):
    Recorder.runs.clear()
    sets = [*TINY, "optim.epochs=1", 'loggers.a={name = "failing", params = {where = "close"}}',
            'loggers.b={name = "recorder"}']
    with pytest.warns(RuntimeWarning, match=r"loggers\.a: close failed: OSError: disk full"):
        result = Trainer(mtcore.build(None, sets, registry=registry()), tmp_path,
                         progress=False).fit()
    assert result["epochs"] == 1
    assert [run[-1] for run in Recorder.runs] == [("close",), ("close",)]


def test_loggers_from_a_runs_config_can_be_turned_off_on_resume():
    from mtcore.config import resolve_config

    saved = resolve_config(None, ['loggers.tb={name = "tensorboard"}'])
    assert resolve_config(saved, ["loggers={}"], base=saved)["loggers"] == {}


def test_bad_logger_configs_fail_before_the_run_starts(tmp_path):
    reg = registry()
    cases = [('loggers.x={name = "tensorbord"}', ComponentNotFoundError,
              r"loggers\.x\.name: unknown logger 'tensorbord'. Did you mean 'tensorboard'"),
             ('loggers.x={name = "tensorboard", params = {flush_secs = 0}}', ConfigError,
              r"loggers\.x \(logger 'tensorboard'\): flush_secs must be an integer >= 1"),
             ('loggers.x={name = "not_a_logger"}', ContractError,
              r"loggers\.x: logger 'not_a_logger' must build an mtcore.plugin.RunLogger")]
    for override, error, message in cases:
        trainer = Trainer(mtcore.build(None, [*TINY, override], registry=reg), tmp_path / "run",
                          progress=False)
        with pytest.raises(error, match=message):
            trainer.fit()
        assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"loggers\.x\.nmae: unknown key"):
        mtcore.build(None, [*TINY, 'loggers.x={nmae = "tensorboard"}'])


def test_tensorboard_event_files_hold_the_runs_numbers_and_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sets = [*TINY, "optim.epochs=2", 'loggers.tb={name = "tensorboard"}']
    mtcore.fit(mtcore.build(None, sets), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    want = {}
    for row in rows:
        for key, value in row.items():
            if key not in ("epoch", "split") and isinstance(value, float | int):
                want.setdefault(f"{row['split']}/{key}", []).append((row["epoch"], value))
    tags = events.Tags()
    assert set(tags["scalars"]) == set(want) and "val/seg.miou" in want
    for tag, points in want.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in points], rtol=1e-6)
    assert [e.step for e in events.Images("samples")] == [1, 2]
    grid = Image.open(tmp_path / "samples" / "epoch_002.png")
    assert (events.Images("samples")[1].width, events.Images("samples")[1].height) == grid.size
    assert "config/text_summary" in tags["tensors"]

    # a fresh run into the same folder: TensorBoard shows it alone, not after the earlier one
    mtcore.fit(mtcore.build(None, [*sets, "seed=1", "optim.epochs=1"]), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/seg.loss")] == [1]


def test_tensorboard_missing_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    with pytest.raises(ConfigError, match=r'needs the tensorboard package: pip install '
                                          r'"mtcore\[tensorboard\]"'):
        Trainer(mtcore.build(None, [*TINY, 'loggers.tb={name = "tensorboard"}']), None,
                progress=False).fit()

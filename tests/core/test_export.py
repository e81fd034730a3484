"""``mtcore export`` / ``mtcore.export``: a checkpoint's predicting heads as one torch.export
program, checked against ``mtcore.predict`` in a process that cannot import mtcore."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import mtcore
from mtcore.cli.main import main
from mtcore.deploy import read_description
from mtcore.errors import ConfigError, ContractError, DataError

TINY = [
    "data.dataset.params.size=16", "data.dataset.params.num_samples=48", "data.batch_size=16",
    "data.eval_batch_size=48", "model.backbone.params.width=8", "tasks.vae.head.params.width=8",
    "tasks.gan.head.params.width=8", "tasks.gan.head.params.d_width=8", "train.progress=false",
    "optim.epochs=1", 'train.gen_metrics="none"', "train.samples_every=0",
]  # channels-last training (the default), kernels "auto": the C++ ones on this CPU


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    mtcore.fit(mtcore.build(None, TINY), out)
    return out / "checkpoints" / "last.pt"


# Runs an exported program with mtcore and its plugins made unimportable: what a deployment has.
RUN_WITHOUT_MTCORE = textwrap.dedent("""
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0].startswith("mtcore"):
                raise ImportError("no mtcore here: " + name)
    sys.meta_path.insert(0, Block())
    import torch
    program = torch.export.load(sys.argv[1]).module()
    images = torch.load(sys.argv[2])
    torch.save({k: v.detach() for k, v in program(images).items()}, sys.argv[3])
""")


def test_the_program_runs_without_mtcore_and_predicts_as_mtcore_does(ckpt, tmp_path):
    path = tmp_path / "model.pt2"
    description = mtcore.export(ckpt, path)
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.save(images, tmp_path / "images.pt")
    subprocess.run([sys.executable, "-c", RUN_WITHOUT_MTCORE, str(path),
                    str(tmp_path / "images.pt"), str(tmp_path / "out.pt")], check=True)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    want = mtcore.predict(ckpt, images)
    assert sorted(got) == ["cls.label", "cls.label.scores", "seg.mask", "vae.reconstruction"]
    assert torch.equal(got["seg.mask"], want["seg"]["mask"].value)
    assert torch.equal(got["cls.label"], want["cls"]["label"].value)
    torch.testing.assert_close(got["cls.label.scores"], want["cls"]["label"].scores)
    torch.testing.assert_close(got["vae.reconstruction"], want["vae"]["reconstruction"].value)
    # what the file says of itself, for a reader without mtcore
    assert read_description(path) == description
    trainer = mtcore.load(ckpt, splits=())
    info = trainer.exp.info
    assert description["input"]["shape"] == ["N", 3, 16, 16]
    assert description["outputs"]["seg.mask"]["classes"] == list(info.seg_class_names)
    assert description["outputs"]["cls.label"]["classes"] == list(info.label_names)
    assert description["outputs"]["seg.mask"]["shape"] == ["N", 16, 16]
    assert json.loads(json.dumps(description)) == description


def test_the_program_holds_standard_ops_and_only_the_chosen_tasks(ckpt, tmp_path):
    path = tmp_path / "seg.pt2"
    mtcore.export(ckpt, path, tasks="seg")
    program = torch.export.load(path)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.conv2d.default" in ops and not any("mtcore" in op for op in ops)
    assert not any(k.startswith(("model.heads.cls", "model.heads.vae", "model.heads.gan"))
                   for k in program.state_dict)  # the other heads' weights stay behind
    assert any(k.startswith("model.heads.seg") for k in program.state_dict)
    out = program.module()(torch.rand(1, 3, 16, 16))  # a batch of one, though traced with two
    assert list(out) == ["seg.mask"] and out["seg.mask"].shape == (1, 16, 16)
    # the model the program came from is left as it was (heads, layout, gradients)
    trainer = mtcore.load(ckpt, splits=())
    assert list(trainer.model.heads) == ["seg", "cls", "vae", "gan"]


def test_cli_exports_and_refuses_bad_requests(ckpt, tmp_path, capsys):
    out = tmp_path / "deploy" / "m.pt2"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--tasks", "cls"]) == 0
    said = capsys.readouterr().out
    assert "cls.label (int64 [N])" in said and "torch.export.load(" in said
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.pt2"]  # no partial file left
    cases = [(["--out", str(tmp_path / "m.pt")], "an exported program is a .pt2 file; name it m.pt2"),
             (["--out", str(tmp_path / "g.pt2"), "--tasks", "gan"],
              "task(s) 'gan': the model's tasks that predict from an image are seg, cls, vae"),
             (["--out", str(out / "x.pt2")], "m.pt2 is a file; give a folder")]
    (tmp_path / "d.pt2").mkdir()
    cases.append((["--out", str(tmp_path / "d.pt2")], "is a folder; give a file name"))
    for extra, message in cases:
        assert main(["export", "--checkpoint", str(ckpt), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_a_program_that_does_not_match_the_model_is_not_written(ckpt, tmp_path, monkeypatch):
    import mtcore.deploy as deploy

    trainer = mtcore.load(ckpt, splits=())
    real = torch.export.load

    class Off:  # the loaded program answers something else
        def __init__(self, program):
            self.program = program

        def module(self):
            inner = self.program.module()
            return lambda x: {k: v + 1 for k, v in inner(x).items()}

    monkeypatch.setattr(torch.export, "load", lambda *a, **k: Off(real(*a, **k)))
    with pytest.raises(ContractError, match="exported program's 'seg.mask' differs"):
        deploy.export_model(trainer.model, trainer.exp.info, tmp_path / "new" / "dir" / "m.pt2")
    assert list(tmp_path.iterdir()) == []  # nor the folders it made for the file


def test_errors_name_the_problem(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="name it m.pt2"):
        mtcore.export(ckpt, tmp_path / "m.onnx")
    with pytest.raises(DataError, match="task\\(s\\) 'nope'"):
        mtcore.export(ckpt, tmp_path / "m.pt2", tasks=["nope"])
    plain = torch.export.export(torch.nn.Linear(2, 2), (torch.rand(1, 2),))
    torch.export.save(plain, tmp_path / "plain.pt2")
    with pytest.raises(ContractError, match="without mtcore's description"):
        read_description(tmp_path / "plain.pt2")


def test_a_head_that_branches_on_the_batch_size_is_refused(ckpt, tmp_path, monkeypatch):
    """torch.export freezes a Python branch at the traced batch (two images): the program would
    predict a batch of one wrongly, so the check of a batch of one refuses it."""
    from mtcore.heads import Prediction

    trainer = mtcore.load(ckpt, splits=())
    head = trainer.model.heads["seg"]
    monkeypatch.setattr(head, "predictions", lambda out: {"mask": Prediction(
        "mask", out["logits"].argmax(1) if out["logits"].shape[0] > 1
        else out["logits"].argmin(1))})
    from mtcore.deploy import export_model
    with pytest.raises(ContractError, match="differs from the model's on a batch of one image"):
        export_model(trainer.model, trainer.exp.info, tmp_path / "m.pt2", tasks=["seg"])
    assert list(tmp_path.iterdir()) == []


def test_the_kernel_setting_is_as_it_was_after_an_export(ckpt, tmp_path, monkeypatch):
    from mtcore import kernels
    from mtcore.kernels import _backend

    monkeypatch.setattr(_backend, "_selected", None)  # unset: MTCORE_KERNELS decides
    mtcore.export(ckpt, tmp_path / "m.pt2", tasks="cls")
    assert _backend._selected is None
    monkeypatch.setenv("MTCORE_KERNELS", "reference")
    assert kernels.get_backend() == "reference"

"""Export a trained model for deployment: one ``torch.export`` program (a ``.pt2`` file) that
takes images and returns the heads' predictions, and runs with torch alone (no mtcore, no
plugins): ``torch.export.load(path).module()(images)``.

The program is traced with the ``reference`` kernels, so it holds only standard ATen ops (the
fused kernels are an mtcore extension a deployment would not have), on the CPU in float32, with
the batch size free. A JSON description of its input and outputs (class names included) rides
in the file as ``extra_files["mtcore.json"]``; :func:`read_description` reads it back.
"""

from __future__ import annotations

import contextlib
import copy
import json
import secrets
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtcore import kernels
from mtcore.data import DatasetInfo
from mtcore.errors import ConfigError, ContractError
from mtcore.heads import Prediction
from mtcore.model import MultiTaskModel
from mtcore.predict import predicting_heads

DESCRIPTION = "mtcore.json"  # the name of the description among the program's extra files
FORMAT = 1


class InferenceModel(nn.Module):
    """Images float [N, C, H, W] in [0, 1] -> ``{"<task>.<name>": value}`` for each
    :class:`~mtcore.heads.Prediction` of the chosen tasks, plus ``"<task>.<name>.scores"`` (the
    class probabilities) for a label: the heads' predictions as plain tensors, which is what an
    exported program can return."""

    def __init__(self, model: MultiTaskModel, tasks: Collection[str]) -> None:
        super().__init__()
        self.model = model
        self.tasks = list(tasks)

    def predictions(self, images: torch.Tensor) -> dict[str, dict[str, Prediction]]:
        outputs = self.model({"image": images}, self.tasks)
        return {task: self.model.heads[task].predictions(outputs[task]) for task in self.tasks}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return flat(self.predictions(images))


def flat(preds: Mapping[str, Mapping[str, Prediction]]) -> dict[str, torch.Tensor]:
    """Predictions by task and name as the program returns them: ``"<task>.<name>"`` and, for
    a label, ``"<task>.<name>.scores"``."""
    out: dict[str, torch.Tensor] = {}
    for task, by_name in preds.items():
        for name, pred in by_name.items():
            out[f"{task}.{name}"] = pred.value
            if pred.scores is not None:
                out[f"{task}.{name}.scores"] = pred.scores
    return out


def check_export_path(path: str | Path) -> Path:
    """The program's file: a ``.pt2`` name (what ``torch.export.load`` expects), not a folder."""
    out = Path(path)
    if out.suffix != ".pt2":
        raise ConfigError(f"--out {out}: an exported program is a .pt2 file; name it "
                          f"{out.with_suffix('.pt2').name}")
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give a file name")
    for p in out.parents:
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--out {out}: {p} is a file; give a folder")
    return out


def export_model(model: MultiTaskModel, info: DatasetInfo, path: str | Path, *,
                 tasks: Collection[str] | None = None) -> dict[str, Any]:
    """Export ``model``'s predicting heads (``tasks``: only these and what they read) to
    ``path`` and check the saved program against the model on a random batch; returns the
    description stored with it. The file appears only once it is complete."""
    out = check_export_path(path)
    heads = predicting_heads(model, tasks)
    inference = InferenceModel(_portable_copy(model, heads), heads).eval()
    channels, (height, width) = info.channels, info.image_size
    example = torch.rand(2, channels, height, width, generator=torch.Generator().manual_seed(0))
    # standard ops only: what a plain torch can run
    with kernels.using_backend("reference"), torch.no_grad():
        preds = inference.predictions(example)  # one pass: the description and the expectation
        description, expected = _describe(info, preds), flat(preds)
        single = inference(example[:1])  # the program must give this for a batch of one
        batch = torch.export.Dim("batch", min=1)
        try:
            program = torch.export.export(inference, (example,),
                                          dynamic_shapes=({0: batch},), strict=False)
        except Exception as exc:  # torch's tracer: name the tasks and where to look
            raise ContractError(
                f"torch.export could not trace the tasks {', '.join(heads)}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                "(a head's forward and predictions must be tensor code without branches on "
                "values or the batch size; `mtcore --debug export` shows where)") from exc
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # to undo
    out.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own (two exports to one path do not remove each other's), ending in .pt2
    # as torch.export wants
    partial = out.with_name(f".{out.stem}.{secrets.token_hex(4)}.partial.pt2")
    try:
        torch.export.save(program, partial,
                          extra_files={DESCRIPTION: json.dumps(description, indent=2)})
        _check_saved(partial, example, expected, single)
        partial.replace(out)
    except BaseException:
        partial.unlink(missing_ok=True)
        for folder in made:  # innermost first; a folder something else wrote into stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return description


def read_description(path: str | Path) -> dict[str, Any]:
    """The description :func:`export_model` stored in an exported program."""
    extra = {DESCRIPTION: ""}
    torch.export.load(path, extra_files=extra)
    if not extra[DESCRIPTION]:
        raise ContractError(f"{path}: an exported program without mtcore's description "
                            f"({DESCRIPTION}); was it written by mtcore export?")
    return json.loads(extra[DESCRIPTION])


def _portable_copy(model: MultiTaskModel, tasks: Collection[str]) -> MultiTaskModel:
    """The model as a deployment takes it: only ``tasks`` and the tasks they read (a GAN's
    weights stay behind), on the CPU, float32, contiguous (the layout a channels-last training
    run chose is the training machine's business), without gradients."""
    keep = set(model._needed(tasks))
    copied = copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format)
    for name in [n for n in copied.heads if n not in keep]:
        del copied.heads[name]
    copied._order = [n for n in copied._order if n in keep]
    return copied.eval().requires_grad_(False)


def _describe(info: DatasetInfo, preds: Mapping[str, Mapping[str, Prediction]]) -> dict[str, Any]:
    """What the program takes and gives, for a reader without mtcore."""
    outputs: dict[str, Any] = {}
    for task, by_name in preds.items():
        for name, pred in by_name.items():
            outputs[f"{task}.{name}"] = {
                "kind": pred.kind, "dtype": str(pred.value.dtype).removeprefix("torch."),
                "shape": ["N", *pred.value.shape[1:]], "meaning": _MEANING[pred.kind],
                **({"classes": list(pred.names)} if pred.names else {})}
            if pred.scores is not None:
                outputs[f"{task}.{name}.scores"] = {
                    "kind": "scores", "dtype": str(pred.scores.dtype).removeprefix("torch."),
                    "shape": ["N", pred.scores.shape[1]],
                    "meaning": f"the probability of each class of {task}.{name}"}
    return {
        "format": FORMAT,
        "mtcore_version": _version(),
        "input": {"shape": ["N", info.channels, *info.image_size], "dtype": "float32",
                  "range": [0.0, 1.0],
                  "colour": {1: "grayscale", 3: "RGB"}.get(info.channels,
                                                          f"{info.channels} channels"),
                  "prepare": "read upright (EXIF orientation), resized bilinearly to the "
                             "model's size, as mtcore predict does"},
        "outputs": outputs,
    }


_MEANING = {"mask": "a class index per pixel", "label": "a class index per image",
            "value": "a number per image", "image": "an image in [0, 1]"}


def _check_saved(path: Path, example: torch.Tensor, expected: Mapping[str, torch.Tensor],
                 single: Mapping[str, torch.Tensor]) -> None:
    """The saved program, loaded back, gives what the model gave, for the traced batch and for
    a batch of one (a branch on the batch size would have been frozen at the traced one)."""
    program = torch.export.load(path).module()
    for images, want_all, what in ((example, expected, "the same images"),
                                   (example[:1], single, "a batch of one image")):
        got = program(images)
        for key, want in want_all.items():
            if key not in got or got[key].shape != want.shape or not torch.allclose(
                    got[key].float(), want.float(), rtol=1e-4, atol=1e-5):
                raise ContractError(
                    f"the exported program's {key!r} differs from the model's on {what}; a "
                    "head's forward or predictions may branch on the batch size or on values, "
                    "which an exported program cannot")


def _version() -> str:
    from mtcore import __version__
    return __version__

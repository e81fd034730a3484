"""The Python API: build an experiment, fit it, evaluate, sample, predict and export from checkpoints.

    import mtcore
    exp = mtcore.build({"optim": {"epochs": 2}})
    result = mtcore.fit(exp, out_dir="runs/demo")
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mtcore import checkpoint as ckpt_io
from mtcore.checkpoint import saved_info
from mtcore.config import load_toml
from mtcore.data import DatasetInfo
from mtcore.errors import CheckpointError
from mtcore.experiment import Experiment, build_experiment
from mtcore.heads import TaskHead
from mtcore.predict import Predictions, check_images, image_files, predict_images, run_predictions
from mtcore.registry import Registry
from mtcore.trainer import Trainer


def build(config: Mapping[str, Any] | str | os.PathLike | None = None,
          overrides: Sequence[str] = (), **kwargs: Any) -> Experiment:
    """Build an experiment from a config (a dict, or a TOML file's path) merged over the
    defaults, then ``overrides`` (``"key=value"``, as ``--set``); see ``mtcore config``."""
    if isinstance(config, str | os.PathLike):
        config = load_toml(config)
    if isinstance(overrides, str):
        overrides = [overrides]
    return build_experiment(config, list(overrides), **kwargs)


def fit(exp: Experiment, out_dir: str | Path | None = None, *, resume: bool = False,
        progress: bool | None = None) -> dict[str, Any]:
    """Train; returns the final metrics (also written to ``out_dir/metrics.json``)."""
    return Trainer(exp, out_dir, progress=progress).fit(resume=resume)


def load(checkpoint: str | Path, *, splits: tuple[str, ...] | None = None,
         overrides: list[str] = (), registry: Registry | None = None) -> Trainer:
    """A trainer restored from a checkpoint (model, optimizers, state) using its own config;
    ``registry``: the one the run was built with, if not the installed plugins' (in-process
    plugins, as in ``build(..., registry=...)``)."""
    state = ckpt_io.load(checkpoint, require=ckpt_io.RUN_KEYS)
    from mtcore.config import resolve_config

    cfg = resolve_config(state["config"], list(overrides), base=state["config"])
    info = saved_info(state) if splits == () else None
    exp = build_experiment(cfg, resolved=True, splits=splits, registry=registry, restoring=True,
                           info=info)
    trainer = Trainer(exp, None, progress=False)
    trainer.load_state(state, str(checkpoint))
    return trainer


def evaluate(checkpoint: str | Path, split: str = "val", *,
             registry: Registry | None = None) -> dict[str, float]:
    """Metrics of a checkpoint on ``split`` (including generation metrics when it generates)."""
    trainer = load(checkpoint, splits=("train", split) if split != "train" else ("train",),
                   registry=registry)
    metrics = trainer.evaluate(split)
    if trainer.model.generative_heads():
        metrics.update(trainer.generation_metrics(split))
    return metrics


def _generative_head(checkpoint: str | Path, task: str | None,
                     registry: Registry | None) -> tuple[Trainer, str, TaskHead]:
    trainer = load(checkpoint, splits=(), registry=registry)
    heads = trainer.model.generative_heads()
    if not heads:
        raise CheckpointError(f"{checkpoint}: the model has no generative head")
    if task is not None and task not in heads:
        raise CheckpointError(f"--task {task!r}: generative heads are {', '.join(heads)}")
    name = task or next((k for k, h in heads.items() if h.task_type == "gan"), next(iter(heads)))
    trainer.model.eval()
    return trainer, name, heads[name]


def _check_label(label: int, info: DatasetInfo, head: TaskHead, name: str) -> None:
    if not info.num_labels or not 0 <= label < info.num_labels:
        raise CheckpointError(f"--label {label}: the dataset has labels 0..{info.num_labels - 1}"
                              if info.num_labels else "--label: the dataset has no labels")
    if not head.conditional:
        raise CheckpointError(f"--label {label}: the {name!r} head is not class-conditional "
                              "(its samples would ignore the label)")


def sample(checkpoint: str | Path, n: int = 64, label: int | None = None, task: str | None = None,
           seed: int = 0, *, registry: Registry | None = None) -> torch.Tensor:
    """``n`` images from a checkpoint's generative head (``task``: which one; default the first
    GAN-like head), optionally all of class ``label``."""
    trainer, name, head = _generative_head(checkpoint, task, registry)
    labels = None
    if label is not None:
        _check_label(label, trainer.exp.info, head, name)
        labels = torch.full((n,), label, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    return head.sample(n, labels=labels, generator=gen)


def sample_rows(checkpoint: str | Path, n: int = 64, label: int | None = None,
                task: str | None = None, seed: int = 0, *,
                registry: Registry | None = None) -> dict[str, torch.Tensor]:
    """Titled rows of generated images for a grid (``mtcore sample``). A class-conditional head
    without ``label``: one row per class of ``ceil(n / classes)`` images asked for it, titled
    by the class name; otherwise ``n`` images (all of class ``label`` if given) in rows of
    ``ceil(sqrt(n))``, titled ``"<class> #<first index>"`` (``"#<first index>"`` without)."""
    from mtcore.artifacts import label_names

    trainer, name, head = _generative_head(checkpoint, task, registry)
    info = trainer.exp.info
    gen = torch.Generator().manual_seed(seed)
    if label is None and head.conditional and info.num_labels:
        per = math.ceil(n / info.num_labels)
        return {title: head.sample(per, labels=torch.full((per,), k, dtype=torch.long),
                                   generator=gen)
                for k, title in enumerate(label_names(info))}
    labels = None
    prefix = ""
    if label is not None:
        _check_label(label, info, head, name)
        labels = torch.full((n,), label, dtype=torch.long)
        prefix = f"{label_names(info)[label]} "
    images = head.sample(n, labels=labels, generator=gen)
    cols = math.ceil(math.sqrt(n))
    return {f"{prefix}#{i * cols}": images[i * cols:(i + 1) * cols]
            for i in range(math.ceil(n / cols))}


def predict(checkpoint: str | Path, images: str | Path | Sequence[str | Path] | torch.Tensor, *,
            tasks: str | Collection[str] | None = None, batch_size: int = 64,
            registry: Registry | None = None) -> Predictions:
    """What a checkpoint's heads predict for new images: ``{task: {name: Prediction}}`` (e.g.
    ``["seg"]["mask"].value``, class indices [N, H, W]; ``["cls"]["label"]``, the class index and
    ``scores``), every tensor on the CPU and at the model's size. ``images``: an image file or
    folder, or a list of them (converted and resized to the model's input as the datasets do;
    read a batch at a time; only the predictions are held for all), or a float tensor
    [N, C, H, W] in [0, 1] at the model's size. ``tasks``: only these (default: every task that
    predicts from an image; a GAN does not)."""
    trainer = load(checkpoint, splits=(), registry=registry)
    info = trainer.exp.info
    if not torch.is_tensor(images):
        return predict_images(trainer.model, info, trainer.device, image_files(images),
                              tasks=tasks, batch_size=batch_size)
    return run_predictions(trainer.model, check_images(images, info), trainer.device,
                           tasks=tasks, batch_size=batch_size)


def export(checkpoint: str | Path, path: str | Path, *, tasks: str | Collection[str] | None = None,
           registry: Registry | None = None) -> dict[str, Any]:
    """Export a checkpoint's predicting heads (``tasks``: only these) to ``path`` (``.pt2``) as
    one ``torch.export`` program that runs with torch alone:
    ``torch.export.load(path).module()(images)`` maps float [N, C, H, W] in [0, 1] to
    ``{"seg.mask": ..., "cls.label": ..., "cls.label.scores": ...}``. Returns the description
    stored in the file (input, outputs, class names); see :mod:`mtcore.deploy`."""
    from mtcore.deploy import check_export_path, export_model

    out = check_export_path(path)
    trainer = load(checkpoint, splits=(), registry=registry)
    if isinstance(tasks, str):
        tasks = [tasks]
    return export_model(trainer.model, trainer.exp.info, out, tasks=tasks)

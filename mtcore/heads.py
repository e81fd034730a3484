"""The task-head contract: a head owns one task (module, loss, metrics and the target it reads).

The trainer drives every head through this interface only. Heads with an adversarial part (a GAN
discriminator) expose it as *auxiliary* parameters trained by their own optimizer in steps that
alternate with the main multi-task step; the trainer never knows which head is a GAN.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn

from mtcore.errors import ContractError

Batch = Mapping[str, torch.Tensor]
Outputs = dict[str, torch.Tensor]


class Metric(Protocol):
    """A streaming metric: ``update`` per batch, ``compute`` once per split."""

    def update(self, outputs: Outputs, batch: Batch) -> None: ...
    def compute(self) -> dict[str, float]: ...


@dataclass(frozen=True)
class Prediction:
    """One per-image result of a head, for inference (``mtcore predict``), batch first.

    ``kind`` says what ``value`` holds and how ``mtcore predict`` writes it: ``"mask"``, class
    indices int64 [N, H, W] (an indexed PNG per image, at the image's own size); ``"label"``, a
    class index int64 [N] (columns of ``predictions.csv``, with the winning class's ``scores``);
    ``"value"``, one number per image, float [N] (a column of ``predictions.csv``: a regression);
    ``"image"``, floats in [0, 1] [N, C, H, W] (a PNG per image). ``names`` are the class names
    (index order) and ``scores`` [N, K] the class probabilities of a label."""

    kind: Literal["mask", "label", "value", "image"]
    value: torch.Tensor
    names: tuple[str, ...] = ()
    scores: torch.Tensor | None = None

    def __post_init__(self) -> None:
        dims = {"mask": 3, "label": 1, "value": 1, "image": 4}
        if self.kind not in dims:
            raise ContractError(f"Prediction: kind must be 'mask', 'label', 'value' or 'image', "
                                f"got {self.kind!r}")
        v = self.value
        integer = self.kind in ("mask", "label")
        if (not torch.is_tensor(v) or v.dim() != dims[self.kind]
                or v.is_floating_point() == integer or v.is_complex()):
            want = {"mask": "integer [N, H, W]", "label": "integer [N]", "value": "float [N]",
                    "image": "float [N, C, H, W]"}[self.kind]
            got = f"{v.dtype} {tuple(v.shape)}" if torch.is_tensor(v) else type(v).__name__
            raise ContractError(f"Prediction of kind {self.kind!r}: value must be {want}, got {got}")
        if self.scores is not None and (self.kind != "label" or not torch.is_tensor(self.scores)
                                        or self.scores.dim() != 2):
            raise ContractError("Prediction: scores are a label's class probabilities [N, K]")


class TaskHead(nn.Module):
    """Base class for task heads.

    Subclasses set ``task_type`` (the losses they accept declare the same) and ``targets`` (batch
    keys they need for the loss), and implement ``forward``, ``compute_loss`` and ``new_metric``.
    """

    task_type: ClassVar[str] = ""
    targets: ClassVar[tuple[str, ...]] = ()
    #: the name of the metric (as returned by ``compute``) that says how good the head is, and
    #: whether higher is better; ``train.monitor`` (which picks the "best" checkpoint) defaults
    #: to the first head's.
    primary_metric: ClassVar[tuple[str, bool] | None] = None
    #: whether ``sample(n, labels=...)`` follows the labels (a class-conditional generator)
    conditional: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.task_name = ""  # set by the model builder

    def forward(self, features: Mapping[str, torch.Tensor], batch: Batch) -> Outputs:
        raise NotImplementedError

    def compute_loss(self, outputs: Outputs, batch: Batch) -> torch.Tensor:
        """This task's scalar loss ``L_k`` for the joint objective."""
        raise NotImplementedError

    def new_metric(self) -> Metric:
        """A fresh metric accumulator for one evaluation pass."""
        raise NotImplementedError

    # -- wiring -------------------------------------------------------------------------------
    def link(self, heads: Mapping[str, TaskHead]) -> None:
        """Called once after all heads are built, e.g. for a GAN to share the VAE's decoder or a
        head to set ``reads``."""

    def link_backbone(self, backbone: nn.Module) -> None:
        """Called once with the model's shared backbone, for a head that runs it on images of its
        own (a generator judged by the segmenter it shares the backbone with). Hold it without
        registering it as a submodule (a plain list): it is the model's, saved once."""

    #: names of the tasks whose outputs this head reads: the model runs them first and calls
    #: ``forward(features, batch, upstream)`` with ``upstream = {task: outputs}`` (set by ``link``)
    reads: tuple[str, ...] = ()

    def main_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters trained by the multi-task optimizer (everything not auxiliary)."""
        aux = {id(p) for ps in self.auxiliary_parameters().values() for p in ps}
        return (p for p in self.parameters() if id(p) not in aux)

    # -- auxiliary (adversarial) training -----------------------------------------------------
    def auxiliary_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups trained by their own optimizer, e.g. ``{"discriminator": [...]}``."""
        return {}

    @property
    def auxiliary_steps(self) -> int:
        """How many auxiliary (D) steps to take before each main (G) step."""
        return 1

    def auxiliary_loss(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """Losses of one auxiliary step on ``batch`` at main step ``step`` (e.g. a GAN's D loss on
        real and generated images, which need no backbone features): key ``"loss"`` (a scalar)
        is minimised by the auxiliary optimizer, the other scalars are logged as
        ``<task>.<key>``."""
        raise NotImplementedError

    def after_main_step(self) -> None:
        """Called after every main optimizer step that trained this head's own parameters (e.g.
        to update a generator's EMA, or a warm-up counter); not while a transfer stage freezes
        them or leaves the task out."""

    # -- generation and pictures --------------------------------------------------------------
    def sample(self, n: int, labels: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor | None:
        """``n`` generated images in [0, 1], or None if the head does not generate."""
        return None

    def generation_metrics(self, datasets: Mapping[str, Any], split: str, num_samples: int,
                           seed: int, final: bool = True) -> dict[str, float]:
        """Metrics of generated samples against ``datasets[split]`` (e.g. FID; an evaluator may be
        trained on ``datasets["train"]``); {} if the head does not generate. ``final`` is False
        for the cheap per-epoch call (``train.gen_metrics = "every"``), True for the untrained,
        the last and any stand-alone evaluation, where costly metrics (e.g. a two-sample test)
        belong. An override may leave ``final`` out: the trainer then calls it without."""
        return {}

    def predictions(self, outputs: Outputs) -> dict[str, Prediction]:
        """What the head predicts for each image (inference on new images: ``mtcore predict``),
        by name; {} when it predicts nothing from an image (a GAN)."""
        return {}

    def visuals(self, outputs: Outputs, batch: Batch) -> dict[str, torch.Tensor]:
        """Images in [0, 1] ([N, 3, H, W]) that show what the head predicted, by row title."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Facts shown in logs: what the head consumes and produces."""
        return {"task_type": self.task_type}

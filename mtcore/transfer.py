"""The transfer-strategy contract: how a model starts (weights, architecture) and which parts train.

A strategy may rewrite the config before the model is built (structure transfer), change the
built model (parameter transfer), and freeze parts of it per epoch (feature transfer, staged
schedules). Frozen modules get ``requires_grad=False`` and are kept in eval mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Stage:
    """What trains during an epoch: module prefixes to freeze and a learning-rate multiplier."""

    name: str
    freeze: tuple[str, ...] = ()
    lr_scale: float = 1.0
    extra: Mapping[str, Any] = field(default_factory=dict)


class TransferStrategy:
    """Base class: train everything from the initialisation the model was built with."""

    def configure(self, config: dict[str, Any]) -> dict[str, Any]:
        """Return the config to build the model from (default: unchanged). Its result is what a
        run saves, so it is not called again when the run is restored."""
        return config

    def setup(self, model: nn.Module) -> None:
        """Called once on the built model before the optimizers are made, to load weights or
        check the model; not when a run is restored from its own checkpoint (eval, sample,
        ``--resume``), whose weights replace whatever this loaded. Change the architecture in
        ``configure``, never here."""

    def stage(self, epoch: int) -> Stage:
        """The stage of 0-based ``epoch``."""
        return Stage(name="train")

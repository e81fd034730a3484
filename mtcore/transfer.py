"""The transfer-strategy contract: how a model starts (weights, architecture) and which parts train.

A strategy may rewrite the config before the model is built (structure transfer), change the
built model (parameter transfer), and freeze parts of it per epoch (feature transfer, staged
schedules). Frozen modules get ``requires_grad=False`` and are kept in eval mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Stage:
    """What trains during an epoch: module prefixes to freeze, a learning-rate multiplier, which
    tasks train (``tasks``; None: all; the others' heads are frozen, their losses and auxiliary
    steps left out) and whether the loss balancer combines them (``balance``; False: the plain
    sum of the training tasks' losses, the balancer neither consulted nor updated, as when each
    head is trained on its own). A stage that trains only some of the tasks cannot balance (a
    balancer weighs every task); the trainer checks that as the stage starts."""

    name: str
    freeze: tuple[str, ...] = ()
    lr_scale: float = 1.0
    extra: Mapping[str, Any] = field(default_factory=dict)
    tasks: tuple[str, ...] | None = None
    balance: bool = True

    def __post_init__(self) -> None:
        if self.tasks is not None:
            if isinstance(self.tasks, str) or not self.tasks \
                    or not all(isinstance(t, str) for t in self.tasks):
                raise ValueError(f"stage {self.name!r}: tasks must be None or a non-empty "
                                 f"sequence of task names, got {self.tasks!r}")
            object.__setattr__(self, "tasks", tuple(self.tasks))
        if not isinstance(self.balance, bool):
            raise ValueError(f"stage {self.name!r}: balance must be True or False, "
                             f"got {self.balance!r}")

    def task_problem(self, task_names: Sequence[str]) -> str | None:
        """What is wrong with this stage's ``tasks`` for an experiment with ``task_names``
        (unknown names, or a balanced subset), or None."""
        if self.tasks is None:
            return None
        unknown = [t for t in self.tasks if t not in task_names]
        if unknown:
            return (f"stage {self.name!r} trains the task(s) {unknown}, which the experiment "
                    f"does not have (tasks: {', '.join(task_names)})")
        if self.balance and set(self.tasks) != set(task_names):
            return (f"stage {self.name!r} trains only the tasks {list(self.tasks)}, so it cannot "
                    "use the balancer (it weighs every task): set balance = false")
        return None


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

"""Loss-weighting balancers: the joint objective is ``sum_k w_k * L_k`` (plus a regulariser)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mtcore.plugin import LossBalancer


class EqualWeighting(LossBalancer):
    """Every task weighs 1: the plain sum of the losses (linear scalarisation)."""

    def weights(self, losses: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: torch.ones((), dtype=losses[k].dtype, device=losses[k].device)
                for k in self.task_names}


class FixedWeighting(LossBalancer):
    """User-given constant weights ``w_k >= 0``, one for every task and none for unknown tasks."""

    def __init__(self, task_names: Sequence[str], weights: Mapping[str, float]) -> None:
        super().__init__(task_names)
        if not isinstance(weights, Mapping):
            raise TypeError(
                f"FixedWeighting: weights must be a mapping task name -> float, got {weights!r}"
            )
        missing = [k for k in self.task_names if k not in weights]
        unknown = [k for k in weights if k not in self.task_names]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"no weight for task(s) {missing}")
            if unknown:
                parts.append(f"weight(s) given for unknown task(s) {unknown}")
            raise ValueError(
                f"FixedWeighting: {'; '.join(parts)}; the tasks are {list(self.task_names)}"
            )
        fixed: dict[str, float] = {}
        for k in self.task_names:
            w = weights[k]
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise TypeError(f"FixedWeighting: weights[{k!r}] must be a number, got {w!r}")
            if not math.isfinite(w) or w < 0:
                raise ValueError(
                    f"FixedWeighting: weights[{k!r}] must be finite and >= 0, got {w!r}"
                )
            fixed[k] = float(w)
        self.fixed = fixed

    def weights(self, losses: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(self.fixed[k], dtype=losses[k].dtype, device=losses[k].device)
                for k in self.task_names}


class UncertaintyWeighting(LossBalancer):
    """Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla 2018, "Multi-Task Learning Using
    Uncertainty to Weigh Losses"), log-variance form: ``L = sum_k exp(-s_k) L_k + s_k`` with
    learnable ``s_k = log sigma_k^2``; the reported weights are ``exp(-s_k)``."""

    def __init__(self, task_names: Sequence[str], init_log_var: float = 0.0) -> None:
        super().__init__(task_names)
        if isinstance(init_log_var, bool) or not isinstance(init_log_var, (int, float)) \
                or not math.isfinite(init_log_var):
            raise ValueError(
                f"UncertaintyWeighting: init_log_var must be a finite number, got {init_log_var!r}"
            )
        #: ``s_k`` in the order of ``task_names`` (a vector, so any task name is allowed).
        self.log_vars = nn.Parameter(torch.full((len(self.task_names),), float(init_log_var)))

    def log_var(self, task: str) -> torch.Tensor:
        """The learnable ``s_k`` of ``task``."""
        return self.log_vars[self.task_names.index(task)]

    def weights(self, losses: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: torch.exp(-self.log_var(k)).to(losses[k].dtype) for k in self.task_names}

    def objective(self, losses: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """``sum_k exp(-s_k) L_k + s_k``: the regulariser keeps ``s_k`` from growing without bound."""
        weights = self.weights(losses)
        total = sum(weights[k] * losses[k] + self.log_var(k).to(losses[k].dtype)
                    for k in self.task_names)
        return total, {k: float(weights[k].detach()) for k in self.task_names}

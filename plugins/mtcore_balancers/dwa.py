"""DWA: dynamic weight average (Liu, Johns & Davison 2019, "End-to-End Multi-Task Learning with
Attention"), and RLW: random loss weighting (Lin, Ye, Xu, Shi & Zhang 2022, "Reasonable
Effectiveness of Random Weighting"). Two cheap loss weightings that need no gradients.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from mtcore.plugin import LossBalancer

__all__ = ["DWA", "RLW", "dwa_weights"]


def dwa_weights(last: Sequence[float], before: Sequence[float], temperature: float
                ) -> list[float]:
    """``w_k = K softmax_k(r / T)`` with ``r_k = last_k / before_k``, the ratio of a task's mean
    loss over the last two epochs: a task whose loss fell less gets more weight. A ratio of
    non-positive losses is undefined and counts as 1."""
    ratios = [a / b if a > 0 and b > 0 else 1.0 for a, b in zip(last, before, strict=True)]
    top = max(r / temperature for r in ratios)
    e = [math.exp(r / temperature - top) for r in ratios]
    return [len(e) * x / sum(e) for x in e]


class DWA(LossBalancer):
    """Dynamic weight average (Liu et al. 2019): each epoch's weights come from how much each
    task's mean training loss changed over the two epochs before it (:func:`dwa_weights`,
    temperature ``temperature``, default 2 as in the paper); the first two epochs weigh 1. The
    epochs are those the balancer saw: a stage with ``balance = false`` in between is skipped, so
    the first ratio after it compares the epochs on either side."""

    def __init__(self, task_names: Sequence[str], temperature: float = 2.0) -> None:
        super().__init__(task_names)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not 0 < temperature < math.inf:
            raise ValueError(f"DWA: temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        k = len(self.task_names)
        # the mean losses of the last two epochs (NaN until seen) and the weights they give;
        # float32, so the balancer can live on any device
        self.register_buffer("history", torch.full((2, k), math.nan))
        self.register_buffer("current", torch.ones(k))
        self._weights: list[float] | None = None  # ``current`` as floats, read once per epoch
        self._warned = False

    def weights(self, losses: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._weights is None:
            self._weights = self.current.tolist()
        return {k: torch.tensor(w, dtype=losses[k].dtype, device=losses[k].device)
                for k, w in zip(self.task_names, self._weights, strict=True)}

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._weights = None  # re-read the loaded ``current``

    def after_epoch(self, mean_losses: Mapping[str, float]) -> None:
        self._check_names(mean_losses)
        new = torch.tensor([float(mean_losses[k]) for k in self.task_names])
        self.history[0] = self.history[1]
        self.history[1] = new.to(self.history.device)
        before, last = self.history[0].tolist(), self.history[1].tolist()
        if any(math.isnan(v) for v in before):
            return  # fewer than two epochs seen: keep weight 1
        bad = [k for k, a, b in zip(self.task_names, last, before, strict=True)
               if not (a > 0 and b > 0)]
        if bad and not self._warned:
            warnings.warn(f"DWA: the loss of task(s) {bad} is not positive, so its epoch-to-epoch "
                          "ratio is undefined; it counts as 1", stacklevel=2)
            self._warned = True
        self._weights = dwa_weights(last, before, self.temperature)
        self.current.copy_(torch.tensor(self._weights))

    def _check_names(self, mean_losses: Mapping[str, float]) -> None:
        missing = [k for k in self.task_names if k not in mean_losses]
        if missing:
            raise KeyError(f"DWA: no epoch loss for task(s) {missing}; got {sorted(mean_losses)}")


class RLW(LossBalancer):
    """Random loss weighting (Lin et al. 2022): each step's weights are ``softmax`` of ``K``
    standard-normal draws (they sum to 1), from a ``torch.Generator`` seeded with ``seed``
    whose state is saved with the balancer. One draw per optimizer step: the pieces of a
    micro-batched step share it (it is dropped in ``after_step``)."""

    def __init__(self, task_names: Sequence[str], seed: int = 0) -> None:
        super().__init__(task_names)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"RLW: seed must be an int, got {seed!r}")
        self.generator = torch.Generator().manual_seed(seed)
        self._step_weights: torch.Tensor | None = None

    def weights(self, losses: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._step_weights is None:
            self._step_weights = torch.softmax(torch.randn(
                len(self.task_names), generator=self.generator, dtype=torch.float64), dim=0)
        w = self._step_weights
        return {k: w[i].to(dtype=losses[k].dtype, device=losses[k].device)
                for i, k in enumerate(self.task_names)}

    def after_step(self, losses: Mapping[str, torch.Tensor],
                   recompute: Callable[[], Mapping[str, torch.Tensor]]) -> None:
        self._step_weights = None  # the next step draws anew

    def get_extra_state(self) -> Any:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        self.generator.set_state(state["generator"].cpu())  # a checkpoint loaded onto a GPU

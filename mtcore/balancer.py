"""The loss-balancer contract: how per-task losses become one update of the shared parameters.

A balancer owns the backward pass of the multi-task step, so loss-weighting methods
(``L = sum_k w_k * L_k``), gradient-combining methods (PCGrad, MGDA: they combine the per-task
gradients of the shared parameters) and methods that act after the optimizer step (FAMO: it
compares the losses before and after the update) all fit one interface, and the trainer never
knows a method by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BalanceResult:
    """What one balanced backward did: the scalar objective and the weight given to each task."""

    total: float
    weights: Mapping[str, float]


class LossBalancer(nn.Module):
    """Base class. Subclasses implement ``backward`` (or just ``weights`` for loss weighting).

    Learnable state (e.g. uncertainty log-variances) is registered as ``nn.Parameter``; the trainer
    puts it in its own optimizer parameter group named ``balancer``.
    """

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__()
        if not task_names:
            raise ValueError("a loss balancer needs at least one task")
        self.task_names = tuple(task_names)

    # -- loss weighting ---------------------------------------------------------------------
    def weights(self, losses: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weight ``w_k`` of every task for this step (may depend on learnable parameters)."""
        raise NotImplementedError(f"{type(self).__name__} must implement weights() or backward()")

    def objective(self, losses: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """``sum_k w_k * L_k`` (plus any regulariser a method adds) and the weights as floats."""
        weights = self.weights(losses)
        total = sum(weights[k] * losses[k] for k in self.task_names)
        return total, {k: float(weights[k]) for k in self.task_names}

    # -- the step ---------------------------------------------------------------------------
    def backward(
        self,
        losses: Mapping[str, torch.Tensor],
        shared_params: Sequence[nn.Parameter],
        scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> BalanceResult:
        """Populate ``.grad`` of every parameter that the losses reach.

        ``shared_params`` are the parameters all tasks share (the backbone); gradient-combining
        methods replace their gradient. ``scale`` is applied to a scalar before ``.backward()``
        (the AMP grad scaler); methods that need unscaled per-task gradients may refuse it.
        """
        self._check(losses)
        total, weights = self.objective(losses)
        (scale(total) if scale is not None else total).backward()
        return BalanceResult(total=float(total.detach()), weights=weights)

    def after_step(self, losses: Mapping[str, torch.Tensor],
                   recompute: Callable[[], Mapping[str, torch.Tensor]]) -> None:
        """Called after the optimizer step with the step's losses and a closure that evaluates the
        same batch again without gradients (same random draws, no side effects on the model's
        buffers or the random stream). Default: nothing (FAMO-like methods override)."""

    def after_epoch(self, mean_losses: Mapping[str, float]) -> None:
        """Called at the end of each training epoch with every task's mean loss over it (the
        losses the steps saw, before their updates). Default: nothing (DWA-like methods, which
        weigh by how the losses moved from epoch to epoch, override)."""

    # -- helpers for subclasses ---------------------------------------------------------------
    def _check(self, losses: Mapping[str, torch.Tensor]) -> None:
        missing = [k for k in self.task_names if k not in losses]
        if missing:
            raise KeyError(f"{type(self).__name__}: no loss for task(s) {missing}; got {sorted(losses)}")
        for k in self.task_names:
            if losses[k].dim() != 0:
                raise ValueError(f"loss of task {k!r} must be a scalar, got shape {tuple(losses[k].shape)}")

    def task_gradients(
        self, losses: Mapping[str, torch.Tensor], shared_params: Sequence[nn.Parameter]
    ) -> torch.Tensor:
        """The ``[K, P]`` matrix of each task's gradient w.r.t. the flattened shared parameters."""
        rows = []
        for k in self.task_names:
            grads = torch.autograd.grad(losses[k], shared_params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([
                (g if g is not None else torch.zeros_like(p)).reshape(-1)
                for g, p in zip(grads, shared_params, strict=True)
            ]))
        return torch.stack(rows)

    @staticmethod
    def set_shared_gradient(shared_params: Sequence[nn.Parameter], flat: torch.Tensor) -> None:
        """Write a flat ``[P]`` gradient into ``.grad`` of the shared parameters (accumulating)."""
        offset = 0
        for p in shared_params:
            n = p.numel()
            g = flat[offset:offset + n].view_as(p).to(p.dtype)
            p.grad = g.clone() if p.grad is None else p.grad + g
            offset += n

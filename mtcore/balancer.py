"""The loss-balancer contract: how per-task losses become one update of the shared parameters.

A balancer owns the backward pass of the multi-task step, so loss-weighting methods
(``L = sum_k w_k * L_k``), gradient-combining methods (PCGrad, MGDA, CAGrad: they combine the
per-task gradients of the shared parameters), weightings chosen from those gradients (Nash-MTL,
GradNorm) and methods that act after the optimizer step or epoch (FAMO, DWA) all fit one
interface, and the trainer never knows a method by name. :class:`GradientCombiner` and
:class:`GradientWeighting` hold the autograd plumbing the gradient methods share.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mtcore.distributed import mean_over_processes, process_mean


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
        (the AMP grad scaler, and a micro-batch's share of the batch: the trainer then calls
        this once per piece and the gradients must accumulate); methods that need unscaled
        per-task gradients may refuse it.
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

    def _split(self, losses: Mapping[str, torch.Tensor], shared_params: Sequence[nn.Parameter],
               scale: Callable[[torch.Tensor], torch.Tensor] | None
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[nn.Parameter]]:
        """Checked losses as the gradient methods use them: scaled (AMP), detached, and the
        shared parameters that train."""
        self._check(losses)
        scaled = {k: scale(losses[k]) if scale is not None else losses[k] for k in self.task_names}
        # the whole batch's losses in a data-parallel run (each process holds a share)
        detached = mean_over_processes({k: losses[k] for k in self.task_names})
        return scaled, detached, [p for p in shared_params if p.requires_grad]

    def task_gradients(
        self, losses: Mapping[str, torch.Tensor], shared_params: Sequence[nn.Parameter]
    ) -> torch.Tensor:
        """The ``[K, P]`` matrix of each task's gradient w.r.t. the flattened shared parameters
        (the graph is kept); a loss that reaches none of them, or needs no gradient at all, gives
        a zero row. In a data-parallel run, the whole batch's (averaged over the processes), so
        every process combines the same gradients into the same update."""
        rows = []
        for k in self.task_names:
            if losses[k].requires_grad:
                grads = torch.autograd.grad(losses[k], shared_params, retain_graph=True,
                                            allow_unused=True)
            else:
                grads = (None,) * len(shared_params)
            rows.append(torch.cat([
                (g if g is not None else torch.zeros_like(p)).reshape(-1)
                for g, p in zip(grads, shared_params, strict=True)
            ]))
        return process_mean(torch.stack(rows))

    @staticmethod
    def set_shared_gradient(shared_params: Sequence[nn.Parameter], flat: torch.Tensor) -> None:
        """Write a flat ``[P]`` gradient into ``.grad`` of the shared parameters (accumulating)."""
        offset = 0
        for p in shared_params:
            n = p.numel()
            g = flat[offset:offset + n].view_as(p).to(p.dtype)
            p.grad = g.clone() if p.grad is None else p.grad + g
            offset += n


def active_rows(grads: torch.Tensor) -> torch.Tensor:
    """``[K]`` bool: the tasks whose gradient on the shared parameters is not all zero.

    A task whose loss does not reach the shared parameters (a detached cascade, a GAN with its own
    generator) has a zero row; it competes for nothing there, and in most solvers it would
    dominate (MGDA's min-norm point becomes 0) or diverge (Nash-MTL's weight grows without bound),
    so the gradient methods leave it out. A NaN row counts as active, so it fails visibly."""
    return (grads != 0).any(dim=1)


def solve_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype for a gradient method's products of task gradients (Gram matrices, norms) on
    ``device``: float64, so near-parallel gradients keep their differences, except on Apple's
    MPS, which has no float64 (float32 there; the small solves still run in float64 on the CPU)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


class GradientCombiner(LossBalancer):
    """Base of methods that combine per-task gradients of the shared parameters.

    ``backward`` computes the ``[K, P]`` task-gradient matrix of the shared parameters, lets
    :meth:`combine` turn it into one gradient, and writes that into their ``.grad``; every other
    parameter (the heads) gets the plain sum of its tasks' gradients. A ``scale`` (AMP grad
    scaler) is applied to every loss, so :meth:`combine` sees gradients times the scale ``s``
    (and unscaled losses): it must satisfy ``combine(s G) = s combine(G)`` for the scaler's later
    unscale to be right (PCGrad, MGDA and CAGrad do). Costs K + 1 backward passes (a loss that
    reaches no shared parameter costs next to nothing).
    """

    def combine(self, grads: torch.Tensor, losses: Mapping[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """The combined ``[P]`` gradient and the weight reported for each task."""
        raise NotImplementedError

    def backward(
        self,
        losses: Mapping[str, torch.Tensor],
        shared_params: Sequence[nn.Parameter],
        scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> BalanceResult:
        scaled, detached, params = self._split(losses, shared_params, scale)
        total = sum(scaled[k] for k in self.task_names)
        value = float(sum(detached[k] for k in self.task_names))
        if not params:  # e.g. a frozen backbone: nothing to combine
            if total.requires_grad:
                total.backward()
            return BalanceResult(total=value, weights={k: 1.0 for k in self.task_names})
        grads = self.task_gradients(scaled, params)
        combined, weights = self.combine(grads, detached)
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        if total.requires_grad:
            total.backward()  # the heads' gradients: the plain sum over their tasks
        for p, g in zip(params, saved, strict=True):
            p.grad = g
        self.set_shared_gradient(params, combined)
        return BalanceResult(total=value, weights=weights)


class GradientWeighting(LossBalancer):
    """Base of methods that choose loss weights from the per-task gradients of the shared
    parameters (Nash-MTL, GradNorm): ``backward`` computes the ``[K, P]`` task-gradient matrix,
    asks :meth:`gradient_weights` for the weights ``w_k`` and back-propagates ``sum_k w_k L_k``,
    so the shared parameters get ``sum_k w_k g_k`` and each head its task's gradient times
    ``w_k``. Costs K + 1 backward passes on the steps where :meth:`needs_gradients` is true, one
    on the others. With no trainable shared parameters (a frozen backbone) the weights are
    :meth:`current_weights`. Under AMP the gradients arrive times the loss scale ``s`` (the
    losses unscaled): the weights must not change with ``s`` (Nash-MTL's normalised Gram matrix
    and GradNorm's norm ratios do not), and a gradient set on a learnable weight is unscaled by
    the trainer with the rest."""

    def gradient_weights(self, grads: torch.Tensor, losses: Mapping[str, torch.Tensor]
                         ) -> torch.Tensor:
        """The ``[K]`` weights (float64, CPU) from the task gradients and the detached losses."""
        raise NotImplementedError

    def current_weights(self) -> torch.Tensor:
        """The ``[K]`` weights used without new gradients (default: all 1)."""
        return torch.ones(len(self.task_names), dtype=torch.float64)

    def needs_gradients(self) -> bool:
        """Whether this step computes the task gradients (default: every step)."""
        return True

    def backward(
        self,
        losses: Mapping[str, torch.Tensor],
        shared_params: Sequence[nn.Parameter],
        scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> BalanceResult:
        scaled, detached, params = self._split(losses, shared_params, scale)
        if params and self.needs_gradients():
            w = self.gradient_weights(self.task_gradients(scaled, params), detached)
        else:
            w = self.current_weights()
        weights = {k: float(v) for k, v in zip(self.task_names, w, strict=True)}
        total = sum(weights[k] * scaled[k] for k in self.task_names)
        if isinstance(total, torch.Tensor) and total.requires_grad:
            total.backward()
        value = float(sum(weights[k] * detached[k] for k in self.task_names))
        return BalanceResult(total=value, weights=weights)

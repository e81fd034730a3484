"""GradNorm: gradient normalisation for adaptive loss balancing (Chen, Badrinarayanan, Lee &
Rabinovich 2018, ICML).

Learnable loss weights ``w_k`` are moved so that each task's weighted gradient norm on the shared
parameters, ``G_k = ||grad w_k L_k|| = w_k ||g_k||``, approaches a common target scaled by how far
the task still has to go: ``target_k = mean_j(G_j) * r_k^alpha`` with the relative inverse
training rate ``r_k = (L_k / L_k(0)) / mean_j(L_j / L_j(0))``. The weights take the gradient of
``sum_k |G_k - target_k|`` (the target held constant) and are renormalised to sum to the number of
tasks after every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from mtcore.plugin import GradientWeighting, active_rows, solve_dtype

__all__ = ["GradNorm", "gradnorm_weight_gradient"]


def gradnorm_weight_gradient(weights: torch.Tensor, grad_norms: torch.Tensor,
                             loss_ratios: torch.Tensor, alpha: float) -> torch.Tensor:
    """The gradient of GradNorm's ``sum_k |w_k n_k - mean_j(w_j n_j) r_k^alpha|`` with respect to
    the weights ``w`` (``[K]``), the target held constant: ``sign(w_k n_k - target_k) n_k``.
    ``grad_norms`` are ``n_k = ||g_k||``, ``loss_ratios`` the ``L_k / L_k(0)``."""
    g = weights * grad_norms
    mean_ratio = loss_ratios.mean()
    r = loss_ratios / mean_ratio if mean_ratio > 0 else torch.ones_like(loss_ratios)
    target = g.mean() * r**alpha
    return torch.sign(g - target) * grad_norms


class GradNorm(GradientWeighting):
    """GradNorm (Chen et al. 2018). ``alpha`` (default 1.5, the paper's value for NYUv2) is the
    strength of the pull towards equal training rates; 0 equalises the weighted gradient norms.
    The weights are a parameter trained by the balancer's optimizer group (``optim.groups.balancer``
    sets its learning rate); after each step they are floored at ``min_weight`` and renormalised.

    Differences from the paper, both forced by multi-task backbones with several outputs: the norms
    are taken over all shared parameters, not the last shared layer (heads read different layers
    of a multi-scale backbone, so there is no layer every task passes through); the cost is K + 1
    backward passes, as for PCGrad. Tasks whose gradient on the shared parameters is zero take no
    part and keep weight 1. ``L_k(0)`` is each task's loss at the first step with trainable shared
    parameters (under a staged schedule, the first step with the backbone unfrozen; saved with the
    balancer, so a resumed run keeps it); it must be positive for the tasks that take part, and a
    later negative loss counts as 0 (the task is done). A loss that rises by design (a KL
    warm-up) reads as a task falling behind. A step with a non-finite task gradient leaves the
    weights as they are."""

    def __init__(self, task_names: Sequence[str], alpha: float = 1.5, min_weight: float = 1e-3
                 ) -> None:
        super().__init__(task_names)
        for name, v in (("alpha", alpha), ("min_weight", min_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise ValueError(f"GradNorm: {name} must be a finite number >= 0, got {v!r}")
        if not 0 < min_weight <= 1:
            raise ValueError(f"GradNorm: min_weight must lie in (0, 1], got {min_weight!r}")
        self.alpha, self.min_weight = float(alpha), float(min_weight)
        k = len(self.task_names)
        #: ``w_k`` in the order of ``task_names``
        self.loss_weights = nn.Parameter(torch.ones(k))
        self.register_buffer("initial_losses", torch.full((k,), math.nan))  # float32: any device
        self.register_buffer("active", torch.zeros(k, dtype=torch.bool))
        self._first_step = False  # L_k(0) was just taken from a piece: after_step takes the batch's

    def current_weights(self) -> torch.Tensor:
        return self.loss_weights.detach().to("cpu", torch.float64)

    def gradient_weights(self, grads: torch.Tensor, losses: Mapping[str, torch.Tensor]
                         ) -> torch.Tensor:
        vals = torch.tensor([float(losses[k]) for k in self.task_names], dtype=torch.float64)
        initial = self.initial_losses.to("cpu", torch.float64)
        if torch.isnan(initial).all():  # the first step: L_k(0)
            initial = vals.clone()
            self.initial_losses.copy_(initial)
            self._first_step = True
        active = active_rows(grads).cpu()
        self.active.copy_(active)
        w = self.current_weights()
        if not active.any():
            return w
        bad = [(k, float(initial[i])) for i, k in enumerate(self.task_names)
               if active[i] and not initial[i] > 0]
        if bad:
            raise ValueError(
                "GradNorm: the training rates L_k / L_k(0) need positive first-step losses; got "
                + ", ".join(f"{k} = {v:g}" for k, v in bad)
                + " (shift the loss, or use another balancer)")
        norms = grads.to(solve_dtype(grads.device)).norm(dim=1).to("cpu", torch.float64)
        if not torch.isfinite(norms[active]).all():
            return w  # a non-finite gradient would make the weights NaN for good: skip the update
        gw = torch.zeros_like(w)
        gw[active] = gradnorm_weight_gradient(
            w[active], norms[active], (vals[active] / initial[active]).clamp_min(0.0), self.alpha)
        gw = gw.to(self.loss_weights)
        p = self.loss_weights
        p.grad = gw if p.grad is None else p.grad + gw
        return w

    def after_step(self, losses: Mapping[str, torch.Tensor],
                   recompute: Callable[[], Mapping[str, torch.Tensor]]) -> None:
        """Floor the weights that take part at ``min_weight`` and rescale them to sum to their
        number; the others are reset to 1 (weight decay would otherwise shrink them)."""
        if self._first_step:  # L_k(0) is the first batch's, not its first micro-batch's
            self.initial_losses.copy_(torch.tensor([float(losses[k].detach()) for k in self.task_names]))
            self._first_step = False
        with torch.no_grad():
            w, active = self.loss_weights, self.active
            if active.any():
                w[active] = w[active].clamp_min(self.min_weight)
                w[active] = w[active] * (active.sum() / w[active].sum())
            w[~active] = 1.0

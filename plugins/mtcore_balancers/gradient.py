"""Gradient-combining balancers: PCGrad and MGDA replace the shared parameters' gradient (the
autograd plumbing is the core's :class:`~mtcore.balancer.GradientCombiner`).

Each method is a pure function on the ``[K, P]`` matrix of per-task gradients (``pcgrad_combine``,
``min_norm_weights``), so it can be tested on fixed small matrices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mtcore.plugin import GradientCombiner, active_rows, solve_dtype

__all__ = ["MGDA", "NORMALIZATIONS", "PCGrad", "min_norm_weights", "pcgrad_combine",
           "two_task_min_norm"]


# -- pure math ----------------------------------------------------------------------------------
def pcgrad_combine(grads: torch.Tensor, orders: Sequence[Sequence[int]]) -> torch.Tensor:
    """PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning"): for each task ``i``,
    visit the other tasks in ``orders[i]`` and, where the (partly projected) ``g_i`` conflicts with
    the original ``g_j`` (``<g_i, g_j> < 0``), remove its component along ``g_j``; return the sum
    of the projected gradients. ``grads`` is ``[K, P]``."""
    if grads.dim() != 2:
        raise ValueError(f"pcgrad_combine: grads must be [K, P], got shape {tuple(grads.shape)}")
    sq_norms = (grads * grads).sum(dim=1)
    tiny = torch.finfo(grads.dtype).tiny
    projected = []
    for i in range(grads.shape[0]):
        g = grads[i].clone()
        for j in orders[i]:
            if j == i:
                continue
            dot = torch.dot(g, grads[j])
            # branch-free: no host sync per pair; a zero g_j gives dot == 0 and no change
            g = g - torch.clamp(dot, max=0.0) / sq_norms[j].clamp_min(tiny) * grads[j]
        projected.append(g)
    return torch.stack(projected).sum(dim=0)


def two_task_min_norm(g11: float, g12: float, g22: float) -> float:
    """The ``gamma`` in [0, 1] minimising ``||gamma g1 + (1 - gamma) g2||^2`` given the Gram
    entries (Sener & Koltun 2018, Algorithm 1); 0.5 when ``g1 == g2``."""
    denom = g11 + g22 - 2.0 * g12
    if denom <= 0.0:  # g1 == g2: every gamma gives the same point
        return 0.5
    return min(1.0, max(0.0, (g22 - g12) / denom))


def min_norm_weights(gram: torch.Tensor, max_iter: int = 250, tol: float = 1e-6) -> torch.Tensor:
    """The convex weights ``alpha`` of the min-norm point of the convex hull of the gradients whose
    Gram matrix is ``gram`` (Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective
    Optimization"): exact for 2 tasks, Frank-Wolfe with exact line search (started from the best
    pair) for more. Returns a float64 CPU vector summing to 1."""
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"min_norm_weights: gram must be [K, K], got shape {tuple(gram.shape)}")
    m = gram.detach().to(device="cpu", dtype=torch.float64)
    k = m.shape[0]
    alpha = torch.zeros(k, dtype=torch.float64)
    if k == 1:
        alpha[0] = 1.0
        return alpha
    # best pair by the closed form: the start of Frank-Wolfe, and the answer for K == 2
    best = math.inf
    for i in range(k):
        for j in range(i + 1, k):
            g11, g12, g22 = float(m[i, i]), float(m[i, j]), float(m[j, j])
            gamma = two_task_min_norm(g11, g12, g22)
            norm = gamma**2 * g11 + 2 * gamma * (1 - gamma) * g12 + (1 - gamma) ** 2 * g22
            if norm < best:
                best = norm
                alpha.zero_()
                alpha[i], alpha[j] = gamma, 1.0 - gamma
    if k == 2:
        return alpha
    for _ in range(max_iter):
        grad = m @ alpha  # <v, g_t> for every t, with v = sum_k alpha_k g_k
        t = int(torch.argmin(grad))
        vv, vt, tt = float(alpha @ grad), float(grad[t]), float(m[t, t])
        gamma = two_task_min_norm(tt, vt, vv)  # weight on g_t versus the current point v
        new = (1.0 - gamma) * alpha
        new[t] += gamma
        change = float((new - alpha).abs().sum())
        alpha = new
        if change < tol:
            break
    return alpha


# -- the balancers ------------------------------------------------------------------------------
class PCGrad(GradientCombiner):
    """Projecting conflicting gradients (Yu et al. 2020), the task order drawn per task and step
    from a ``torch.Generator`` seeded with ``seed`` (its state is saved in the state dict)."""

    def __init__(self, task_names: Sequence[str], seed: int = 0) -> None:
        super().__init__(task_names)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"PCGrad: seed must be an int, got {seed!r}")
        self.generator = torch.Generator().manual_seed(seed)

    def combine(self, grads: torch.Tensor, losses: Mapping[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, float]]:
        k = len(self.task_names)
        orders = [torch.randperm(k, generator=self.generator).tolist() for _ in range(k)]
        return pcgrad_combine(grads, orders), {t: 1.0 for t in self.task_names}

    def get_extra_state(self) -> Any:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        self.generator.set_state(state["generator"].cpu())  # a checkpoint loaded onto a GPU


NORMALIZATIONS: tuple[str, ...] = ("none", "l2", "loss")


class MGDA(GradientCombiner):
    """MGDA-UB's min-norm solver (Sener & Koltun 2018): ``alpha`` = min-norm convex weights of the
    per-task gradients, each first divided by its normaliser (``"none"``: 1, ``"l2"``: its norm,
    ``"loss"``: its loss); the shared gradient is ``sum_k alpha_k g_k`` of the raw gradients, as
    in the paper's code, and the reported weights are the ``alpha_k``. With ``"none"`` the result
    is the min-norm point, which no task's gradient conflicts with. Tasks whose gradient on the
    shared parameters is zero take no part in the solve (alpha 0)."""

    def __init__(self, task_names: Sequence[str], normalization: str = "none",
                 max_iter: int = 250, tol: float = 1e-6) -> None:
        super().__init__(task_names)
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"MGDA: normalization must be one of {list(NORMALIZATIONS)}, got {normalization!r}"
            )
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"MGDA: max_iter must be an int >= 1, got {max_iter!r}")
        if not isinstance(tol, (int, float)) or not tol >= 0:
            raise ValueError(f"MGDA: tol must be a number >= 0, got {tol!r}")
        self.normalization = normalization
        self.max_iter = max_iter
        self.tol = float(tol)

    def normalizers(self, grads: torch.Tensor, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The ``[K]`` divisors of the task gradients before the min-norm solve."""
        eps = 1e-12
        dtype = solve_dtype(grads.device)
        if self.normalization == "l2":
            return grads.to(dtype).norm(dim=1).clamp_min(eps)
        if self.normalization == "loss":
            vals = torch.stack([losses[k].detach().to(grads.device, dtype)
                                for k in self.task_names])
            return vals.abs().clamp_min(eps)
        return torch.ones(grads.shape[0], dtype=dtype, device=grads.device)

    def combine(self, grads: torch.Tensor, losses: Mapping[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, float]]:
        # with a zero row in the solve the min-norm point is 0 and the backbone never trains
        active = active_rows(grads)
        alpha = torch.zeros(grads.shape[0], dtype=torch.float64)  # CPU
        if active.any():
            sub = (grads[active].to(solve_dtype(grads.device))
                   / self.normalizers(grads, losses)[active, None])
            alpha[active.cpu()] = min_norm_weights(sub @ sub.T, self.max_iter, self.tol)
        combined = alpha.to(grads) @ grads
        return combined, {k: float(a) for k, a in zip(self.task_names, alpha, strict=True)}

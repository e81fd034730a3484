"""CAGrad: conflict-averse gradient descent (Liu, Liu, Jin, Stone & Liu 2021, NeurIPS).

The shared update ``d`` maximises the worst task's improvement ``min_i <g_i, d>`` within a ball
around the average gradient: ``||d - g_0|| <= c ||g_0||``. Its dual is a small convex problem
over the simplex, ``min_w <g_w, g_0> + c ||g_0|| ||g_w||`` with ``g_w = sum_i w_i g_i``, and the
update is ``d = g_0 + (c ||g_0|| / ||g_w||) g_w``. ``c = 0`` is plain gradient descent on the
mean loss; larger ``c`` moves towards the worst-off task.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from mtcore.plugin import GradientCombiner, active_rows, solve_dtype

__all__ = ["RESCALES", "CAGrad", "cagrad_coefficients", "cagrad_direction", "cagrad_weights",
           "project_to_simplex"]

#: how the update is divided afterwards, as in the paper's code: 0 by 1, 1 by 1 + c^2, 2 by 1 + c
RESCALES = (0, 1, 2)


def project_to_simplex(v: np.ndarray) -> np.ndarray:
    """The Euclidean projection of ``v`` onto ``{w >= 0, sum w = 1}`` (the sort-based method of
    Duchi, Shalev-Shwartz, Singer & Chandra 2008)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    rho = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1.0), 0.0)


def cagrad_weights(gram: np.ndarray | torch.Tensor, c: float, max_iter: int = 1000,
                   tol: float = 1e-10) -> np.ndarray:
    """The simplex weights ``w`` minimising ``w^T A b + c sqrt(b^T A b) sqrt(w^T A w)``, ``A`` the
    ``[K, K]`` Gram matrix of the task gradients and ``b`` the uniform weights: CAGrad's dual
    problem, solved by projected gradient descent with backtracking. The objective is homogeneous
    in ``A``, so ``A`` is first divided by its mean diagonal (the answer does not change)."""
    a = np.asarray(gram.detach().to("cpu", torch.float64) if isinstance(gram, torch.Tensor) else gram,
                   dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"cagrad_weights: gram must be [K, K], got shape {a.shape}")
    k = a.shape[0]
    b = np.full(k, 1.0 / k)
    scale = np.trace(a) / k
    if k == 1 or not np.isfinite(a).all() or not scale > 0:
        return b  # one task, no gradient at all, or non-finite gradients (they stay visible)
    a = a / scale
    ab = a @ b
    cc = c * math.sqrt(max(float(b @ ab), 0.0))
    eps = 1e-18  # keeps the square root differentiable where g_w = 0

    def f(w: np.ndarray) -> float:
        return float(w @ ab + cc * math.sqrt(max(float(w @ a @ w), 0.0) + eps))

    def grad(w: np.ndarray) -> np.ndarray:
        aw = a @ w
        return ab + cc * aw / math.sqrt(max(float(w @ aw), 0.0) + eps)

    w, fw, t = b.copy(), f(b), 1.0
    for _ in range(max_iter):
        g = grad(w)
        while True:  # backtracking: the quadratic upper bound at step t must hold
            new = project_to_simplex(w - t * g)
            dw = new - w
            f_new = f(new)
            if f_new <= fw + float(g @ dw) + float(dw @ dw) / (2.0 * t) + 1e-15 or t < 1e-20:
                break
            t *= 0.5
        stalled = f_new >= fw - 1e-15 * max(1.0, abs(fw))  # float64 precision reached
        w, fw, t = new, min(f_new, fw), t * 2.0
        if float(np.abs(dw).sum()) <= tol or stalled:
            break
    return w


def cagrad_coefficients(gram: torch.Tensor, c: float, rescale: int = 1) -> torch.Tensor:
    """The ``[K]`` coefficients ``a`` of CAGrad's update ``d = sum_i a_i g_i`` from the Gram
    matrix of the task gradients: ``d = (g_0 + c ||g_0|| g_w / ||g_w||)`` divided as ``rescale``
    says (``RESCALES``), so ``a_i = (1/K + lambda w_i) / divisor`` with
    ``lambda = c ||g_0|| / ||g_w||`` (both norms read off the Gram matrix)."""
    if rescale not in RESCALES:
        raise ValueError(f"cagrad_direction: rescale must be one of {list(RESCALES)}, got {rescale!r}")
    a = gram.detach().to("cpu", torch.float64)  # [K, K]: solved on the CPU, whatever the device
    k = a.shape[0]
    w = torch.from_numpy(cagrad_weights(a, c))
    b = torch.full((k,), 1.0 / k, dtype=torch.float64)
    gw_norm = (w @ a @ w).clamp_min(0).sqrt()
    lam = c * (b @ a @ b).clamp_min(0).sqrt() / gw_norm if gw_norm > 0 else 0.0
    return (b + lam * w) / {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]


def cagrad_direction(grads: torch.Tensor, c: float, rescale: int = 1) -> torch.Tensor:
    """CAGrad's update for the ``[K, P]`` task gradients: ``(g_0 + c ||g_0|| g_w / ||g_w||)``
    divided as ``rescale`` says (``RESCALES``); ``g_0`` is the mean gradient, so with ``c = 0``
    and ``rescale = 0`` this is ``g_0``."""
    if grads.dim() != 2:
        raise ValueError(f"cagrad_direction: grads must be [K, P], got shape {tuple(grads.shape)}")
    g = grads.to(solve_dtype(grads.device))
    return (cagrad_coefficients(g @ g.T, c, rescale).to(g) @ g).to(grads.dtype)


class CAGrad(GradientCombiner):
    """CAGrad (Liu et al. 2021) on the shared parameters: their gradient is ``K`` times
    :func:`cagrad_direction` (``K`` tasks, so that it matches the scale of the plain sum the heads
    get, as in the paper's code). ``c`` (default 0.4, the paper's multi-task setting) sets the
    radius of the ball around the mean gradient. Tasks whose gradient on the shared parameters is
    zero take no part (they would pull the solve to ``g_w = 0``, i.e. plain averaging); the
    reported weights are each task's coefficient in the shared gradient (0 for those)."""

    def __init__(self, task_names: Sequence[str], c: float = 0.4, rescale: int = 1) -> None:
        super().__init__(task_names)
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c < math.inf:
            raise ValueError(f"CAGrad: c must be a finite number >= 0, got {c!r}")
        if rescale not in RESCALES or isinstance(rescale, bool):
            raise ValueError(f"CAGrad: rescale must be one of {list(RESCALES)}, got {rescale!r}")
        self.c, self.rescale = float(c), rescale

    def combine(self, grads: torch.Tensor, losses: Mapping[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, float]]:
        active = active_rows(grads)
        coef = torch.zeros(grads.shape[0], dtype=torch.float64)  # CPU
        if active.any():  # K times the update, to match the plain sum the heads get
            sub = grads[active].to(solve_dtype(grads.device))
            coef[active.cpu()] = sub.shape[0] * cagrad_coefficients(sub @ sub.T, self.c,
                                                                    self.rescale)
        combined = coef.to(grads) @ grads
        return combined, {k: float(v) for k, v in zip(self.task_names, coef, strict=True)}

"""Nash-MTL: multi-task learning as a bargaining game (Navon, Shamsian, Achituve, Maron,
Kawaguchi, Chechik & Fetaya 2022, ICML).

The shared update is the Nash bargaining solution ``d = sum_i alpha_i g_i`` with ``alpha > 0``
solving ``G^T G alpha = 1 / alpha`` (element-wise): every task's improvement ``<g_i, d>`` equals
``1 / alpha_i``, and the update does not change when a task's loss is scaled (its ``alpha``
scales inversely).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from mtcore.plugin import GradientWeighting, active_rows, solve_dtype

__all__ = ["NashMTL", "nash_mtl_weights"]


def nash_mtl_weights(gram: np.ndarray | torch.Tensor, max_iter: int = 100, tol: float = 1e-9,
                     ridge: float = 1e-12) -> np.ndarray:
    """``alpha > 0`` with ``A alpha = 1 / alpha`` for ``A`` the ``[K, K]`` Gram matrix of the task
    gradients divided by its Frobenius norm (as the paper's code does, so the weights do not
    depend on the gradients' overall scale) plus ``ridge`` on the diagonal.

    ``alpha`` is the minimiser of the strictly convex ``alpha^T A alpha / 2 - sum_i log alpha_i``
    (its gradient is ``A alpha - 1 / alpha``), found by damped Newton steps that keep it positive.
    Without the ridge there is no solution when some positive combination of the gradients is
    zero (a Pareto-stationary point): the weights then grow to about ``ridge^-1/2``; elsewhere it
    moves ``alpha_i (A alpha)_i`` from 1 by ``ridge * alpha_i^2``."""
    a = np.asarray(gram.detach().to("cpu", torch.float64) if isinstance(gram, torch.Tensor) else gram,
                   dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"nash_mtl_weights: gram must be [K, K], got shape {a.shape}")
    k = a.shape[0]
    norm = np.linalg.norm(a)
    if not np.isfinite(a).all() or not norm > 0:
        return np.ones(k)  # no gradient at all, or non-finite gradients (they stay visible)
    a = a / norm + ridge * np.eye(k)
    alpha = 1.0 / np.sqrt(np.diag(a))  # the answer when the gradients are orthogonal

    def f(x: np.ndarray) -> float:
        return float(0.5 * x @ a @ x - np.log(x).sum())

    for _ in range(max_iter):
        a_alpha = a @ alpha
        if np.max(np.abs(alpha * a_alpha - 1.0)) < tol:
            break
        g = a_alpha - 1.0 / alpha
        step = np.linalg.solve(a + np.diag(1.0 / alpha**2), g)
        t = 1.0
        while np.any(alpha - t * step <= 0):  # stay in alpha > 0
            t *= 0.5
        f0, decrement = f(alpha), float(g @ step)
        while f(alpha - t * step) > f0 - 0.25 * t * decrement and t > 1e-12:  # Armijo
            t *= 0.5
        if t <= 1e-12:  # no decrease left at float64 precision: converged as far as it goes
            break
        alpha = alpha - t * step
    return alpha


class NashMTL(GradientWeighting):
    """Nash-MTL (Navon et al. 2022): the loss weights are :func:`nash_mtl_weights` of the shared
    parameters' task gradients, so the shared gradient is the bargaining solution and each head
    gets its task's gradient times ``alpha_k``. ``update_every = n`` solves every ``n``-th step
    and reuses the weights in between (one backward pass instead of K + 1; the paper's code offers
    the same). Tasks whose gradient on the shared parameters is zero have no bargaining position
    (their ``alpha`` would grow without bound): they keep weight 1. Near a Pareto-stationary point
    the weights grow large; keep ``optim.grad_clip`` on (the paper's code clips the shared
    gradient to norm 1)."""

    def __init__(self, task_names: Sequence[str], update_every: int = 1, max_iter: int = 100
                 ) -> None:
        super().__init__(task_names)
        for name, v in (("update_every", update_every), ("max_iter", max_iter)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"NashMTL: {name} must be an int >= 1, got {v!r}")
        self.update_every, self.max_iter = update_every, max_iter
        self.register_buffer("alpha", torch.ones(len(self.task_names)))  # float32: any device
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("solved", torch.zeros((), dtype=torch.bool))

    def needs_gradients(self) -> bool:
        # until a first solve (e.g. after a frozen-backbone stage) every step solves
        return not bool(self.solved) or int(self.steps) % self.update_every == 0

    def current_weights(self) -> torch.Tensor:
        return self.alpha.detach().to("cpu", torch.float64)

    def gradient_weights(self, grads: torch.Tensor, losses: Mapping[str, torch.Tensor]
                         ) -> torch.Tensor:
        active = active_rows(grads).cpu()
        alpha = torch.ones(grads.shape[0], dtype=torch.float64)
        if active.any():
            sub = grads[active.to(grads.device)].to(solve_dtype(grads.device))
            alpha[active] = torch.from_numpy(nash_mtl_weights(sub @ sub.T, self.max_iter))
        self.alpha.copy_(alpha)
        self.solved.fill_(True)
        return alpha

    def after_step(self, losses: Mapping[str, torch.Tensor],
                   recompute: Callable[[], Mapping[str, torch.Tensor]]) -> None:
        """Count the step (``update_every``)."""
        self.steps += 1

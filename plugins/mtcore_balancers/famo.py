"""FAMO: Fast Adaptive Multitask Optimization (Liu, Liu, Jin, Stone & Liu 2023, NeurIPS).

FAMO minimises a weighted sum of log losses with weights ``z = softmax(xi)`` and learns the logits
``xi`` from how much each log loss actually dropped over the step, with O(1) extra cost per step
(no per-task gradients).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch

from mtcore.plugin import LossBalancer

#: keeps ``log(L_k - min_k + EPS)`` finite when a loss reaches its lower bound (as in the paper's code)
EPS = 1e-8


class FAMO(LossBalancer):
    """FAMO. Objective ``sum_k (z_k / c) log(L_k - m_k + eps)`` with ``c = sum_k z_k / (L_k - m_k
    + eps)`` held constant, so the gradient is ``sum_k w_k grad L_k`` with effective weights
    ``w_k = z_k / (c (L_k - m_k))`` that sum to 1 (these are the reported weights).

    After the optimizer step, with ``delta_k = log(L_k - m_k)`` before minus after the step (same
    batch), the logits take one Adam step (``lr``, L2 weight decay ``gamma``) along the gradient
    ``J_softmax(xi)^T delta``: tasks whose loss dropped less gain weight. ``m_k`` are the losses'
    lower bounds (``min_losses``, default 0); losses must stay above them.
    """

    def __init__(self, task_names: Sequence[str], lr: float = 0.025, gamma: float = 0.001,
                 min_losses: Mapping[str, float] | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(task_names)
        for name, v in (("lr", lr), ("gamma", gamma), ("eps", eps)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise ValueError(f"FAMO: {name} must be a finite number >= 0, got {v!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"FAMO: betas must be two numbers in [0, 1), got {betas!r}")
        mins = dict(min_losses or {})
        unknown = [k for k in mins if k not in self.task_names]
        if unknown:
            raise ValueError(
                f"FAMO: min_losses names unknown task(s) {unknown}; the tasks are "
                f"{list(self.task_names)}"
            )
        self.lr, self.gamma, self.betas, self.eps = float(lr), float(gamma), tuple(betas), eps
        k = len(self.task_names)
        # buffers, not parameters: the trainer's optimizer must not touch the logits
        self.register_buffer("logits", torch.zeros(k))
        self.register_buffer("min_losses", torch.tensor([float(mins.get(t, 0.0))
                                                         for t in self.task_names]))
        self.register_buffer("exp_avg", torch.zeros(k))
        self.register_buffer("exp_avg_sq", torch.zeros(k))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def task_weights(self) -> dict[str, float]:
        """The softmax task weights ``z_k`` (before the division by the loss levels)."""
        z = torch.softmax(self.logits, dim=0)
        return {k: float(z[i]) for i, k in enumerate(self.task_names)}

    def _gaps(self, losses: Mapping[str, torch.Tensor], when: str,
              check: bool = False) -> torch.Tensor:
        """``[K]`` tensor of ``L_k - m_k + EPS`` (keeping the graph); with ``check`` a ValueError
        unless all are positive."""
        missing = [k for k in self.task_names if k not in losses]
        if missing:
            raise KeyError(f"FAMO: no loss for task(s) {missing} {when}; got {sorted(losses)}")
        vals = torch.stack([losses[k].reshape(()).float() for k in self.task_names])
        gaps = vals - self.min_losses.to(vals.device) + EPS
        if not check:
            return gaps
        gap_list, val_list = gaps.detach().tolist(), vals.detach().tolist()
        bad = [(k, v) for k, v, g in zip(self.task_names, val_list, gap_list, strict=True)
               if not g > 0]  # also catches NaN
        if bad:
            raise ValueError(
                "FAMO needs every loss above its lower bound (min_losses, default 0) because it "
                f"takes their log; got {bad} with bounds "
                f"{dict(zip(self.task_names, self.min_losses.tolist(), strict=True))}"
            )
        return gaps

    def objective(self, losses: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted log-loss ``sum_k (z_k / c) log(L_k - m_k + eps)`` and the effective weights."""
        gaps = self._gaps(losses, "in the step", check=True)
        z = torch.softmax(self.logits.to(gaps.device), dim=0)
        c = (z / gaps.detach()).sum()
        total = (z / c * gaps.log()).sum()
        eff = (z / (c * gaps.detach())).tolist()
        return total, dict(zip(self.task_names, eff, strict=True))

    @torch.no_grad()
    def after_step(self, losses: Mapping[str, torch.Tensor],
                   recompute: Callable[[], Mapping[str, torch.Tensor]]) -> None:
        """Update the logits from the drop of each log loss over the optimizer step."""
        before = self._gaps({k: v.detach() for k, v in losses.items()}, "before the step")
        after = self._gaps(recompute(), "from recompute()").to(before.device)
        delta = before.log() - after.log()
        if not bool(torch.isfinite(delta).all()):
            warnings.warn(
                "FAMO: a loss was non-positive or non-finite before or after the step; the task "
                "weights were not updated this step", RuntimeWarning, stacklevel=2,
            )
            return
        logits = self.logits
        z = torch.softmax(logits, dim=0)
        grad = z * (delta.to(z.device) - (z * delta.to(z.device)).sum())  # J_softmax^T delta
        self._adam_step(grad)

    def _adam_step(self, grad: torch.Tensor) -> None:
        """One Adam step (Kingma & Ba 2015; L2 weight decay as in ``torch.optim.Adam``) on the
        logits; the moments live in buffers so a checkpoint resumes it exactly."""
        b1, b2 = self.betas
        self.steps += 1
        t = int(self.steps)
        grad = grad + self.gamma * self.logits
        self.exp_avg.mul_(b1).add_(grad, alpha=1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.exp_avg_sq / (1 - b2**t)).sqrt_().add_(self.eps)
        self.logits.addcdiv_(self.exp_avg, denom, value=-self.lr / (1 - b1**t))

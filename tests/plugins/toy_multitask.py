"""A toy multi-task model for the balancer tests: a shared linear-tanh trunk, one linear head per
task, positive losses; and helpers that take gradients of a loss."""

from __future__ import annotations

import torch
from torch import nn

TASKS = ("a", "b", "c")


class Toy(nn.Module):
    """A shared linear-tanh trunk and one linear head per task; losses are positive."""

    def __init__(self, tasks=TASKS, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.shared = nn.Linear(3, 4).double()
        self.heads = nn.ModuleDict({k: nn.Linear(4, 2).double() for k in tasks})
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        self.x = torch.randn(6, 3, generator=g, dtype=torch.float64)
        self.y = {k: torch.randn(6, 2, generator=g, dtype=torch.float64) for k in tasks}

    def losses(self) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.shared(self.x))
        return {k: ((head(h) - self.y[k]) ** 2).mean() for k, head in self.heads.items()}

    def shared_params(self) -> list[nn.Parameter]:
        return list(self.shared.parameters())


def grads_of(loss: torch.Tensor, params) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True))


def flat_grad(loss, params) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads_of(loss, params)])


def toy_gradients(model: Toy):
    """A fresh step of ``model``: its losses, shared parameters, the ``[K, P]`` task gradients
    on them and each head's own gradients, taken independently of any balancer."""
    losses = model.losses()
    shared = model.shared_params()
    grads = torch.stack([flat_grad(losses[k], shared) for k in model.heads])
    heads = {k: grads_of(losses[k], model.heads[k].parameters()) for k in model.heads}
    return losses, shared, grads, heads

"""Optimizers with per-part parameter groups, and step-based learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn


def make_optimizer(groups: list[dict[str, Any]], optim_cfg: Mapping[str, Any],
                   override: Mapping[str, Any] | None = None) -> torch.optim.Optimizer:
    """One optimizer over named parameter groups; each group may override lr/betas/decay."""
    base = {k: optim_cfg[k] for k in ("lr", "weight_decay") if k in optim_cfg}
    kind = optim_cfg.get("optimizer", "adamw")
    params = []
    not_torch = ("grad_clip", "schedule")  # group options the trainer and scheduler read
    for g in groups:
        entry = {"params": g["params"], "name": g["name"], **base}
        entry.update({k: v for k, v in (override or {}).items() if k not in not_torch})
        entry.update({k: v for k, v in g.get("options", {}).items() if k not in not_torch})
        if "betas" in entry:
            entry["betas"] = tuple(entry["betas"])
        if kind == "sgd":
            entry.pop("betas", None)
            entry.setdefault("momentum", optim_cfg.get("momentum", 0.9))
        else:
            entry.pop("momentum", None)
            entry.setdefault("betas", tuple(optim_cfg.get("betas", (0.9, 0.999))))
        params.append(entry)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=base["lr"])
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return cls(params, lr=base["lr"])


def make_schedule(opt: torch.optim.Optimizer, optim_cfg: Mapping[str, Any], steps_per_epoch: int,
                  lr_scale=lambda step: 1.0,
                  kinds: list[str | None] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step multiplier: linear warm-up, then constant / cosine / step / one-cycle decay.

    ``lr_scale(step)`` multiplies it (the transfer strategy's per-stage scale). ``kinds`` gives
    each parameter group its own schedule (None: ``optim_cfg["schedule"]``), e.g. a constant
    rate for a GAN while the rest decays.
    """
    epochs = optim_cfg["epochs"]
    total = max(1, epochs * steps_per_epoch)
    warm = int(optim_cfg.get("warmup_epochs", 0) * steps_per_epoch)
    default = optim_cfg.get("schedule", "constant")
    step_size = optim_cfg.get("step_size", max(1, epochs // 3)) * steps_per_epoch
    gamma = optim_cfg.get("gamma", 0.1)
    kinds = list(kinds) if kinds is not None else [None] * len(opt.param_groups)
    if len(kinds) != len(opt.param_groups):
        raise ValueError(f"make_schedule: {len(kinds)} schedule kinds for "
                         f"{len(opt.param_groups)} parameter groups")
    return torch.optim.lr_scheduler.LambdaLR(
        opt, [_factor(k or default, total, warm, step_size, gamma, lr_scale) for k in kinds])


def _factor(kind: str, total: int, warm: int, step_size: int, gamma: float,
            lr_scale) -> Callable[[int], float]:
    """The multiplier of one schedule ``kind`` as a function of the step."""

    def factor(step: int) -> float:
        if warm and step < warm:
            f = (step + 1) / warm
        elif kind == "cosine":
            t = (step - warm) / max(1, total - warm)
            f = 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        elif kind == "step":
            f = gamma ** ((step - warm) // step_size)
        elif kind == "onecycle":
            t = step / total
            f = min(1.0, t / 0.3) if t < 0.3 else 0.5 * (1 + math.cos(math.pi * (t - 0.3) / 0.7))
            f = max(f, 0.04)
        else:
            f = 1.0
        return f * lr_scale(step)

    return factor


def clip(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm when ``max_norm > 0``; returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if max_norm <= 0 or not params:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

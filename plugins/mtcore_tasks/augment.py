"""Differentiable augmentation of the discriminator's inputs (DiffAugment, Zhao et al. 2020).

Reals and fakes go through the same random transforms before D, in the D step and the G step
alike, so D cannot tell them apart by anything the transforms destroy and the generator still gets
gradients (every transform is differentiable in the image). Images are in D's input range [-1, 1];
each sample draws its own parameters from torch's global generator (seeded runs repeat them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _uniform(x: Tensor, low: float, high: float) -> Tensor:
    """One draw per sample, shaped to broadcast over [C, H, W]."""
    return low + (high - low) * torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype)


def color(x: Tensor) -> Tensor:
    """Brightness shift in [-0.5, 0.5], saturation x [0, 2], contrast x [0.5, 1.5]."""
    x = x + _uniform(x, -0.5, 0.5)
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * _uniform(x, 0.0, 2.0) + mean_c
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _uniform(x, 0.5, 1.5) + mean


def translation(x: Tensor, ratio: float = 0.125) -> Tensor:
    """Shift by up to ``ratio`` of the side each way; uncovered pixels are 0 (mid-grey)."""
    n, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = torch.randint(-sy, sy + 1, (n, 1, 1), device=x.device)
    tx = torch.randint(-sx, sx + 1, (n, 1, 1), device=x.device)
    # source row/col of each output pixel in the 1-pixel zero-padded image (0 and h+1 are padding)
    rows = (torch.arange(h, device=x.device).view(1, h, 1) - ty + 1).clamp(0, h + 1)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) - tx + 1).clamp(0, w + 1)
    padded = F.pad(x, (1, 1, 1, 1))
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def cutout(x: Tensor, ratio: float = 0.5) -> Tensor:
    """Zero a square of side ``ratio`` of the image at a random place (may overhang the border).

    The top-left corner is uniform over the positions that overlap the image by at least half a
    side, so every row (column) is covered equally often from either border."""
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(0, h + 1 - sh % 2, (n, 1, 1), device=x.device) - sh // 2
    left = torch.randint(0, w + 1 - sw % 2, (n, 1, 1), device=x.device) - sw // 2
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (ys >= top) & (ys < top + sh) & (xs >= left) & (xs < left + sw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


POLICIES: dict[str, Callable[[Tensor], Tensor]] = {
    "color": color, "translation": translation, "cutout": cutout,
}


def check_policy(policy: Sequence[str]) -> tuple[str, ...]:
    """The policy as a tuple; a clear error for an unknown transform name."""
    if isinstance(policy, str):
        policy = [p for p in policy.split(",") if p]
    unknown = [p for p in policy if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; choose from {sorted(POLICIES)}")
    return tuple(policy)


def diff_augment(x: Tensor, policy: Sequence[str]) -> Tensor:
    """Apply the transforms of ``policy`` in order (each with fresh random parameters)."""
    for name in policy:
        x = POLICIES[name](x)
    return x

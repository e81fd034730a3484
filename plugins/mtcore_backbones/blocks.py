"""Building blocks shared by the backbones: norm layers, conv-norm-ReLU, residual blocks, checks.

Everything here uses plain ``nn.Conv2d``/norm/activation modules, so a model converted with
``.to(memory_format=torch.channels_last)`` stays channels-last end to end. ``ConvNormAct`` is a
:class:`mtcore.kernels.FusedSequential`: its BatchNorm + ReLU run as one fused kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtcore.kernels import FusedSequential

NORMS: tuple[str, ...] = ("batch", "group", "none")

#: upper bound on GroupNorm groups; the largest divisor of the channel count up to this is used.
MAX_GROUPS = 8


# -- parameter checks ---------------------------------------------------------------------------
def check_positive_int(owner: str, name: str, value: object) -> int:
    """``value`` as an int >= 1, or a TypeError/ValueError naming ``owner`` and ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be >= 1, got {value}")
    return value


def check_norm(owner: str, norm: object) -> str:
    """``norm`` if it is one of :data:`NORMS`, else a ValueError listing the choices."""
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"{owner}: norm must be one of {list(NORMS)}, got {norm!r}")
    return norm


def check_images(owner: str, images: object, in_channels: int, multiple: int) -> None:
    """Check that ``images`` is a float ``[N, in_channels, H, W]`` batch with H, W divisible by
    ``multiple`` (the coarsest stride), so every declared stride holds exactly."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{owner}: images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != in_channels:
        raise ValueError(
            f"{owner}: images must have shape [N, {in_channels}, H, W], got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise TypeError(f"{owner}: images must be a floating-point tensor, got dtype {images.dtype}")
    h, w = images.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(
            f"{owner}: image height and width must be divisible by {multiple} (the coarsest "
            f"stride), got images of shape {tuple(images.shape)}; resize or pad the images, or "
            f"use fewer stages"
        )


# -- layers -------------------------------------------------------------------------------------
def group_count(channels: int) -> int:
    """The largest divisor of ``channels`` that is at most :data:`MAX_GROUPS`."""
    return max(g for g in range(1, min(MAX_GROUPS, channels) + 1) if channels % g == 0)


def make_norm(norm: str, channels: int) -> nn.Module:
    """The normalisation layer named ``norm`` for ``channels`` channels (Identity for "none")."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(group_count(channels), channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")


class ConvNormAct(FusedSequential):
    """3x3 (or ``kernel``) conv -> norm -> ReLU; the conv has a bias only when there is no norm.
    BatchNorm + ReLU run fused (:class:`mtcore.kernels.FusedSequential`)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, stride: int = 1,
                 kernel: int = 3, act: bool = True) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2,
                      bias=norm == "none"),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True) if act else nn.Identity(),
        )


class DoubleConv(nn.Sequential):
    """Two conv-norm-ReLU layers at one resolution, the unit of U-Net (Ronneberger et al. 2015)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__(
            ConvNormAct(in_channels, out_channels, norm),
            ConvNormAct(out_channels, out_channels, norm),
        )


class BasicBlock(nn.Module):
    """The two-3x3-conv residual block of He et al. 2016, "Deep Residual Learning for Image
    Recognition"; a 1x1 projection shortcut when the stride or the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvNormAct(in_channels, out_channels, norm, stride=stride),
            ConvNormAct(out_channels, out_channels, norm, act=False),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ConvNormAct(in_channels, out_channels, norm, stride=stride, kernel=1,
                                        act=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def widths(width: int, stages: int) -> Sequence[int]:
    """Channel counts doubling per stage: ``width, 2*width, 4*width, ...``."""
    return [width * 2**i for i in range(stages)]

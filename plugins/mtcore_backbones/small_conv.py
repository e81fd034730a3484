"""A plain convolutional encoder: conv-norm-ReLU stages, each halving the resolution."""

from __future__ import annotations

import torch
from torch import nn

from mtcore.plugin import Backbone, FeatureInfo
from mtcore_backbones.blocks import (
    ConvNormAct,
    check_images,
    check_norm,
    check_positive_int,
    widths,
)


class SmallConvBackbone(Backbone):
    """A stride-1 stem then ``depth`` stages (a stride-2 conv and a stride-1 conv, each
    conv-norm-ReLU) doubling the channels; returns ``s1, s2, ..., s{2**depth}`` keyed by stride.

    Image height and width must be divisible by ``2**depth`` (checked in ``forward``).
    """

    def __init__(self, in_channels: int, width: int = 32, depth: int = 3,
                 norm: str = "batch") -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_channels = check_positive_int(owner, "in_channels", in_channels)
        check_positive_int(owner, "width", width)
        check_positive_int(owner, "depth", depth)
        check_norm(owner, norm)
        chans = widths(width, depth + 1)
        self.stem = ConvNormAct(in_channels, chans[0], norm)
        self.stages = nn.ModuleList(
            nn.Sequential(ConvNormAct(chans[i], chans[i + 1], norm, stride=2),
                          ConvNormAct(chans[i + 1], chans[i + 1], norm))
            for i in range(depth)
        )
        self.feature_info = tuple(
            FeatureInfo(f"s{2**i}", c, 2**i) for i, c in enumerate(chans)
        )
        self.max_stride = 2**depth

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        check_images(type(self).__name__, images, self.in_channels, self.max_stride)
        x = self.stem(images)
        out = {self.feature_info[0].name: x}
        for info, stage in zip(self.feature_info[1:], self.stages, strict=True):
            x = stage(x)
            out[info.name] = x
        return out

"""A small ResNet encoder for small images (the CIFAR-style ResNet of He et al. 2016, Sec. 4.2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtcore.plugin import Backbone, FeatureInfo
from mtcore_backbones.blocks import (
    BasicBlock,
    ConvNormAct,
    check_images,
    check_norm,
    check_positive_int,
    widths,
)


class ResNetBackbone(Backbone):
    """A 3x3 stem at stride 1, then one stage of ``blocks[i]`` basic residual blocks per entry;
    stage 1 keeps the stem's resolution and each later stage halves it and doubles the channels.

    Returns ``s1, s2, ..., s{2**(len(blocks)-1)}`` keyed by stride; image height and width must be
    divisible by the coarsest stride (checked in ``forward``).
    """

    def __init__(self, in_channels: int, width: int = 32, blocks: Sequence[int] = (2, 2, 2),
                 norm: str = "batch") -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_channels = check_positive_int(owner, "in_channels", in_channels)
        check_positive_int(owner, "width", width)
        check_norm(owner, norm)
        if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or not blocks:
            raise TypeError(
                f"{owner}: blocks must be a non-empty sequence of ints >= 1 (blocks per stage), "
                f"got {blocks!r}"
            )
        for i, n in enumerate(blocks):
            check_positive_int(owner, f"blocks[{i}]", n)
        self.blocks = tuple(blocks)
        chans = widths(width, len(blocks))
        self.stem = ConvNormAct(in_channels, width, norm)
        stages = []
        prev = width
        for i, (n, c) in enumerate(zip(blocks, chans, strict=True)):
            stride = 1 if i == 0 else 2
            layers = [BasicBlock(prev, c, norm, stride=stride)]
            layers += [BasicBlock(c, c, norm) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            prev = c
        self.stages = nn.ModuleList(stages)
        self.feature_info = tuple(
            FeatureInfo(f"s{2**i}", c, 2**i) for i, c in enumerate(chans)
        )
        self.max_stride = 2 ** (len(blocks) - 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        check_images(type(self).__name__, images, self.in_channels, self.max_stride)
        x = self.stem(images)
        out = {}
        for info, stage in zip(self.feature_info, self.stages, strict=True):
            x = stage(x)
            out[info.name] = x
        return out

"""A U-Net encoder (Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical Image
Segmentation") exposing its skips, optionally with the decoder back to stride 1."""

from __future__ import annotations

import torch
from torch import nn

from mtcore.plugin import Backbone, FeatureInfo
from mtcore_backbones.blocks import DoubleConv, check_images, check_norm, check_positive_int, widths


class _Up(nn.Module):
    """One decoder level: 2x2 up-convolution, concatenation with the skip, double conv."""

    def __init__(self, in_channels: int, skip_channels: int, norm: str) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, skip_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(2 * skip_channels, skip_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNetBackbone(Backbone):
    """Encoder levels ``enc1`` (stride 1, ``width`` channels) .. ``enc{depth}`` and ``bottleneck``
    (stride ``2**depth``), channels doubling per level; 2x2 max-pool between levels.

    With ``decoder=True`` it also runs the U-Net decoder and returns ``dec1`` (stride 1, ``width``
    channels), so dense heads can share it. Feature order: ``enc1, [dec1,] enc2, ..., bottleneck``
    (fine to coarse; ``deepest`` is the bottleneck). Image height and width must be divisible by
    ``2**depth`` (checked in ``forward``).
    """

    def __init__(self, in_channels: int, width: int = 32, depth: int = 3, norm: str = "batch",
                 decoder: bool = False) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_channels = check_positive_int(owner, "in_channels", in_channels)
        check_positive_int(owner, "width", width)
        check_positive_int(owner, "depth", depth)
        check_norm(owner, norm)
        if not isinstance(decoder, bool):
            raise TypeError(f"{owner}: decoder must be a bool, got {decoder!r}")
        chans = widths(width, depth + 1)
        self.encoders = nn.ModuleList(
            DoubleConv(in_channels if i == 0 else chans[i - 1], chans[i], norm)
            for i in range(depth + 1)
        )
        self.pool = nn.MaxPool2d(2)
        self.decoders = nn.ModuleList(
            _Up(chans[i + 1], chans[i], norm) for i in reversed(range(depth))
        ) if decoder else None
        names = [f"enc{i + 1}" for i in range(depth)] + ["bottleneck"]
        self._enc_names = tuple(names)
        infos = [FeatureInfo(n, c, 2**i) for i, (n, c) in enumerate(zip(names, chans, strict=True))]
        if decoder:
            infos.insert(1, FeatureInfo("dec1", width, 1))
        self.feature_info = tuple(infos)
        self.max_stride = 2**depth

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        check_images(type(self).__name__, images, self.in_channels, self.max_stride)
        skips = []
        x = images
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else self.pool(x))
            skips.append(x)
        out = dict(zip(self._enc_names, skips, strict=True))
        if self.decoders is not None:
            for up, skip in zip(self.decoders, reversed(skips[:-1]), strict=True):
                x = up(x, skip)
            out["dec1"] = x
        return {info.name: out[info.name] for info in self.feature_info}

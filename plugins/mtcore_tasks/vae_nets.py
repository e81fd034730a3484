"""The spatial-latent VAE's encoder and decoder: a latent *map* (a few channels at stride 2^k)
instead of one vector, as in convolutional / hierarchical VAEs (e.g. Vahdat & Kautz 2020,
NVAE), so the latent keeps where things are and the decoder only fills in detail."""

from __future__ import annotations

import torch
from torch import nn

from mtcore import kernels


def _down(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]


class SpatialEncoder(nn.Module):
    """``features [N, C_in, H/s, W/s] -> (mu, logvar)``, each ``[N, latent_channels, g, g]``:
    a 3x3 conv, ``levels`` stride-2 convs (channels doubling, at most ``4 * width``), then a 1x1
    conv to the posterior's mean and log-variance."""

    def __init__(self, in_channels: int, latent_channels: int, width: int, levels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1),
                                   nn.LeakyReLU(0.2, inplace=True)]
        c = width
        for _ in range(levels):
            nxt = min(2 * c, 4 * width)
            layers += _down(c, nxt)
            c = nxt
        self.net = nn.Sequential(*layers)
        self.head = nn.Conv2d(c, 2 * latent_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.net(x)).float().chunk(2, dim=1)
        return mu, logvar


class SpatialDecoder(nn.Module):
    """``z [N, latent_channels, g, g] -> image logits [N, C, g * 2^levels, g * 2^levels]``: a 3x3
    conv, then ``levels`` (upsample x2, 3x3 conv, BatchNorm, LeakyReLU) stages halving the width
    down to ``width``, a 3x3 conv stage at full resolution and a 3x3 conv to the image channels.
    Output is raw (logits); the caller applies sigmoid."""

    def __init__(self, latent_channels: int, out_channels: int, width: int, levels: int) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        c = width * 2 ** min(levels, 2)
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, c, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(c), nn.LeakyReLU(0.2, inplace=True)]
        for _ in range(levels):
            nxt = max(width, c // 2)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(c, nxt, 3, padding=1, bias=False), nn.BatchNorm2d(nxt),
                       nn.LeakyReLU(0.2, inplace=True)]
            c = nxt
        layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                   nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(width, out_channels, 3, padding=1)]
        # BatchNorm + LeakyReLU and upsample + conv run fused (kernels.FusedSequential)
        self.net = kernels.FusedSequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.net[-1].weight.is_contiguous(memory_format=torch.channels_last):
            z = z.contiguous(memory_format=torch.channels_last)  # a channels_last model: NHWC
        return self.net(z)

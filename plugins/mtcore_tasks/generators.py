"""Image decoder (VAE decoder / GAN generator) and discriminator building blocks."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from mtcore import kernels
from mtcore.kernels import PixelNorm
from mtcore.plugin import IncompatibleComponentsError

from .augment import check_policy, diff_augment


def num_upsamples(size: tuple[int, int], start: int = 4) -> int:
    """How many x2 upsamplings take a ``start`` x ``start`` map to ``size`` (square, power of 2)."""
    h, w = size
    k = int(round(math.log2(h / start))) if h >= start else -1
    if h != w or k < 0 or start * 2**k != h:
        raise IncompatibleComponentsError(
            f"image size {h}x{w}: generative heads need square images of {start}*2^k pixels "
            "(e.g. 16, 32, 64); resize the dataset (params.size)")
    return k


DECODER_NORMS = ("batch", "pixel")


class ImageDecoder(nn.Module):
    """``z [N, Z] -> image [N, C, H, W]``: linear to a 4x4 map, then (upsample, conv, norm, act)
    stages halving the width. Output is raw (logits); the caller applies sigmoid.

    ``norm="batch"`` suits a VAE decoder; ``"pixel"`` suits a GAN generator sampled through an
    EMA of its weights, whose activations BatchNorm's running statistics (copied from the trained
    generator) would not match."""

    def __init__(self, latent_dim: int, out_channels: int, size: tuple[int, int],
                 width: int = 32, norm: str = "batch") -> None:
        super().__init__()
        if norm not in DECODER_NORMS:
            raise ValueError(f"decoder norm must be one of {list(DECODER_NORMS)}, got {norm!r}")
        k = num_upsamples(size)
        self.latent_dim = latent_dim
        c0 = width * 2 ** min(k, 3)
        self.fc = nn.Linear(latent_dim, c0 * 16)
        self.c0 = c0
        layers: list[nn.Module] = []
        c = c0
        for i in range(k):
            nxt = max(width, c // 2) if i < k - 1 else width
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(c, nxt, 3, padding=1, bias=norm != "batch"),
                       nn.BatchNorm2d(nxt) if norm == "batch" else PixelNorm(),
                       nn.LeakyReLU(0.2, inplace=True)]
            c = nxt
        layers += [nn.Conv2d(c, out_channels, 3, padding=1)]
        # upsample + conv and BatchNorm/PixelNorm + LeakyReLU run fused (kernels.FusedSequential)
        self.net = kernels.FusedSequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], self.c0, 4, 4)
        if self.net[-1].weight.is_contiguous(memory_format=torch.channels_last):
            # a channels_last model (model.channels_last): start the maps NHWC too, or every
            # upsample and the first conv (and their backwards) copy them; same values
            h = h.contiguous(memory_format=torch.channels_last)
        return self.net(torch.nn.functional.leaky_relu(h, 0.2))


@contextlib.contextmanager
def frozen_norm_stats(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in train mode without updating BatchNorm running statistics (D steps)."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.momentum, m.num_batches_tracked.clone()
                          if m.num_batches_tracked is not None else None))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class FusedConv(nn.Module):
    """Conv without bias followed by the fused bias + leaky-ReLU kernel (``mtcore.kernels``)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.bias_act(self.conv(x), self.bias, act="lrelu")


class Discriminator(nn.Module):
    """Strided conv stack (fused bias+lrelu), minibatch-stddev, then a linear logit; with labels,
    a projection term ``<embed(y), h>`` (Miyato & Koyama 2018) and, with ``class_head``, an
    auxiliary classifier (AC-GAN). In train mode its inputs first go through the differentiable
    augmentations ``augment`` (see :mod:`.augment`)."""

    def __init__(self, in_channels: int, size: tuple[int, int], width: int = 32,
                 num_labels: int = 0, mbstd_group: int = 4, augment: Sequence[str] = (),
                 class_head: bool = False) -> None:
        super().__init__()
        self.augment = check_policy(augment)
        k = num_upsamples(size)
        layers: list[nn.Module] = [FusedConv(in_channels, width)]
        c = width
        for _ in range(k):
            nxt = min(c * 2, width * 8)
            layers.append(FusedConv(c, nxt, stride=2))
            c = nxt
        self.features = nn.Sequential(*layers)
        self.mbstd_group = mbstd_group
        self.final = FusedConv(c + 1, c)
        self.fc = nn.Linear(c * 16, c)
        self.out = nn.Linear(c, 1)
        self.embed = nn.Embedding(num_labels, c) if num_labels else None
        # AC-GAN (Odena et al. 2017): a class prediction from the same features
        self.classes = nn.Linear(c, num_labels) if class_head and num_labels else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                return_classes: bool = False):
        """The real/fake logit [N]; with ``return_classes``, also the class logits [N, labels]
        of the auxiliary classifier (needs ``class_head``)."""
        if return_classes and self.classes is None:
            raise RuntimeError("discriminator: return_classes needs class_head=True")
        x = x * 2 - 1
        if self.training and self.augment:
            x = diff_augment(x, self.augment)
        h = self.features(x)
        g = self.mbstd_group
        while g > 1 and h.shape[0] % g:
            g -= 1
        h = kernels.minibatch_stddev(h, group_size=max(g, 1))
        h = self.final(h)
        h = torch.nn.functional.leaky_relu(self.fc(h.flatten(1)), 0.2)
        logit = self.out(h).squeeze(1)
        if self.embed is not None and labels is not None:
            logit = logit + (self.embed(labels) * h).sum(1) / math.sqrt(h.shape[1])
        if return_classes:
            return logit, self.classes(h)
        return logit


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """``target = decay * target + (1 - decay) * source`` for parameters; buffers are copied."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.lerp_(s.detach(), 1.0 - decay)
    for t, s in zip(target.buffers(), source.buffers(), strict=True):
        t.copy_(s)

"""The backbone contract: a shared encoder that declares the feature maps it returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtcore.errors import IncompatibleComponentsError


@dataclass(frozen=True)
class FeatureInfo:
    """One feature map a backbone returns: its key, channel count and stride w.r.t. the input."""

    name: str
    channels: int
    stride: int


class Backbone(nn.Module):
    """Base class for backbones.

    Subclasses set ``feature_info`` (ordered fine to coarse) in ``__init__`` and return from
    ``forward(images)`` a dict with exactly those keys. Heads read ``feature_info`` at build time to
    check that what they consume exists.
    """

    feature_info: tuple[FeatureInfo, ...] = ()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def feature(self, name: str) -> FeatureInfo:
        """The declared feature map ``name``; a clear error when the backbone has none."""
        for info in self.feature_info:
            if info.name == name:
                return info
        have = ", ".join(f"{f.name} (C={f.channels}, stride={f.stride})" for f in self.feature_info)
        raise IncompatibleComponentsError(
            f"backbone {type(self).__name__} has no feature map {name!r}; it returns: {have}"
        )

    @property
    def deepest(self) -> FeatureInfo:
        """The coarsest (last declared) feature map, the usual input of pooled heads."""
        return self.feature_info[-1]

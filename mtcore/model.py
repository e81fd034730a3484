"""The multi-task model: one shared backbone and named task heads."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mtcore.backbone import Backbone
from mtcore.heads import Batch, Outputs, TaskHead


class MultiTaskModel(nn.Module):
    """``forward(batch)`` runs the backbone once and every head on its features."""

    def __init__(self, backbone: Backbone, heads: Mapping[str, TaskHead]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads))
        for name, head in self.heads.items():
            head.task_name = name
        for head in self.heads.values():
            head.link(dict(self.heads.items()))

    def forward(self, batch: Batch) -> dict[str, Outputs]:
        features = self.backbone(batch["image"])
        return {name: head(features, batch) for name, head in self.heads.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters every task shares (the backbone's) that currently train."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def auxiliary_parameter_ids(self) -> set[int]:
        return {id(p) for h in self.heads.values() for ps in h.auxiliary_parameters().values()
                for p in ps}

    def generative_heads(self) -> dict[str, TaskHead]:
        """Heads that can sample images: those overriding ``TaskHead.sample``."""
        out = {}
        for name, head in self.heads.items():
            if type(head).sample is not TaskHead.sample:
                out[name] = head
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, Outputs]:
        """Inference on images alone (no targets needed)."""
        return self({"image": images})

"""Component specs: the frozen, typed records that plugins return from their hooks.

A spec names a component, says in one line what it is, and holds the factory that builds it with
the merged ``defaults`` and user ``params``. Specs are plain data, so listing what is installed
never builds anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class ComponentSpec:
    """Base spec. ``kind`` is the registry the spec belongs to (one per hook)."""

    name: str
    factory: Callable[..., Any]
    summary: str
    defaults: Mapping[str, Any] = field(default_factory=dict)

    kind: ClassVar[str] = "component"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"{self.kind} name {self.name!r} is invalid: use letters, digits, '_', '-', '.'"
                " (':' is reserved for 'provider:name')"
            )
        if not callable(self.factory):
            raise TypeError(f"{self.kind} {self.name!r}: factory must be callable, got {self.factory!r}")
        if not isinstance(self.summary, str) or not self.summary.strip() or "\n" in self.summary.strip():
            raise ValueError(f"{self.kind} {self.name!r}: summary must be one non-empty line")
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))


@dataclass(frozen=True)
class BackboneSpec(ComponentSpec):
    """A shared encoder. Factory: ``(in_channels: int, **params) -> mtcore.backbone.Backbone``."""

    kind: ClassVar[str] = "backbone"


@dataclass(frozen=True)
class HeadSpec(ComponentSpec):
    """A task head. Factory: ``(features, info, loss, **params) -> mtcore.heads.TaskHead`` where
    ``features`` is the backbone's ``feature_info`` and ``info`` the dataset's ``DatasetInfo``."""

    kind: ClassVar[str] = "head"
    task_type: str = ""


@dataclass(frozen=True)
class LossSpec(ComponentSpec):
    """A task loss. Factory: ``(**params) -> nn.Module``; ``task_type`` names the heads it fits."""

    kind: ClassVar[str] = "loss"
    task_type: str = ""


@dataclass(frozen=True)
class BalancerSpec(ComponentSpec):
    """A loss balancer. Factory: ``(task_names, **params) -> mtcore.balancer.LossBalancer``."""

    kind: ClassVar[str] = "balancer"


@dataclass(frozen=True)
class TransferSpec(ComponentSpec):
    """A transfer strategy. Factory: ``(**params) -> mtcore.transfer.TransferStrategy``."""

    kind: ClassVar[str] = "transfer"


@dataclass(frozen=True)
class DatasetSpec(ComponentSpec):
    """A dataset. Factory: ``(split: str, **params) -> Dataset`` with ``.info: DatasetInfo``."""

    kind: ClassVar[str] = "dataset"


@dataclass(frozen=True)
class LoggerSpec(ComponentSpec):
    """A run logger. Factory: ``(**params) -> mtcore.loggers.RunLogger``."""

    kind: ClassVar[str] = "logger"


@dataclass(frozen=True)
class AugmentSpec(ComponentSpec):
    """A training-time augmentation. Factory: ``(**params) -> mtcore.augment.Augmentation``."""

    kind: ClassVar[str] = "augment"


#: kind -> (hook name, spec class); the single table the manager, registry and CLI read.
KINDS: dict[str, tuple[str, type[ComponentSpec]]] = {
    "backbone": ("mtcore_backbones", BackboneSpec),
    "head": ("mtcore_heads", HeadSpec),
    "loss": ("mtcore_losses", LossSpec),
    "balancer": ("mtcore_balancers", BalancerSpec),
    "transfer": ("mtcore_transfers", TransferSpec),
    "dataset": ("mtcore_datasets", DatasetSpec),
    "logger": ("mtcore_loggers", LoggerSpec),
    "augment": ("mtcore_augments", AugmentSpec),
}


def plural(kind: str) -> str:
    """``kind`` in the plural, for messages: backbones, losses, transfers."""
    return kind + ("es" if kind.endswith("s") else "s")

"""The public plugin API: everything a plugin needs to import, and nothing else.

    from mtcore.plugin import hookimpl, BackboneSpec

First-party plugins in ``plugins/`` use exactly this module, as a third-party package would.
"""

from __future__ import annotations

import pluggy

from mtcore.backbone import Backbone, FeatureInfo
from mtcore.balancer import BalanceResult, LossBalancer
from mtcore.data import DatasetInfo
from mtcore.errors import DataError, IncompatibleComponentsError
from mtcore.heads import TaskHead
from mtcore.specs import (
    BackboneSpec,
    BalancerSpec,
    ComponentSpec,
    DatasetSpec,
    HeadSpec,
    LossSpec,
    TransferSpec,
)
from mtcore.transfer import TransferStrategy

hookimpl = pluggy.HookimplMarker("mtcore")

__all__ = [
    "Backbone",
    "BackboneSpec",
    "BalanceResult",
    "BalancerSpec",
    "ComponentSpec",
    "DataError",
    "DatasetInfo",
    "DatasetSpec",
    "FeatureInfo",
    "HeadSpec",
    "IncompatibleComponentsError",
    "LossBalancer",
    "LossSpec",
    "TaskHead",
    "TransferSpec",
    "TransferStrategy",
    "hookimpl",
]

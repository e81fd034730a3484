"""The public plugin API: everything a plugin needs to import, and nothing else.

    from mtcore.plugin import hookimpl, BackboneSpec

First-party plugins in ``plugins/`` use exactly this module (and ``mtcore.kernels`` for the fused
ops), as a third-party package would; a test holds them to it.
"""

from __future__ import annotations

import pluggy

from mtcore.augment import Augmentation
from mtcore.backbone import Backbone, FeatureInfo
from mtcore.balancer import (
    BalanceResult,
    GradientCombiner,
    GradientWeighting,
    LossBalancer,
    active_rows,
    solve_dtype,
)
from mtcore.checkpoint import load as load_checkpoint
from mtcore.checkpoint import load_model_weights
from mtcore.data import SPLITS, DatasetInfo, image_pixels, open_image, upright_size
from mtcore.distributed import process_mean
from mtcore.errors import DataError, IncompatibleComponentsError
from mtcore.heads import Prediction, TaskHead
from mtcore.loggers import RunLogger
from mtcore.predict import class_colours
from mtcore.specs import (
    AugmentSpec,
    BackboneSpec,
    BalancerSpec,
    ComponentSpec,
    DatasetSpec,
    HeadSpec,
    LoggerSpec,
    LossSpec,
    TransferSpec,
)
from mtcore.transfer import Stage, TransferStrategy

hookimpl = pluggy.HookimplMarker("mtcore")

__all__ = [
    "AugmentSpec",
    "Augmentation",
    "Backbone",
    "BackboneSpec",
    "BalanceResult",
    "BalancerSpec",
    "ComponentSpec",
    "DataError",
    "DatasetInfo",
    "DatasetSpec",
    "FeatureInfo",
    "GradientCombiner",
    "GradientWeighting",
    "HeadSpec",
    "IncompatibleComponentsError",
    "LoggerSpec",
    "LossBalancer",
    "LossSpec",
    "Prediction",
    "RunLogger",
    "SPLITS",
    "Stage",
    "TaskHead",
    "TransferSpec",
    "TransferStrategy",
    "active_rows",
    "class_colours",
    "hookimpl",
    "image_pixels",
    "load_checkpoint",
    "load_model_weights",
    "open_image",
    "process_mean",
    "solve_dtype",
    "upright_size",
]

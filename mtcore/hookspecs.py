"""Hook specifications: one hook per kind of component, each returning frozen specs.

A plugin is a module (or object) with functions marked ``@mtcore.plugin.hookimpl`` whose names
match these hooks. Every hook is called once per plugin when a registry is first needed; none takes
arguments, so listing components never depends on a config. Distribute a plugin by declaring an
entry point in the group ``mtcore``::

    [project.entry-points.mtcore]
    acme = "acme_mtcore.plugin"
"""

from __future__ import annotations

from collections.abc import Iterable

import pluggy

from mtcore.specs import (
    AugmentSpec,
    BackboneSpec,
    BalancerSpec,
    DatasetSpec,
    HeadSpec,
    LoggerSpec,
    LossSpec,
    TransferSpec,
)

hookspec = pluggy.HookspecMarker("mtcore")


@hookspec
def mtcore_backbones() -> Iterable[BackboneSpec]:
    """Called when the backbone registry is built; return the shared encoders this plugin provides.

    Example::

        @hookimpl
        def mtcore_backbones():
            yield BackboneSpec(name="tiny", factory=TinyBackbone, summary="Two conv layers.",
                               defaults={"width": 16})
    """


@hookspec
def mtcore_heads() -> Iterable[HeadSpec]:
    """Called when the head registry is built; return the task heads this plugin provides.

    A head owns its task: it reads its target from the batch, holds its loss and metrics, and may
    bring auxiliary modules trained by their own optimizer (a GAN discriminator).

    Example::

        @hookimpl
        def mtcore_heads():
            yield HeadSpec(name="depth", factory=DepthHead, summary="Per-pixel depth regression.",
                           task_type="depth")
    """


@hookspec
def mtcore_losses() -> Iterable[LossSpec]:
    """Called when the loss registry is built; return the task losses this plugin provides.

    ``task_type`` says which heads a loss fits, so a mismatch is an error at build time.

    Example::

        @hookimpl
        def mtcore_losses():
            yield LossSpec(name="lovasz", factory=LovaszLoss, summary="Lovasz-softmax IoU loss.",
                           task_type="segmentation")
    """


@hookspec
def mtcore_balancers() -> Iterable[BalancerSpec]:
    """Called when the balancer registry is built; return the loss balancers this plugin provides.

    Example::

        @hookimpl
        def mtcore_balancers():
            yield BalancerSpec(name="dwa", factory=DynamicWeightAverage,
                               summary="Dynamic weight average (Liu et al. 2019).",
                               defaults={"temperature": 2.0})
    """


@hookspec
def mtcore_transfers() -> Iterable[TransferSpec]:
    """Called when the transfer registry is built; return the transfer strategies provided.

    Example::

        @hookimpl
        def mtcore_transfers():
            yield TransferSpec(name="linear_probe", factory=LinearProbe,
                               summary="Train heads on frozen features.")
    """


@hookspec
def mtcore_datasets() -> Iterable[DatasetSpec]:
    """Called when the dataset registry is built; return the datasets this plugin provides.

    Example::

        @hookimpl
        def mtcore_datasets():
            yield DatasetSpec(name="cells", factory=CellsDataset, summary="Cell images + masks.",
                              defaults={"size": 64})
    """


@hookspec
def mtcore_loggers() -> Iterable[LoggerSpec]:
    """Called when the logger registry is built; return the run loggers this plugin provides.

    A logger receives every record of a run as the trainer writes it (``metrics.jsonl``'s rows,
    the sample grids), to send them elsewhere: TensorBoard, an experiment tracker.

    Example::

        @hookimpl
        def mtcore_loggers():
            yield LoggerSpec(name="mlflow", factory=MlflowLogger,
                             summary="Metrics and sample grids to an MLflow run.")
    """


@hookspec
def mtcore_augments() -> Iterable[AugmentSpec]:
    """Called when the augmentation registry is built; return the training-time augmentations
    this plugin provides (config ``data.augment``, a list applied in order to each training
    batch; see :class:`mtcore.augment.Augmentation` for the contract).

    Example::

        @hookimpl
        def mtcore_augments():
            yield AugmentSpec(name="rot90", factory=Rot90, summary="Quarter turns, image and mask.")
    """

"""Registers the first-party transfer strategies (entry point ``mtcore = transfer``)."""

from mtcore.plugin import TransferSpec, hookimpl

from .strategies import FeatureTransfer, FineTune, FromScratch, Staged, StructureTransfer


@hookimpl
def mtcore_transfers():
    yield TransferSpec("scratch", FromScratch, "Random initialisation; everything trains.")
    yield TransferSpec("finetune", FineTune, "Parameter transfer: start from a checkpoint's weights.")
    yield TransferSpec("features", FeatureTransfer,
                       "Feature transfer: pretrained backbone, frozen; heads train.")
    yield TransferSpec("structure", StructureTransfer,
                       "Structure transfer: a checkpoint's backbone architecture, fresh weights.")
    yield TransferSpec("staged", Staged,
                       "Stages: heads on a frozen backbone, jointly, then end to end.")

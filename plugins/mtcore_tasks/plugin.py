"""Registers the first-party task heads and losses (entry point ``mtcore = tasks``)."""

from mtcore.plugin import HeadSpec, LossSpec, hookimpl

from .heads import ClassificationHead, GANHead, SegmentationHead, VAEHead
from .layout_gan import LayoutGANHead
from .losses import (
    AdversarialLoss,
    ClsCrossEntropy,
    DiceLoss,
    FocalLoss,
    SegCrossEntropy,
    VAELoss,
)


@hookimpl
def mtcore_heads():
    yield HeadSpec("segmentation", SegmentationHead, "Per-pixel class logits over the skips.",
                   task_type="segmentation")
    yield HeadSpec("classification", ClassificationHead, "Pooled features to label logits.",
                   task_type="classification")
    yield HeadSpec("vae", VAEHead, "Variational autoencoder: mu/logvar, sample, decode.",
                   task_type="vae")
    yield HeadSpec("gan", GANHead, "Generator vs discriminator (own optimizer), EMA sampling.",
                   task_type="gan")
    yield HeadSpec("layout_gan", LayoutGANHead,
                   "Layout-to-image generator judged by the shared segmenter (OASIS).",
                   task_type="gan")


@hookimpl
def mtcore_losses():
    yield LossSpec("seg_cross_entropy", SegCrossEntropy,
                   "Per-pixel cross-entropy (fused kernel), ignore_index, class weights.",
                   task_type="segmentation")
    yield LossSpec("dice", DiceLoss, "Soft multi-class Dice loss.", task_type="segmentation")
    yield LossSpec("focal", FocalLoss, "Focal loss (Lin et al. 2017).", task_type="segmentation")
    yield LossSpec("cls_cross_entropy", ClsCrossEntropy,
                   "Cross-entropy with label smoothing (fused kernel).",
                   task_type="classification")
    yield LossSpec("vae", VAELoss, "Reconstruction (MSE or Bernoulli) + beta * KL (fused kernel).",
                   task_type="vae")
    yield LossSpec("adversarial", AdversarialLoss,
                   "Non-saturating, hinge or least-squares GAN loss (fused kernel).",
                   task_type="gan")

"""Pure-PyTorch reference implementations of mtcore's fused ops: the oracle for every backend."""

from .layers import batch_norm_act, bias_act, minibatch_stddev, pixel_norm_act, upsample_conv2d
from .losses import (
    JointLoss,
    VAELossTerms,
    adversarial_loss,
    joint_loss,
    seg_cross_entropy,
    vae_loss,
)

__all__ = [
    "JointLoss",
    "VAELossTerms",
    "adversarial_loss",
    "batch_norm_act",
    "bias_act",
    "joint_loss",
    "minibatch_stddev",
    "pixel_norm_act",
    "seg_cross_entropy",
    "upsample_conv2d",
    "vae_loss",
]

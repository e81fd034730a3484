"""Pure-PyTorch reference implementations of mtcore's fused ops: the oracle for every backend."""

from .layers import bias_act, minibatch_stddev
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
    "bias_act",
    "joint_loss",
    "minibatch_stddev",
    "seg_cross_entropy",
    "vae_loss",
]

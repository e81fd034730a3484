"""Fused kernels of mtcore's losses, GAN layers and model layers (BatchNorm/pixel norm +
activation, upsample + conv), with a pure-PyTorch reference for each; ``FusedSequential`` runs
a model's layer pairs through them.

Every op takes ``backend=`` ("reference", "cpp", "cuda", "triton", "auto"); the default comes from
:func:`set_backend` (config key ``kernels``), then ``$MTCORE_KERNELS``, then "auto". See
docs/kernels.md.
"""

from ._backend import available_backends, get_backend, set_backend, using_backend
from ._build import build_extensions
from .modules import FusedSequential, PixelNorm
from .ops.adversarial import adversarial_loss
from .ops.batch_norm_act import batch_norm_act
from .ops.bias_act import bias_act
from .ops.joint_loss import joint_loss
from .ops.minibatch_stddev import minibatch_stddev
from .ops.pixel_norm_act import pixel_norm_act
from .ops.seg_cross_entropy import seg_cross_entropy
from .ops.upsample_conv import upsample_conv2d
from .ops.vae_loss import vae_loss
from .reference.losses import JointLoss, VAELossTerms

__all__ = [
    "FusedSequential",
    "JointLoss",
    "PixelNorm",
    "VAELossTerms",
    "adversarial_loss",
    "available_backends",
    "batch_norm_act",
    "bias_act",
    "build_extensions",
    "get_backend",
    "joint_loss",
    "minibatch_stddev",
    "pixel_norm_act",
    "seg_cross_entropy",
    "set_backend",
    "upsample_conv2d",
    "using_backend",
    "vae_loss",
]

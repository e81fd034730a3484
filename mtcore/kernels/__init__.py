"""Fused kernels of mtcore's losses and GAN layers, with a pure-PyTorch reference for each.

Every op takes ``backend=`` ("reference", "cpp", "cuda", "triton", "auto"); the default comes from
:func:`set_backend` (config key ``kernels``), then ``$MTCORE_KERNELS``, then "auto". See
docs/kernels.md.
"""

from ._backend import available_backends, get_backend, set_backend
from ._build import build_extensions
from .ops.adversarial import adversarial_loss
from .ops.bias_act import bias_act
from .ops.joint_loss import joint_loss
from .ops.minibatch_stddev import minibatch_stddev
from .ops.seg_cross_entropy import seg_cross_entropy
from .ops.vae_loss import vae_loss
from .reference.losses import JointLoss, VAELossTerms

__all__ = [
    "JointLoss",
    "VAELossTerms",
    "adversarial_loss",
    "available_backends",
    "bias_act",
    "build_extensions",
    "get_backend",
    "joint_loss",
    "minibatch_stddev",
    "seg_cross_entropy",
    "set_backend",
    "vae_loss",
]

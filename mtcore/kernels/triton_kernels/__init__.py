"""Triton backend of mtcore's fused ops: one module per op (kernels, launcher, autograd glue).

Importing this package never imports triton; each function imports its op module on first call,
so a missing triton only makes :func:`is_available` False. On a machine without a GPU the kernels
run in the Triton interpreter when ``TRITON_INTERPRET=1`` is set before triton is first imported.
Ops are registered under the ``mtcore_triton`` torch.library namespace.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..reference.losses import JointLoss, VAELossTerms

__all__ = [
    "adversarial_loss",
    "batch_norm_act",
    "bias_act",
    "is_available",
    "joint_loss",
    "minibatch_stddev",
    "pixel_norm_act",
    "seg_cross_entropy",
    "vae_loss",
]


def is_available() -> bool:
    """True if triton is importable and can run: a CUDA device, or ``TRITON_INTERPRET=1``."""
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "") == "1"):
        return False
    try:
        importlib.import_module("triton")
    except Exception:  # noqa: BLE001 - a broken triton install is simply unavailable
        return False
    common = sys.modules.get(f"{__name__}._common")
    if common is not None and not torch.cuda.is_available():
        # kernels decorated before TRITON_INTERPRET=1 was set need a GPU
        return bool(common.INTERPRETED)
    return True


def seg_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross entropy over dim 1 of [N, C, *spatial] logits; gradient made in the forward pass."""
    from .seg_ce import seg_cross_entropy as impl

    return impl(logits, target, weight, ignore_index, label_smoothing, reduction)


def vae_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: float = 1.0,
    recon_kind: str = "mse",
) -> VAELossTerms:
    """VAE negative ELBO terms (rec, kl, total = rec + beta * kl), per-sample means over N."""
    from .vae import vae_loss as impl

    return impl(recon, target, mu, logvar, beta, recon_kind)


def adversarial_loss(
    logits: torch.Tensor, kind: str = "non_saturating", role: str = "g"
) -> torch.Tensor:
    """GAN loss (non_saturating, hinge, least_squares) for role d_real, d_fake or g; a mean."""
    from .adversarial import adversarial_loss as impl

    return impl(logits, kind, role)


def joint_loss(
    seg_logits: torch.Tensor,
    seg_target: torch.Tensor,
    cls_logits: torch.Tensor,
    cls_target: torch.Tensor,
    recon: torch.Tensor,
    image: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    fake_logits: torch.Tensor,
    weights: torch.Tensor,
    mode: str = "fixed",
    *,
    beta: float = 1.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    recon_kind: str = "mse",
    adv_kind: str = "non_saturating",
) -> JointLoss:
    """The four-task objective [seg CE, cls CE, VAE, GAN g] weighted "fixed" or by "uncertainty"."""
    from .joint import joint_loss as impl

    return impl(
        seg_logits,
        seg_target,
        cls_logits,
        cls_target,
        recon,
        image,
        mu,
        logvar,
        fake_logits,
        weights,
        mode,
        beta=beta,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        recon_kind=recon_kind,
        adv_kind=adv_kind,
    )


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    dim: int = 1,
    act: str = "linear",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """StyleGAN2's fused ``act(x + b) * gain`` with optional clamp; twice differentiable."""
    from .fused_bias_act import bias_act as impl

    return impl(x, b, dim, act, alpha, gain, clamp)


def minibatch_stddev(x: torch.Tensor, group_size: int = 4, num_channels: int = 1) -> torch.Tensor:
    """StyleGAN2's minibatch standard deviation layer: [N, C, H, W] -> [N, C + F, H, W]."""
    from .mbstd import minibatch_stddev as impl

    return impl(x, group_size, num_channels)


def batch_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float,
    act: int,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm + activation code ``act``: (y, mean, var), as ``mtcore::bn_act_fwd``."""
    from .bn_act import batch_norm_act as impl

    return impl(x, weight, bias, running_mean, running_var, eps, act, alpha)


def pixel_norm_act(x: torch.Tensor, eps: float = 1e-8, act: str = "linear",
                   alpha: float = 0.2) -> torch.Tensor:
    """Pixel norm (unit RMS over channels) + linear, relu or lrelu."""
    from .pn_act import pixel_norm_act as impl

    return impl(x, eps, act, alpha)

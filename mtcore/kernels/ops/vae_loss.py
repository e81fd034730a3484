"""Fused VAE loss: reconstruction (MSE or Bernoulli) + beta * KL, terms and gradients in one pass.

``mtcore::vae_loss_fwd`` returns d(rec)/d(recon) and d(kl)/d(mu, logvar); the backward (C++)
combines them with beta and the incoming gradients of (rec, kl, total). First derivatives only.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import losses as ref
from . import backend_for, native_ready

__all__ = ["vae_loss"]


def vae_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: float = 1.0,
    recon_kind: str = "mse",
    backend: str | None = None,
) -> ref.VAELossTerms:
    """VAE negative ELBO terms ``(rec, kl, total)``, each summed per sample and averaged over N.

    See :func:`mtcore.kernels.reference.vae_loss` for the math; ``target`` gets no gradient.
    """
    ref.check_vae_args(recon, target, mu, logvar)
    kind = ref.check_choice("recon_kind", recon_kind, ref.RECON_KINDS)
    if target.dtype != recon.dtype or logvar.dtype != mu.dtype:
        raise TypeError(
            f"target must have recon's dtype ({recon.dtype}, got {target.dtype}) and logvar "
            f"mu's dtype ({mu.dtype}, got {logvar.dtype})"
        )
    name = backend_for(recon, backend, "vae_loss_fwd")
    if name == "reference":
        return ref.vae_loss(recon, target, mu, logvar, beta, recon_kind)
    if name == "triton":
        return _backend.triton_function("vae_loss")(recon, target, mu, logvar, beta, recon_kind)
    native_ready("vae_loss_fwd", _register)
    compute_grad = torch.is_grad_enabled() and (
        recon.requires_grad or mu.requires_grad or logvar.requires_grad
    )
    rec, kl, total, *_ = torch.ops.mtcore.vae_loss_fwd(
        recon, target, mu, logvar, float(beta), kind, compute_grad
    )
    return ref.VAELossTerms(rec, kl, total)


def _fake(recon, target, mu, logvar, beta, recon_kind, compute_grad):
    def grad_like(t):
        return t.new_empty(t.shape) if compute_grad else t.new_empty((0,))

    scalars = [recon.new_empty(()) for _ in range(3)]
    return (*scalars, grad_like(recon), grad_like(mu), grad_like(logvar))


def _register() -> None:
    # The autograd formula is C++ (csrc/autograd/vae_loss_autograd.h).
    torch.library.register_fake("mtcore::vae_loss_fwd", _fake)

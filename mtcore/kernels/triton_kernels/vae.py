"""Triton VAE objective: reconstruction + KL (Kingma & Welling 2014; beta-VAE, Higgins et al. 2017).

Two reduction kernels, one over the reconstruction and one over the latent statistics; each writes
one partial sum per program (summed afterwards, so the result does not depend on atomics) and the
gradient of its term in the same pass. Backward only combines the stored gradients with beta.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..reference.losses import RECON_KINDS, VAELossTerms, check_choice, check_vae_args
from ._common import (
    acc_dtype,
    block_for,
    check_device,
    log1p_exp_neg_abs,
    make_op,
    num_blocks,
    sigmoid,
)

__all__ = ["vae_forward", "vae_loss"]


@triton.jit
def _rec_kernel(
    x_ptr,
    t_ptr,
    coef_ptr,
    partial_ptr,
    grad_ptr,
    numel,
    KIND: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if F64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(x.dtype)
    inv_n = tl.load(coef_ptr).to(x.dtype)
    if KIND == 0:  # squared error
        d = x - t
        val = d * d
        g = 2.0 * d * inv_n
    else:  # BCE with logits, stable form max(x, 0) - x t + log(1 + exp(-|x|))
        val = tl.maximum(x, 0.0) - x * t + log1p_exp_neg_abs(x)
        g = (sigmoid(x) - t) * inv_n
    tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(mask, val, 0.0), 0))
    if COMPUTE_GRAD:
        tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kl_kernel(
    mu_ptr,
    lv_ptr,
    coef_ptr,
    partial_ptr,
    gmu_ptr,
    glv_ptr,
    numel,
    COMPUTE_GRAD: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0)
    if F64:
        mu = mu.to(tl.float64)
    else:
        mu = mu.to(tl.float32)
    lv = tl.load(lv_ptr + offs, mask=mask, other=0.0).to(mu.dtype)
    inv_n = tl.load(coef_ptr).to(mu.dtype)
    e = tl.exp(lv)
    val = 1.0 + lv - mu * mu - e
    tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(mask, val, 0.0), 0))
    if COMPUTE_GRAD:  # kl = -0.5 * sum(val) / N
        tl.store(gmu_ptr + offs, (mu * inv_n).to(gmu_ptr.dtype.element_ty), mask=mask)
        tl.store(glv_ptr + offs, (0.5 * (e - 1.0) * inv_n).to(glv_ptr.dtype.element_ty), mask=mask)


def vae_forward(
    recon: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    recon_kind: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch both kernels: rec, kl (accumulation dtype), d rec/d recon, d kl/d mu, d kl/d logvar.

    The gradients are empty tensors when ``compute_grad`` is False.
    """
    acc = acc_dtype(recon)
    f64 = acc == torch.float64
    x, t = recon.contiguous(), target.contiguous()
    m, lv = mu.contiguous(), logvar.contiguous()
    coef = torch.full((1,), 1.0 / max(recon.shape[0], 1), dtype=acc, device=x.device)

    block = block_for(x.numel())
    rec_part = torch.zeros(max(num_blocks(x.numel(), block), 1), dtype=acc, device=x.device)
    g_rec = torch.empty_like(x) if compute_grad else x.new_empty(0)
    if x.numel() > 0:
        wrap_triton(_rec_kernel)[(num_blocks(x.numel(), block),)](
            x,
            t,
            coef,
            rec_part,
            g_rec,  # an empty tensor when not compute_grad: never written
            x.numel(),
            KIND=int(recon_kind),
            COMPUTE_GRAD=bool(compute_grad),
            F64=f64,
            BLOCK=block,
        )

    block = block_for(m.numel())
    kl_part = torch.zeros(max(num_blocks(m.numel(), block), 1), dtype=acc, device=x.device)
    g_mu = torch.empty_like(m) if compute_grad else m.new_empty(0)
    g_lv = torch.empty_like(lv) if compute_grad else lv.new_empty(0)
    if m.numel() > 0:
        wrap_triton(_kl_kernel)[(num_blocks(m.numel(), block),)](
            m,
            lv,
            coef,
            kl_part,
            g_mu,  # an empty tensor when not compute_grad: never written
            g_lv,  # an empty tensor when not compute_grad: never written
            m.numel(),
            COMPUTE_GRAD=bool(compute_grad),
            F64=f64,
            BLOCK=block,
        )
    rec = rec_part.sum() * coef[0]
    kl = -0.5 * kl_part.sum() * coef[0]
    return rec, kl, g_rec, g_mu, g_lv


def _vae_fwd(
    recon: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: float,
    recon_kind: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rec, kl, g_rec, g_mu, g_lv = vae_forward(recon, target, mu, logvar, recon_kind, compute_grad)
    total = rec + beta * kl
    dt = recon.dtype
    return rec.to(dt), kl.to(dt), total.to(dt), g_rec, g_mu, g_lv


def _fake(recon, target, mu, logvar, beta, recon_kind, compute_grad):
    def like(t):
        if not compute_grad:
            return t.new_empty(0)
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    s = recon.new_empty(())
    return s, s.clone(), s.clone(), like(recon), like(mu), like(logvar)


vae_loss_fwd = make_op("vae_loss_fwd", _vae_fwd, _fake, _rec_kernel)


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled grads for the unused outputs
    ctx.beta = inputs[4]
    ctx.has_grad = inputs[6]
    ctx.save_for_backward(*output[3:])
    ctx.mark_non_differentiable(*output[3:])


def _backward(ctx, g_rec, g_kl, g_total, *_unused):
    if not ctx.has_grad:
        raise RuntimeError(
            "mtcore_triton::vae_loss_fwd was called with compute_grad=False, "
            "so it cannot backpropagate"
        )
    d_rec, d_mu, d_lv = ctx.saved_tensors
    zero = torch.zeros((), dtype=d_rec.dtype, device=d_rec.device)
    g_rec = zero if g_rec is None else g_rec
    g_kl = zero if g_kl is None else g_kl
    g_total = zero if g_total is None else g_total
    c_rec = g_rec + g_total
    c_kl = g_kl + ctx.beta * g_total
    return (
        d_rec * c_rec.to(d_rec.dtype),
        None,
        d_mu * c_kl.to(d_mu.dtype),
        d_lv * c_kl.to(d_lv.dtype),
        None,
        None,
        None,
    )


vae_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


def vae_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: float = 1.0,
    recon_kind: str = "mse",
) -> VAELossTerms:
    """Negative ELBO terms (rec, kl, total = rec + beta*kl), each summed and divided by N (Triton).

    ``recon_kind`` "mse" (squared error) or "bernoulli" (``recon`` are logits, BCE with logits).
    """
    check_vae_args(recon, target, mu, logvar)
    kind = check_choice("recon", recon_kind, RECON_KINDS)
    check_device("recon", recon)
    compute_grad = torch.is_grad_enabled() and (
        recon.requires_grad or mu.requires_grad or logvar.requires_grad
    )
    rec, kl, total, *_ = vae_loss_fwd(recon, target, mu, logvar, float(beta), kind, compute_grad)
    return VAELossTerms(rec, kl, total)

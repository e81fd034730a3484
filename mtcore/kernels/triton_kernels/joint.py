"""Triton joint objective of the default four tasks: seg CE, cls CE, VAE, GAN generator loss.

One op runs the per-task kernels (seg_cross_entropy, vae_loss, adversarial) with their
forward-pass gradients; backward scales each by d(total)/d(L_k) plus the incoming gradient of
``terms``. mode "uncertainty" is the log-variance form of Kendall et al. 2018.
"""

from __future__ import annotations

import torch

from ..reference.losses import (
    ADV_KINDS,
    RECON_KINDS,
    JointLoss,
    check_choice,
    check_joint_args,
    check_seg_ce_args,
    check_target_values,
    check_tensor,
    check_vae_args,
)
from ._common import check_device, make_op
from .adversarial import _adv_kernel, adv_forward
from .seg_ce import seg_ce_forward
from .vae import vae_forward

__all__ = ["joint_loss"]

_G_ROLE = 2  # index of "g" in ADV_ROLES


def _joint_fwd(
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
    mode: int,
    beta: float,
    label_smoothing: float,
    ignore_index: int,
    recon_kind: int,
    adv_kind: int,
    compute_grad: bool,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    seg, g_seg = seg_ce_forward(seg_logits, seg_target, None, ignore_index, 0.0, 1, compute_grad)
    cls, g_cls = seg_ce_forward(
        cls_logits, cls_target, None, ignore_index, label_smoothing, 1, compute_grad
    )
    rec, kl, g_rec, g_mu, g_lv = vae_forward(recon, image, mu, logvar, recon_kind, compute_grad)
    vae = (rec + beta * kl).to(recon.dtype)
    gan, g_fake = adv_forward(fake_logits, adv_kind, _G_ROLE, compute_grad)
    gan = gan.to(fake_logits.dtype)
    terms = torch.stack([t.to(weights.dtype) for t in (seg, cls, vae, gan)])
    if mode == 0:
        total = (weights * terms).sum()
    else:
        total = (torch.exp(-weights) * terms + weights).sum()
    if compute_grad:  # per-task gradients dL_k/d(input); the VAE term is rec + beta * kl
        g_mu = g_mu * beta
        g_lv = g_lv * beta
    return terms, total, g_seg, g_cls, g_rec, g_mu, g_lv, g_fake


def _fake(
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
    beta,
    label_smoothing,
    ignore_index,
    recon_kind,
    adv_kind,
    compute_grad,
):
    def like(t):
        if not compute_grad:
            return t.new_empty(0)
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    return (
        weights.new_empty(4),
        weights.new_empty(()),
        like(seg_logits),
        like(cls_logits),
        like(recon),
        like(mu),
        like(logvar),
        like(fake_logits),
    )


joint_loss_fwd = make_op("joint_loss_fwd", _joint_fwd, _fake, _adv_kernel)


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled grads for the unused outputs
    ctx.mode = inputs[10]
    ctx.has_grad = inputs[16]
    ctx.save_for_backward(inputs[9], output[0], *output[2:])
    ctx.mark_non_differentiable(*output[2:])


def _backward(ctx, g_terms, g_total, *_unused):
    if not ctx.has_grad:
        raise RuntimeError(
            "mtcore_triton::joint_loss_fwd was called with compute_grad=False, "
            "so it cannot backpropagate"
        )
    weights, terms, g_seg, g_cls, g_rec, g_mu, g_lv, g_fake = ctx.saved_tensors
    g_terms = torch.zeros_like(terms) if g_terms is None else g_terms
    g_total = torch.zeros_like(terms[0]) if g_total is None else g_total
    if ctx.mode == 0:  # total = sum w_k L_k
        d_terms, d_weights = weights, terms
    else:  # total = sum exp(-s_k) L_k + s_k
        d_terms = torch.exp(-weights)
        d_weights = 1.0 - d_terms * terms
    c = g_terms + g_total * d_terms
    return (
        g_seg * c[0].to(g_seg.dtype),
        None,
        g_cls * c[1].to(g_cls.dtype),
        None,
        g_rec * c[2].to(g_rec.dtype),
        None,
        g_mu * c[2].to(g_mu.dtype),
        g_lv * c[2].to(g_lv.dtype),
        g_fake * c[3].to(g_fake.dtype),
        g_total * d_weights,
        *([None] * 7),
    )


joint_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    """terms = [seg CE, cls CE, VAE total, GAN g loss] and their weighted ``total`` (Triton).

    mode "fixed": total = sum_k w_k L_k; "uncertainty": weights are s_k = log sigma_k^2 and
    total = sum_k exp(-s_k) L_k + s_k. ``label_smoothing`` applies to the cls term only.
    """
    m = check_joint_args(weights, mode)
    check_seg_ce_args(seg_logits, seg_target, None, 0.0, "mean", ignore_index)
    check_seg_ce_args(cls_logits, cls_target, None, label_smoothing, "mean", ignore_index)
    check_vae_args(recon, image, mu, logvar)
    check_tensor("fake_logits", fake_logits)
    rk = check_choice("recon_kind", recon_kind, RECON_KINDS)
    ak = check_choice("adv_kind", adv_kind, ADV_KINDS)
    check_device("seg_logits", seg_logits)
    if not torch.compiler.is_compiling():
        check_target_values(seg_target, seg_logits.shape[1], ignore_index)
        check_target_values(cls_target, cls_logits.shape[1], ignore_index)
    compute_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (seg_logits, cls_logits, recon, mu, logvar, fake_logits, weights)
    )
    terms, total, *_ = joint_loss_fwd(
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
        m,
        float(beta),
        float(label_smoothing),
        int(ignore_index),
        rk,
        ak,
        compute_grad,
    )
    return JointLoss(terms, total)

"""Fused four-task objective (seg CE, cls CE, VAE, GAN generator loss) with fixed or uncertainty weights.

``mtcore::joint_loss_fwd`` computes every term and the gradient of the weighted total w.r.t. every
input in one call (each input tensor read once), instead of four losses plus a weighted sum and
their separate backward passes. First derivatives only.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import losses as ref
from . import backend_for, native_ready

__all__ = ["joint_loss"]


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
    backend: str | None = None,
) -> ref.JointLoss:
    """Terms [seg, cls, vae, gan] and total = sum w_k L_k ("fixed") or sum exp(-s_k) L_k + s_k
    ("uncertainty", Kendall et al. 2018). See :func:`mtcore.kernels.reference.joint_loss`.

    Gradients reaching ``terms`` (not only ``total``) are exact except for a task whose fixed
    weight is exactly 0, where they are dropped (the fused gradient is stored pre-weighted), and
    for weights c_k too small for the dtype (fixed below ~1e-38, or uncertainty s_k above ~87 in
    float32), where the pre-weighted gradient underflows and dividing it back out overflows.
    """
    m = ref.check_joint_args(weights, mode)
    ref.check_seg_ce_args(seg_logits, seg_target, None, 0.0, "mean", ignore_index)
    ref.check_seg_ce_args(cls_logits, cls_target, None, label_smoothing, "mean", ignore_index)
    ref.check_vae_args(recon, image, mu, logvar)
    ref.check_tensor("fake_logits", fake_logits)
    rk = ref.check_choice("recon_kind", recon_kind, ref.RECON_KINDS)
    ak = ref.check_choice("adv_kind", adv_kind, ref.ADV_KINDS)
    ref.check_same_device(
        seg_logits=seg_logits, cls_logits=cls_logits, recon=recon, mu=mu,
        fake_logits=fake_logits, weights=weights,
    )
    if image.dtype != recon.dtype or logvar.dtype != mu.dtype:
        raise TypeError(
            f"image must have recon's dtype ({recon.dtype}, got {image.dtype}) and logvar "
            f"mu's dtype ({mu.dtype}, got {logvar.dtype})"
        )
    name = backend_for(seg_logits, backend, "joint_loss_fwd")
    kwargs = dict(
        beta=beta, label_smoothing=label_smoothing, ignore_index=ignore_index,
        recon_kind=recon_kind, adv_kind=adv_kind,
    )
    args = (seg_logits, seg_target, cls_logits, cls_target, recon, image, mu, logvar,
            fake_logits, weights, mode)
    if name == "reference":
        return ref.joint_loss(*args, **kwargs)
    if any(t.dtype == torch.float16 for t in (seg_logits, cls_logits, recon, mu, fake_logits)):
        # fp32 inside, as in seg_cross_entropy: fused gradients are stored pre-scaled by
        # 1/#elements, which fp16 would round into its subnormals
        up = [t.float() if torch.is_tensor(t) and t.dtype == torch.float16 else t for t in args]
        out = joint_loss(*up, **kwargs, backend=name)
        return ref.JointLoss(out.terms.to(weights.dtype), out.total.to(weights.dtype))
    if name == "triton":  # it checks the target values itself
        return _backend.triton_function("joint_loss")(*args, **kwargs)
    native_ready("joint_loss_fwd", _register)
    grads = (seg_logits, cls_logits, recon, mu, logvar, fake_logits, weights)
    compute_grad = torch.is_grad_enabled() and any(t.requires_grad for t in grads)
    out = torch.ops.mtcore.joint_loss_fwd(  # int64 targets, as the kernels read them
        seg_logits, seg_target.long(), cls_logits, cls_target.long(), *args[4:10], m,
        float(beta), float(label_smoothing), int(ignore_index), rk, ak, compute_grad,
    )
    return ref.JointLoss(out[0], out[1])


def _fake(seg_logits, seg_target, cls_logits, cls_target, recon, image, mu, logvar, fake_logits,
          weights, mode, beta, label_smoothing, ignore_index, recon_kind, adv_kind, compute_grad):
    def grad_like(t):
        return t.new_empty(t.shape) if compute_grad else t.new_empty((0,))

    grads = [grad_like(t) for t in (seg_logits, cls_logits, recon, mu, logvar, fake_logits,
                                    weights)]
    return (weights.new_empty((4,)), weights.new_empty(()), *grads)


def _register() -> None:
    # The autograd formula is C++ (csrc/autograd/joint_loss_autograd.h).
    torch.library.register_fake("mtcore::joint_loss_fwd", _fake)

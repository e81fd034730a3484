"""Fused GAN losses (non-saturating, hinge, least squares) for D and G: mean loss and gradient.

``mtcore::adv_loss_fwd`` returns the mean loss and its gradient w.r.t. the logits from one pass;
the backward only scales that gradient. First derivatives only.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import losses as ref
from . import backend_for, is_one, native_ready

__all__ = ["adversarial_loss"]


def adversarial_loss(
    logits: torch.Tensor,
    kind: str = "non_saturating",
    role: str = "g",
    backend: str | None = None,
) -> torch.Tensor:
    """Mean GAN loss of discriminator ``logits`` for ``role`` in {"d_real", "d_fake", "g"}.

    See :func:`mtcore.kernels.reference.adversarial_loss` for the formulas of each ``kind``.
    """
    ref.check_tensor("logits", logits)
    k = ref.check_choice("kind", kind, ref.ADV_KINDS)
    r = ref.check_choice("role", role, ref.ADV_ROLES)
    name = backend_for(logits, backend, "adv_loss_fwd")
    if name == "reference":
        return ref.adversarial_loss(logits, kind, role)
    if logits.dtype == torch.float16:  # fp32 inside, as for seg_cross_entropy: the stored
        # gradient is pre-scaled by 1/#logits, which fp16 would round into its subnormals
        return adversarial_loss(logits.float(), kind, role, backend=name).to(torch.float16)
    if name == "triton":
        return _backend.triton_function("adversarial_loss")(logits, kind, role)
    native_ready("adv_loss_fwd", _register)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = torch.ops.mtcore.adv_loss_fwd(logits, k, r, compute_grad)
    return loss


def _fake(logits, kind, role, compute_grad):
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0,))
    return logits.new_empty(()), grad


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the grad output is not differentiable: no zero fill
    ctx.numel = inputs[0].numel()
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, _grad_grad):
    (grad,) = ctx.saved_tensors
    if grad.numel() != ctx.numel:
        raise RuntimeError("mtcore::adv_loss_fwd was run with compute_grad=False; cannot backward")
    if grad_loss is None:
        return None, None, None, None
    out = grad if is_one(grad_loss) else grad * grad_loss
    return out, None, None, None


def _register() -> None:
    torch.library.register_fake("mtcore::adv_loss_fwd", _fake)
    torch.library.register_autograd(
        "mtcore::adv_loss_fwd", _backward, setup_context=_setup_context
    )

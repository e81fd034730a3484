"""Fused GAN losses (non-saturating, hinge, least squares) for D and G: mean loss and gradient.

``mtcore::adv_loss_fwd`` returns the mean loss and its gradient w.r.t. the logits from one pass;
the backward (C++) only scales that gradient. First derivatives only.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import losses as ref
from . import backend_for, native_ready

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


def _register() -> None:
    # The autograd formula is C++ (csrc/autograd/adversarial_autograd.h).
    torch.library.register_fake("mtcore::adv_loss_fwd", _fake)

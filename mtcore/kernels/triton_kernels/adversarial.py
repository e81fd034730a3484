"""Triton GAN losses of discriminator logits (mean over elements), gradient from the forward pass.

non_saturating (Goodfellow et al. 2014), hinge (Lim & Ye 2017), least_squares (Mao et al. 2017);
the kind and role are compile-time constants, so each of the nine variants is its own kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..reference.losses import ADV_KINDS, ADV_ROLES, check_choice, check_tensor
from ._common import (
    acc_dtype,
    block_for,
    check_device,
    log1p_exp_neg_abs,
    make_op,
    num_blocks,
    sigmoid,
)

__all__ = ["adv_forward", "adversarial_loss"]


@triton.jit
def _adv_kernel(
    x_ptr,
    coef_ptr,
    partial_ptr,
    grad_ptr,
    numel,
    KIND: tl.constexpr,
    ROLE: tl.constexpr,
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
    inv_n = tl.load(coef_ptr).to(x.dtype)
    if KIND == 0:  # softplus(x) for d_fake, softplus(-x) otherwise
        if ROLE == 1:
            val = tl.maximum(x, 0.0) + log1p_exp_neg_abs(x)
            g = sigmoid(x)
        else:
            val = tl.maximum(-x, 0.0) + log1p_exp_neg_abs(x)
            g = -sigmoid(-x)
    elif KIND == 1:  # hinge; relu's derivative is 0 at the kink, as in torch
        if ROLE == 0:
            val = tl.maximum(1.0 - x, 0.0)
            g = tl.where(1.0 - x > 0.0, -1.0, 0.0)
        elif ROLE == 1:
            val = tl.maximum(1.0 + x, 0.0)
            g = tl.where(1.0 + x > 0.0, 1.0, 0.0)
        else:
            val = -x
            g = tl.full([BLOCK], -1.0, x.dtype)
    else:  # least squares: x^2 for d_fake, (x - 1)^2 otherwise
        if ROLE == 1:
            val = x * x
            g = 2.0 * x
        else:
            val = (x - 1.0) * (x - 1.0)
            g = 2.0 * (x - 1.0)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(mask, val, 0.0), 0))
    if COMPUTE_GRAD:
        tl.store(grad_ptr + offs, (g * inv_n).to(grad_ptr.dtype.element_ty), mask=mask)


def adv_forward(
    logits: torch.Tensor, kind: int, role: int, compute_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel: (mean loss in the accumulation dtype, its gradient or an empty tensor)."""
    acc = acc_dtype(logits)
    x = logits.contiguous()
    numel = x.numel()
    coef = torch.full((1,), 1.0 / max(numel, 1), dtype=acc, device=x.device)
    block = block_for(numel)
    part = torch.zeros(max(num_blocks(numel, block), 1), dtype=acc, device=x.device)
    grad = torch.empty_like(x) if compute_grad else x.new_empty(0)
    if numel > 0:
        wrap_triton(_adv_kernel)[(num_blocks(numel, block),)](
            x,
            coef,
            part,
            grad,  # an empty tensor when not compute_grad: never written
            numel,
            KIND=int(kind),
            ROLE=int(role),
            COMPUTE_GRAD=bool(compute_grad),
            F64=acc == torch.float64,
            BLOCK=block,
        )
    return part.sum() * coef[0], grad


def _adv_fwd(
    logits: torch.Tensor, kind: int, role: int, compute_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad = adv_forward(logits, kind, role, compute_grad)
    return loss.to(logits.dtype), grad


def _fake(logits, kind, role, compute_grad):
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return logits.new_empty(()), grad if compute_grad else logits.new_empty(0)


adv_loss_fwd = make_op("adv_loss_fwd", _adv_fwd, _fake, _adv_kernel)


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled grads for the unused outputs
    ctx.has_grad = inputs[3]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _grad_grad):
    if not ctx.has_grad:
        raise RuntimeError(
            "mtcore_triton::adv_loss_fwd was called with compute_grad=False, "
            "so it cannot backpropagate"
        )
    (grad,) = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 4
    return grad * grad_loss.to(grad.dtype), None, None, None


adv_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


def adversarial_loss(
    logits: torch.Tensor, kind: str = "non_saturating", role: str = "g"
) -> torch.Tensor:
    """GAN loss of discriminator ``logits`` for ``role`` d_real, d_fake or g; a mean (Triton)."""
    check_tensor("logits", logits)
    k = check_choice("kind", kind, ADV_KINDS)
    r = check_choice("role", role, ADV_ROLES)
    check_device("logits", logits)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = adv_loss_fwd(logits, k, r, compute_grad)
    return loss

"""Triton cross entropy over dim 1 of [N, C, *spatial] logits, gradient made in the forward pass.

One program takes a tile of pixels (rows) and walks the classes in chunks twice: an online
log-sum-exp (Milakov & Gimelshein 2018) gives the loss, then d(loss)/d(logits) is written directly,
so no softmax is kept for backward; backward only scales the stored gradient (as Liger-Kernel does).
Label smoothing follows Szegedy et al. 2016, matching ``torch.nn.functional.cross_entropy``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..reference.losses import (
    REDUCTIONS,
    check_choice,
    check_constant_weight,
    check_seg_ce_args,
    check_target_values,
)
from ._common import acc_dtype, block_for, check_device, make_op, num_blocks

__all__ = ["seg_ce_forward", "seg_cross_entropy"]

_TILE = 4096  # logits per program and class chunk: rows * BLOCK_C


@triton.jit
def _seg_ce_kernel(
    logits_ptr,
    target_ptr,
    weight_ptr,
    coef_ptr,
    loss_ptr,
    grad_ptr,
    M,
    C,
    P,
    ignore_index,
    HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # rows are flattened (n, p) pixels; logits[n, c, p] sits at (n * C + c) * P + p
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < M
    n = rows // P
    base = n * C * P + (rows - n * P)
    y = tl.load(target_ptr + rows, mask=rmask, other=ignore_index)
    valid = rmask & (y != ignore_index) & (y >= 0) & (y < C)
    ys = tl.where(valid, y, 0)
    x_y = tl.load(logits_ptr + base + ys * P, mask=valid, other=0.0)
    if F64:
        x_y = x_y.to(tl.float64)
    else:
        x_y = x_y.to(tl.float32)
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + ys, mask=valid, other=0.0).to(x_y.dtype)
    else:
        w_y = tl.where(valid, 1.0, 0.0).to(x_y.dtype)
    w_y = tl.where(valid, w_y, 0.0)
    # coef = [scale of the reduction, 1 - eps, eps / C] in the accumulation dtype
    keep = tl.load(coef_ptr + 1).to(x_y.dtype)
    eps_c = tl.load(coef_ptr + 2).to(x_y.dtype)

    # pass 1: running max m and rescaled sum s of exp, plus sum_c w_c x_c and sum_c w_c
    m = tl.full([BLOCK_R], float("-inf"), x_y.dtype)
    s = tl.zeros([BLOCK_R], x_y.dtype)
    wx = tl.zeros([BLOCK_R], x_y.dtype)
    wsum = tl.zeros([BLOCK_R], x_y.dtype)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        offs = base[:, None] + cols[None, :].to(tl.int64) * P
        x = tl.load(logits_ptr + offs, mask=rmask[:, None] & cmask[None, :], other=0.0)
        x = x.to(x_y.dtype)
        xm = tl.where(cmask[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(xm, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(xm - m_new[:, None]), 1)
        m = m_new
        if SMOOTH:
            if HAS_WEIGHT:
                wc = tl.load(weight_ptr + cols, mask=cmask, other=0.0).to(x_y.dtype)
            else:
                wc = tl.where(cmask, 1.0, 0.0).to(x_y.dtype)
            wx += tl.sum(tl.where(cmask[None, :], x, 0.0) * wc[None, :], 1)
            wsum += tl.sum(wc, 0)
    lse = m + tl.log(s)

    # loss_i = (1-eps) w_y (lse - x_y) + eps/C * (sum_c w_c) lse - eps/C * sum_c w_c x_c
    loss = keep * w_y * (lse - x_y)
    if SMOOTH:
        loss += tl.where(valid, eps_c * (wsum * lse - wx), 0.0)
    tl.store(loss_ptr + rows, loss, mask=rmask)

    if COMPUTE_GRAD:
        # d loss_i / d x_c = (1-eps) w_y (p_c - [c == y]) + eps/C (sum_w p_c - w_c), times scale
        scale = tl.where(valid, tl.load(coef_ptr).to(x_y.dtype), 0.0)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < C
            offs = base[:, None] + cols[None, :].to(tl.int64) * P
            mask2 = rmask[:, None] & cmask[None, :]
            x = tl.load(logits_ptr + offs, mask=mask2, other=0.0).to(x_y.dtype)
            p = tl.exp(tl.where(cmask[None, :], x, float("-inf")) - lse[:, None])
            hit = tl.where(cols[None, :] == ys[:, None], 1.0, 0.0)
            g = keep * w_y[:, None] * (p - hit)
            if SMOOTH:
                if HAS_WEIGHT:
                    wc = tl.load(weight_ptr + cols, mask=cmask, other=0.0).to(x_y.dtype)
                else:
                    wc = tl.where(cmask, 1.0, 0.0).to(x_y.dtype)
                g += eps_c * (wsum[:, None] * p - wc[None, :])
            g = g * scale[:, None]
            tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask2)


def seg_ce_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel: (loss in logits' dtype, d(loss)/d(logits) or an empty tensor).

    ``reduction`` is the index into ("none", "mean", "sum"); for "none" the gradient is that of each
    element's own loss. The mean divides by the summed weight of non-ignored targets (0 if none).
    """
    n, c = logits.shape[0], logits.shape[1]
    p = 1
    for d in logits.shape[2:]:
        p *= d
    rows = n * p
    acc = acc_dtype(logits)
    x = logits.contiguous()
    t = target.reshape(-1).to(torch.int64).contiguous()
    w = weight.contiguous() if weight is not None else None

    # the mean's denominator depends on targets only: sum of w[y] over non-ignored y
    valid = (t != ignore_index) & (t >= 0) & (t < c)
    if reduction == 1:
        if w is not None:
            denom = (w.to(acc)[t.clamp(0, c - 1)] * valid).sum()
        else:
            denom = valid.sum().to(acc)
        scale = torch.where(denom != 0, 1.0 / torch.where(denom != 0, denom, 1.0), 0.0)
    else:
        scale = torch.ones((), dtype=acc, device=x.device)
    eps = float(label_smoothing)
    # torch.full, not new_tensor: a fill on the device instead of a host-to-device copy per call
    const = [torch.full((), v, dtype=acc, device=x.device) for v in (1.0 - eps, eps / c)]
    coef = torch.stack([scale.to(acc), *const])

    per = torch.empty(rows, dtype=acc, device=x.device)
    grad = torch.empty_like(x) if compute_grad else x.new_empty(0)
    if rows > 0:
        block_c = block_for(c, cap=1024)
        block_r = block_for(rows, cap=max(1, _TILE // block_c), floor=1)
        wrap_triton(_seg_ce_kernel)[(num_blocks(rows, block_r),)](
            x,
            t,
            w if w is not None else x,
            coef,
            per,
            grad,  # an empty tensor when not compute_grad: never written
            rows,
            c,
            p,
            int(ignore_index),
            HAS_WEIGHT=w is not None,
            SMOOTH=eps > 0.0,
            COMPUTE_GRAD=bool(compute_grad),
            F64=acc == torch.float64,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            num_warps=8,  # a 4096-element tile on 4 warps spills registers (ptxas, sm_90)
        )
    if reduction == 0:
        loss = per.reshape((n, *logits.shape[2:]))
    elif reduction == 1:
        loss = per.sum() * scale
    else:
        loss = per.sum()
    return loss.to(logits.dtype), grad


def _fake(logits, target, weight, ignore_index, label_smoothing, reduction, compute_grad):
    shape = (logits.shape[0], *logits.shape[2:]) if reduction == 0 else ()
    loss = logits.new_empty(shape)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return loss, grad if compute_grad else logits.new_empty(0)


def _seg_ce_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return seg_ce_forward(
        logits, target, weight, ignore_index, label_smoothing, reduction, compute_grad
    )


seg_ce_fwd = make_op("seg_ce_fwd", _seg_ce_fwd, _fake, _seg_ce_kernel)


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled grads for the unused outputs
    ctx.reduction = inputs[5]
    ctx.has_grad = inputs[6]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _grad_grad):
    if not ctx.has_grad:
        raise RuntimeError(
            "mtcore_triton::seg_ce_fwd was called with compute_grad=False, "
            "so it cannot backpropagate"
        )
    (grad,) = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 7
    g = grad_loss.to(grad.dtype)
    g = g.unsqueeze(1) if ctx.reduction == 0 else g
    return grad * g, None, None, None, None, None, None


seg_ce_fwd.register_autograd(_backward, setup_context=_setup_context)


def seg_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross entropy of ``logits`` [N, C, *spatial] against class indices [N, *spatial] (Triton).

    Same values as ``F.cross_entropy``; a mean over zero non-ignored targets is 0 with zero
    gradient. ``weight`` is a constant (it gets no gradient).
    """
    check_seg_ce_args(logits, target, weight, label_smoothing, reduction, ignore_index)
    red = check_choice("reduction", reduction, REDUCTIONS)
    check_device("logits", logits)
    check_constant_weight(weight)
    if not torch.compiler.is_compiling():
        check_target_values(target, logits.shape[1], ignore_index)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = seg_ce_fwd(
        logits, target, weight, int(ignore_index), float(label_smoothing), red, compute_grad
    )
    return loss

"""Triton minibatch standard deviation, the StyleGAN2 discriminator layer (Karras et al. 2020).

x [N, C, H, W] is viewed as [G, M = N/G, F, K = C/F*H*W]. Forward: one program per (m, f) and
chunk of K writes a partial sum of sqrt(var_g + 1e-8); a second kernel writes the output
(x, then the statistic tiled to the F extra channels). Backward: the statistic's incoming gradient
is reduced per (m, f), then dx = dy + coef[m, f] * (x_g - mean) / (G * sd). The backward op is
differentiable through a PyTorch composite (the reference), so double backward works.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..reference.layers import check_mbstd_args
from ..reference.layers import minibatch_stddev as _ref_mbstd
from ._common import acc_dtype, block_for, check_device, make_op, num_blocks

__all__ = ["minibatch_stddev"]


@triton.jit
def _stat_kernel(
    x_ptr,
    partial_ptr,
    G,
    M,
    F,
    C,
    HW,
    K,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    mf = tl.program_id(0)
    kb = tl.program_id(1)
    m = mf // F
    f = mf - m * F
    k = kb.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = k < K
    offs = m.to(tl.int64) * C * HW + f.to(tl.int64) * K + k
    sx = (m.to(tl.int64) * 0 + M) * C * HW  # int64 stride between group members
    if F64:
        x0 = tl.zeros([BLOCK], tl.float64)
    else:
        x0 = tl.zeros([BLOCK], tl.float32)
    s = x0
    for g in range(0, G):
        s += tl.load(x_ptr + offs + g * sx, mask=mask, other=0.0).to(x0.dtype)
    mean = s / G
    v = x0
    for g in range(0, G):
        d = tl.load(x_ptr + offs + g * sx, mask=mask, other=0.0).to(x0.dtype) - mean
        v += d * d
    sd = tl.sqrt(v / G + 1e-8)
    tl.store(partial_ptr + mf * tl.num_programs(1) + kb, tl.sum(tl.where(mask, sd, 0.0), 0))


@triton.jit
def _out_kernel(
    x_ptr,
    stat_ptr,
    y_ptr,
    numel,
    M,
    F,
    C,
    HW,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    # int64 (from the program id): (C + F) * H * W may pass 2**31; C, F or HW may be a constexpr 1
    per_n = (tl.program_id(0).to(tl.int64) * 0 + C + F) * HW
    n = i // per_n
    r = i - n * per_n
    c = r // HW
    hw = r - c * HW
    is_x = c < C
    xv = tl.load(x_ptr + n * C * HW + c * HW + hw, mask=mask & is_x, other=0.0)
    sv = tl.load(stat_ptr + (n % M) * F + (c - C), mask=mask & (c >= C), other=0.0)
    y = tl.where(is_x, xv.to(sv.dtype), sv)
    tl.store(y_ptr + i, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gstat_kernel(
    go_ptr,
    partial_ptr,
    G,
    M,
    F,
    C,
    HW,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Partial sums over g and hw of dy[g*M + m, C + f, hw]."""
    mf = tl.program_id(0)
    hb = tl.program_id(1)
    m = mf // F
    f = mf - m * F
    hw = hb.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = hw < HW
    offs = m.to(tl.int64) * (C + F) * HW + (C + f).to(tl.int64) * HW + hw
    sy = (m.to(tl.int64) * 0 + M) * (C + F) * HW  # int64 stride between group members
    if F64:
        acc = tl.zeros([BLOCK], tl.float64)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
    for g in range(0, G):
        acc += tl.load(go_ptr + offs + g * sy, mask=mask, other=0.0).to(acc.dtype)
    tl.store(partial_ptr + mf * tl.num_programs(1) + hb, tl.sum(acc, 0))


@triton.jit
def _dx_kernel(
    go_ptr,
    x_ptr,
    coef_ptr,
    dx_ptr,
    G,
    M,
    F,
    C,
    HW,
    K,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    mf = tl.program_id(0)
    m = mf // F
    f = mf - m * F
    k = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = k < K
    offs = m.to(tl.int64) * C * HW + f.to(tl.int64) * K + k  # in x; channel f*Cf + k // HW
    goffs = m.to(tl.int64) * (C + F) * HW + f.to(tl.int64) * K + k  # same element in dy
    sx = (m.to(tl.int64) * 0 + M) * C * HW  # int64 strides between group members
    sy = (m.to(tl.int64) * 0 + M) * (C + F) * HW
    if F64:
        x0 = tl.zeros([BLOCK], tl.float64)
    else:
        x0 = tl.zeros([BLOCK], tl.float32)
    s = x0
    for g in range(0, G):
        s += tl.load(x_ptr + offs + g * sx, mask=mask, other=0.0).to(x0.dtype)
    mean = s / G
    v = x0
    for g in range(0, G):
        d = tl.load(x_ptr + offs + g * sx, mask=mask, other=0.0).to(x0.dtype) - mean
        v += d * d
    sd = tl.sqrt(v / G + 1e-8)
    scale = tl.load(coef_ptr + mf).to(x0.dtype) / (G * sd)  # coef = d loss/d stat / K
    for g in range(0, G):
        xg = tl.load(x_ptr + offs + g * sx, mask=mask, other=0.0).to(x0.dtype)
        dy = tl.load(go_ptr + goffs + g * sy, mask=mask, other=0.0).to(x0.dtype)
        dx = dy + scale * (xg - mean)
        tl.store(dx_ptr + offs + g * sx, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _dims(x: torch.Tensor, group_size: int, num_channels: int) -> tuple[int, ...]:
    n, c, h, w = x.shape
    g = min(group_size, n)
    return n, c, h * w, g, n // g, num_channels, (c // num_channels) * h * w


def _fwd(x: torch.Tensor, group_size: int, num_channels: int) -> torch.Tensor:
    n, c, hw, g, m, f, k = _dims(x, group_size, num_channels)
    acc = acc_dtype(x)
    xc = x.contiguous()
    y = torch.empty((n, c + f, *x.shape[2:]), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if k > 0:
        block = block_for(k)
        partial = torch.empty((m * f, num_blocks(k, block)), dtype=acc, device=x.device)
        wrap_triton(_stat_kernel)[(m * f, num_blocks(k, block))](
            xc, partial, g, m, f, c, hw, k, F64=acc == torch.float64, BLOCK=block
        )
        stat = (partial.sum(1) / k).contiguous()
    else:  # C = 0 channels per group: the mean over nothing, as torch gives
        stat = torch.full((m * f,), float("nan"), dtype=acc, device=x.device)
    block = block_for(y.numel())
    wrap_triton(_out_kernel)[(num_blocks(y.numel(), block),)](
        xc, stat, y, y.numel(), m, f, c, hw, BLOCK=block
    )
    return y


def _bwd(
    grad_out: torch.Tensor, x: torch.Tensor, group_size: int, num_channels: int
) -> torch.Tensor:
    n, c, hw, g, m, f, k = _dims(x, group_size, num_channels)
    acc = acc_dtype(x)
    xc = x.contiguous()
    go = grad_out.to(x.dtype).contiguous()
    dx = torch.empty_like(xc)
    if x.numel() == 0:
        return dx
    block = block_for(hw)
    partial = torch.empty((m * f, num_blocks(hw, block)), dtype=acc, device=x.device)
    wrap_triton(_gstat_kernel)[(m * f, num_blocks(hw, block))](
        go, partial, g, m, f, c, hw, F64=acc == torch.float64, BLOCK=block
    )
    coef = (partial.sum(1) / k).contiguous()
    block = block_for(k)
    wrap_triton(_dx_kernel)[(m * f, num_blocks(k, block))](
        go, xc, coef, dx, g, m, f, c, hw, k, F64=acc == torch.float64, BLOCK=block
    )
    return dx


def _fwd_fake(x, group_size, num_channels):
    n, c, h, w = x.shape
    return x.new_empty((n, c + num_channels, h, w))


def _bwd_fake(grad_out, x, group_size, num_channels):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


mbstd_fwd = make_op("mbstd_fwd", _fwd, _fwd_fake, _stat_kernel)
mbstd_bwd = make_op("mbstd_bwd", _bwd, _bwd_fake, _dx_kernel)


def _fwd_setup(ctx, inputs, output):
    ctx.args = inputs[1:]
    ctx.save_for_backward(inputs[0])


def _fwd_backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return mbstd_bwd(grad_out, x, *ctx.args), None, None


mbstd_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def _bwd_setup(ctx, inputs, output):
    ctx.args = inputs[2:]
    ctx.save_for_backward(inputs[0], inputs[1])


def _bwd_backward(ctx, gg):
    """Second order through the reference composite: vjp of (dy, x) -> d<dy, mbstd(x)>/dx."""
    grad_out, x = ctx.saved_tensors
    group_size, num_channels = ctx.args

    def first(dy, xx):
        return torch.func.vjp(lambda t: _ref_mbstd(t, group_size, num_channels), xx)[1](dy)[0]

    _, vjp = torch.func.vjp(first, grad_out, x)
    g_dy, g_x = vjp(gg)
    return g_dy, g_x, None, None


mbstd_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup)


def minibatch_stddev(x: torch.Tensor, group_size: int = 4, num_channels: int = 1) -> torch.Tensor:
    """Append ``num_channels`` maps of per-group standard deviation: [N, C, H, W] -> [N, C+F, H, W].

    G = min(group_size, N) must divide N and num_channels must divide C (Triton).
    """
    check_mbstd_args(x, group_size, num_channels)
    check_device("x", x)
    return mbstd_fwd(x, int(group_size), int(num_channels))

"""Triton BatchNorm + activation (linear, relu, lrelu); csrc/cpu/batch_norm_act.cpp has the math.

x is walked as [outer, C, inner] (channels-last: inner = 1; NCHW: inner = H*W); value j of
channel c (j < M = outer * inner) is at ((j // inner) * C + c) * inner + j % inner. A tile kernel
over (blocks of j) x (blocks of channels) writes per-block partial sums: the moments about each
channel's first value (training statistics), or the backward's sum g and sum g (x - mean) with
g = dy act'(pre); torch adds the partials in a fixed order and forms the per-channel
coefficients (C values); an elementwise kernel then writes y or dx. No second derivative:
differentiating the backward op again raises an error naming the op (as on the other backends).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..ops import output_format
from ._common import (
    acc_dtype,
    block_for,
    channel_block,
    check_device,
    make_op,
    neg_slope,
    num_blocks,
)

__all__ = ["batch_norm_act"]


@triton.jit
def _sums_kernel(
    x_ptr,
    dy_ptr,
    coef_ptr,
    pa_ptr,
    pb_ptr,
    M,
    C,
    inner,
    neg,
    GRAD: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Partial sums of block (jb, cb): moments of d = x - coef[2C + c] (GRAD false), or sum g and
    sum g (x - coef[2C + c]) with g = dy act'(x coef[c] + coef[C + c]) (GRAD true)."""
    jb = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    j = jb.to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    cmask = c < C
    m = (j < M)[:, None] & cmask[None, :]
    offs = ((j // inner)[:, None] * C + c[None, :]) * inner + (j % inner)[:, None]
    if F64:
        zero = tl.zeros([BLOCK_C], tl.float64)
    else:
        zero = tl.zeros([BLOCK_C], tl.float32)
    mu = tl.load(coef_ptr + 2 * C + c, mask=cmask, other=0.0).to(zero.dtype)
    v = tl.load(x_ptr + offs, mask=m, other=0.0).to(zero.dtype)
    d = tl.where(m, v - mu[None, :], 0.0)
    if GRAD:
        scale = tl.load(coef_ptr + c, mask=cmask, other=0.0).to(zero.dtype)
        shift = tl.load(coef_ptr + C + c, mask=cmask, other=0.0).to(zero.dtype)
        pre = v * scale[None, :] + shift[None, :]
        g = tl.load(dy_ptr + offs, mask=m, other=0.0).to(zero.dtype)
        g = g * tl.where(pre > 0, 1.0, neg).to(zero.dtype)
        a = tl.sum(g, 0)
        b = tl.sum(g * d, 0)
    else:
        a = tl.sum(d, 0)
        b = tl.sum(d * d, 0)
    tl.store(pa_ptr + jb * C + c, a, mask=cmask)
    tl.store(pb_ptr + jb * C + c, b, mask=cmask)


@triton.jit
def _map_kernel(
    x_ptr,
    dy_ptr,
    coef_ptr,
    out_ptr,
    numel,
    C,
    inner,
    neg,
    FWD: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """y = act(x scale + shift) (FWD), or dx = scale (g - km - (x - mean) kx); coef holds
    [scale, shift, mean, km, kx] per channel."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < numel
    c = (e // inner) % C
    if F64:
        v = tl.load(x_ptr + e, mask=m, other=0.0).to(tl.float64)
    else:
        v = tl.load(x_ptr + e, mask=m, other=0.0).to(tl.float32)
    scale = tl.load(coef_ptr + c, mask=m, other=0.0).to(v.dtype)
    pre = v * scale + tl.load(coef_ptr + C + c, mask=m, other=0.0).to(v.dtype)
    slope = tl.where(pre > 0, 1.0, neg).to(v.dtype)
    if FWD:
        o = pre * slope
    else:
        g = tl.load(dy_ptr + e, mask=m, other=0.0).to(v.dtype) * slope
        mu = tl.load(coef_ptr + 2 * C + c, mask=m, other=0.0).to(v.dtype)
        km = tl.load(coef_ptr + 3 * C + c, mask=m, other=0.0).to(v.dtype)
        kx = tl.load(coef_ptr + 4 * C + c, mask=m, other=0.0).to(v.dtype)
        o = scale * (g - km - (v - mu) * kx)
    tl.store(out_ptr + e, o.to(out_ptr.dtype.element_ty), mask=m)


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(x in the walked layout, M values per channel, C, inner)."""
    nhwc = output_format(x) is torch.channels_last
    xc = x if nhwc else x.contiguous()
    c = x.shape[1]
    inner = 1 if nhwc else x.numel() // max(x.shape[0] * c, 1)
    return xc, x.numel() // max(c, 1), c, inner


def _sums(xc, dy, coef, m, c, inner, neg, grad):
    block_c = channel_block(c)
    block_j = max(16, 4096 // block_c)
    jblocks = num_blocks(m, block_j)
    acc = coef.dtype
    pa = torch.empty((jblocks, c), dtype=acc, device=xc.device)
    pb = torch.empty((jblocks, c), dtype=acc, device=xc.device)
    wrap_triton(_sums_kernel)[(jblocks, num_blocks(c, block_c))](
        xc, dy, coef, pa, pb, m, c, inner, neg, GRAD=grad, F64=acc == torch.float64,
        BLOCK_J=block_j, BLOCK_C=block_c)
    return pa.sum(0), pb.sum(0)


def _map(xc, dy, coef, c, inner, neg, fwd):
    out = torch.empty_like(xc)
    block = block_for(xc.numel())
    wrap_triton(_map_kernel)[(num_blocks(xc.numel(), block),)](
        xc, dy, coef, out, xc.numel(), c, inner, neg, FWD=fwd,
        F64=coef.dtype == torch.float64, BLOCK=block)
    return out


def _fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean_in: torch.Tensor,
         var_in: torch.Tensor, training: bool, eps: float, act: int, alpha: float
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xc, m, c, inner = _layout(x)
    acc = acc_dtype(x)
    neg = neg_slope(act, alpha)
    coef = torch.zeros(5 * c, dtype=acc, device=x.device)
    if training:  # moments about each channel's first value (exact for |mean| >> std)
        shift = xc[(0, slice(None)) + (0,) * (x.dim() - 2)].to(acc)
        coef[2 * c:3 * c] = shift
        s1, s2 = _sums(xc, xc, coef, m, c, inner, neg, False)
        d1 = s1 / m
        mean, var = shift + d1, (s2 / m - d1 * d1).clamp_min(0.0)
    else:
        mean, var = mean_in.to(acc, copy=True), var_in.to(acc, copy=True)  # no alias of inputs
    scale = weight.to(acc) / torch.sqrt(var + eps)
    coef[:c] = scale
    coef[c:2 * c] = bias.to(acc) - mean * scale
    return _map(xc, xc, coef, c, inner, neg, True), mean, var


def _bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
         mean: torch.Tensor, var: torch.Tensor, training: bool, eps: float, act: int,
         alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xc, m, c, inner = _layout(x)
    acc = acc_dtype(x)
    neg = neg_slope(act, alpha)
    g = dy.to(xc.dtype)
    if g.stride() != xc.stride():  # dy walked with x's offsets: give it x's layout
        g = torch.empty_like(xc).copy_(g)
    mean = mean.to(acc)
    invstd = 1.0 / torch.sqrt(var.to(acc) + eps)
    scale = weight.to(acc) * invstd
    coef = torch.zeros(5 * c, dtype=acc, device=x.device)
    coef[:c] = scale
    coef[c:2 * c] = bias.to(acc) - mean * scale
    coef[2 * c:3 * c] = mean
    sum_g, sum_gx = _sums(xc, g, coef, m, c, inner, neg, True)
    if training:
        coef[3 * c:4 * c] = sum_g / m
        coef[4 * c:] = sum_gx / m * invstd * invstd
    dx = _map(xc, g, coef, c, inner, neg, False)
    return dx, (sum_gx * invstd).to(weight.dtype), sum_g.to(weight.dtype)


def _out_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=output_format(x))


def _fwd_fake(x, weight, bias, mean_in, var_in, training, eps, act, alpha):
    c = x.shape[1]
    return _out_like(x), x.new_empty((c,), dtype=acc_dtype(x)), x.new_empty(
        (c,), dtype=acc_dtype(x))


def _bwd_fake(dy, x, weight, bias, mean, var, training, eps, act, alpha):
    return _out_like(x), torch.empty_like(weight), torch.empty_like(weight)


bn_act_fwd = make_op("bn_act_fwd", _fwd, _fwd_fake, _sums_kernel)
bn_act_bwd = make_op("bn_act_bwd", _bwd, _bwd_fake, _sums_kernel)


def _setup(ctx, inputs, output):
    x, weight, bias, _, _, training, eps, act, alpha = inputs
    ctx.args = (training, eps, act, alpha)
    ctx.save_for_backward(x, weight, bias, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, dy, _dmean, _dvar):
    x, weight, bias, mean, var = ctx.saved_tensors
    dx, dw, db = bn_act_bwd(dy, x, weight, bias, mean, var, *ctx.args)
    return dx, dw, db, None, None, None, None, None, None


bn_act_fwd.register_autograd(_backward, setup_context=_setup)


def _no_second(ctx, *grads):
    raise RuntimeError("mtcore::batch_norm_act has no second derivative; use the reference kernels "
                       '(kernels = "reference") to differentiate through BatchNorm twice')


bn_act_bwd.register_autograd(_no_second, setup_context=lambda ctx, inputs, output: None)


def batch_norm_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                   eps: float, act: int, alpha: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var) as ``mtcore::bn_act_fwd``: the batch's statistics when ``running_mean`` is
    None (training), else the given ones; arguments already checked by the caller (Triton)."""
    check_device("x", x)
    c, acc = x.shape[1], acc_dtype(x)
    w = weight if weight is not None else torch.ones(c, dtype=acc, device=x.device)
    b = bias if bias is not None else torch.zeros(c, dtype=acc, device=x.device)
    training = running_mean is None
    rm = running_mean if not training else torch.zeros(c, dtype=acc, device=x.device)
    rv = running_var if not training else torch.ones(c, dtype=acc, device=x.device)
    return bn_act_fwd(x, w, b, rm, rv, training, float(eps), int(act), float(alpha))

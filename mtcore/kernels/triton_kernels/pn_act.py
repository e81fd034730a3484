"""Triton pixel norm + activation (linear, relu, lrelu): the GAN generator's normalisation.

Per pixel p with C channels: r = 1/sqrt(mean_c x^2 + eps), y = act(x r); backward with
g = dy act'(x): dx_c = r g_c - r^3 x_c / C sum_c' g_c' x_c' (csrc/cpu/pixel_norm_act.cpp has the
same math). One program per block of pixels, looping over the channels twice (the sums, then the
outputs); a pixel's channels are ``CS`` apart (1 channels-last, H*W for NCHW), consecutive
pixels ``PS`` apart within a sample. No second derivative: differentiating the backward op again
raises an error naming the op (as on the other backends).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..ops import output_format
from ..reference.layers import check_pixel_norm_act_args
from ._common import acc_dtype, channel_block, check_device, make_op, neg_slope, num_blocks

__all__ = ["pixel_norm_act"]


@triton.jit
def _pn_kernel(
    x_ptr,
    dy_ptr,
    out_ptr,
    P,
    C,
    S,
    PS,
    CS,
    eps,
    neg,
    FWD: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < P
    base = (p // S) * C * S + (p % S) * PS  # int64: the pixel's channel 0
    if F64:
        ss = tl.zeros([BLOCK_P], tl.float64)
    else:
        ss = tl.zeros([BLOCK_P], tl.float32)
    gx = ss
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = pmask[:, None] & (c < C)[None, :]
        offs = base[:, None] + c[None, :].to(tl.int64) * CS
        v = tl.load(x_ptr + offs, mask=m, other=0.0).to(ss.dtype)
        ss += tl.sum(v * v, 1)
        if not FWD:
            g = tl.load(dy_ptr + offs, mask=m, other=0.0).to(ss.dtype)
            g = g * tl.where(v > 0, 1.0, neg).to(ss.dtype)
            gx += tl.sum(g * v, 1)
    r = 1.0 / tl.sqrt(ss / C + eps)
    k = r * r * r * gx / C
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = pmask[:, None] & (c < C)[None, :]
        offs = base[:, None] + c[None, :].to(tl.int64) * CS
        v = tl.load(x_ptr + offs, mask=m, other=0.0).to(ss.dtype)
        if FWD:
            u = v * r[:, None]
            o = u * tl.where(u > 0, 1.0, neg).to(ss.dtype)
        else:
            g = tl.load(dy_ptr + offs, mask=m, other=0.0).to(ss.dtype)
            g = g * tl.where(v > 0, 1.0, neg).to(ss.dtype)
            o = r[:, None] * g - k[:, None] * v
        tl.store(out_ptr + offs, o.to(out_ptr.dtype.element_ty), mask=m)


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int, int]:
    """(x in the walked layout, pixels, C, pixels per sample, pixel stride, channel stride)."""
    nhwc = output_format(x) is torch.channels_last
    xc = x if nhwc else x.contiguous()
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1)
    return xc, n * s, c, s, (c if nhwc else 1), (1 if nhwc else s)


def _blocks(c: int) -> tuple[int, int]:
    block_c = channel_block(c)
    return max(16, 2048 // block_c), block_c


def _run(x: torch.Tensor, dy: torch.Tensor | None, eps: float, act: int, alpha: float
         ) -> torch.Tensor:
    xc, p, c, s, ps, cs = _layout(x)
    out = torch.empty_like(xc)
    if xc.numel() == 0:
        return out
    g = xc if dy is None else dy.to(xc.dtype)
    if g.stride() != xc.stride():  # dy walked with x's offsets: give it x's layout
        g = torch.empty_like(xc).copy_(g)
    neg = neg_slope(act, alpha)
    block_p, block_c = _blocks(c)
    wrap_triton(_pn_kernel)[(num_blocks(p, block_p),)](
        xc, g, out, p, c, s, ps, cs, float(eps), neg, FWD=dy is None,
        F64=acc_dtype(x) == torch.float64, BLOCK_P=block_p, BLOCK_C=block_c)
    return out


def _fwd(x: torch.Tensor, eps: float, act: int, alpha: float) -> torch.Tensor:
    return _run(x, None, eps, act, alpha)


def _bwd(dy: torch.Tensor, x: torch.Tensor, eps: float, act: int, alpha: float) -> torch.Tensor:
    return _run(x, dy, eps, act, alpha)


def _fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=output_format(x))


pn_act_fwd = make_op("pn_act_fwd", _fwd, lambda x, eps, act, alpha: _fake(x), _pn_kernel)
pn_act_bwd = make_op("pn_act_bwd", _bwd, lambda dy, x, eps, act, alpha: _fake(x), _pn_kernel)


def _setup(ctx, inputs, output):
    ctx.args = inputs[1:]
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return pn_act_bwd(dy, x, *ctx.args), None, None, None


pn_act_fwd.register_autograd(_backward, setup_context=_setup)


def _no_second(ctx, grad):
    raise RuntimeError("mtcore::pixel_norm_act has no second derivative; use the reference kernels "
                       '(kernels = "reference") to differentiate through pixel norm twice')


pn_act_bwd.register_autograd(_no_second, setup_context=lambda ctx, inputs, output: None)


def pixel_norm_act(x: torch.Tensor, eps: float = 1e-8, act: str = "linear",
                   alpha: float = 0.2) -> torch.Tensor:
    """``act(x / sqrt(mean_c x^2 + eps))`` for x [N, C, ...] (Triton)."""
    code = check_pixel_norm_act_args(x, eps, act, alpha)
    check_device("x", x)
    return pn_act_fwd(x, float(eps), code, float(alpha))

"""Triton fused bias + activation + gain + clamp, the StyleGAN2 layer op (Karras et al. 2020).

Forward and first derivative are Triton kernels (``bias_act_fwd``, ``bias_act_grad``). The grad op
is itself differentiable: its backward is a composite of PyTorch ops (through the reference), so
double backward works, as the R1 penalty (Mescheder et al. 2018) needs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..reference.layers import bias_act as _ref_bias_act
from ..reference.layers import check_bias_act_args
from ._common import acc_dtype, block_for, check_device, make_op, num_blocks, sigmoid, tanh

__all__ = ["bias_act"]

ACT_NAMES = ("linear", "relu", "lrelu", "tanh", "sigmoid", "silu")


@triton.jit
def _load_z(x_ptr, b_ptr, offs, mask, C, inner, HAS_B: tl.constexpr, F64: tl.constexpr):
    """x + b[channel] in the accumulation dtype; channel = (offs // inner) % C."""
    z = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if F64:
        z = z.to(tl.float64)
    else:
        z = z.to(tl.float32)
    if HAS_B:
        ch = (offs // inner) % C
        z += tl.load(b_ptr + ch, mask=mask, other=0.0).to(z.dtype)
    return z


@triton.jit
def _act(z, alpha, ACT: tl.constexpr):
    if ACT == 0:
        a = z
    elif ACT == 1:
        a = tl.maximum(z, 0.0)
    elif ACT == 2:
        a = tl.where(z > 0.0, z, z * alpha)
    elif ACT == 3:
        a = tanh(z)
    elif ACT == 4:
        a = sigmoid(z)
    else:
        a = z * sigmoid(z)
    return a


@triton.jit
def _act_grad(z, alpha, ACT: tl.constexpr):
    """d act / dz; 0 (relu) or alpha (lrelu) at z = 0, as torch's backward."""
    if ACT == 0:
        d = tl.full(z.shape, 1.0, z.dtype)
    elif ACT == 1:
        d = tl.where(z > 0.0, 1.0, 0.0).to(z.dtype)
    elif ACT == 2:
        d = tl.where(z > 0.0, 1.0, alpha).to(z.dtype)
    elif ACT == 3:
        t = tanh(z)
        d = 1.0 - t * t
    elif ACT == 4:
        s = sigmoid(z)
        d = s * (1.0 - s)
    else:
        s = sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    return d


@triton.jit
def _scalars(coef_ptr, alpha_arg, gain_arg, clamp_arg, z, F64: tl.constexpr):
    """(alpha, gain, clamp) in the accumulation dtype: fp32 kernel arguments (Triton passes Python
    floats as fp32), or for fp64 maps a 3-element fp64 tensor, so they keep double precision."""
    if F64:  # one return: Triton checks every return's type, even in a constexpr branch
        alpha = tl.load(coef_ptr).to(z.dtype)
        gain = tl.load(coef_ptr + 1).to(z.dtype)
        clamp = tl.load(coef_ptr + 2).to(z.dtype)
    else:
        alpha = tl.full((), alpha_arg, tl.float32)
        gain = tl.full((), gain_arg, tl.float32)
        clamp = tl.full((), clamp_arg, tl.float32)
    return alpha, gain, clamp


@triton.jit
def _fwd_kernel(
    x_ptr,
    b_ptr,
    coef_ptr,
    y_ptr,
    numel,
    C,
    inner,
    alpha_arg,
    gain_arg,
    clamp_arg,
    ACT: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = _load_z(x_ptr, b_ptr, offs, mask, C, inner, HAS_B, F64)
    alpha, gain, clamp = _scalars(coef_ptr, alpha_arg, gain_arg, clamp_arg, z, F64)
    y = _act(z, alpha, ACT) * gain
    if HAS_CLAMP:
        y = tl.minimum(tl.maximum(y, -clamp), clamp)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_kernel(
    dy_ptr,
    x_ptr,
    b_ptr,
    coef_ptr,
    dx_ptr,
    numel,
    C,
    inner,
    alpha_arg,
    gain_arg,
    clamp_arg,
    ACT: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = _load_z(x_ptr, b_ptr, offs, mask, C, inner, HAS_B, F64)
    alpha, gain, clamp = _scalars(coef_ptr, alpha_arg, gain_arg, clamp_arg, z, F64)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(z.dtype)
    dx = dy * _act_grad(z, alpha, ACT) * gain
    if HAS_CLAMP:  # clamp passes the gradient where -clamp <= y <= clamp (torch.clamp's rule)
        y = _act(z, alpha, ACT) * gain
        dx = tl.where((y >= -clamp) & (y <= clamp), dx, 0.0)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _layout(x: torch.Tensor, dim: int) -> torch.memory_format:
    """The memory format the kernels walk ``x`` in: channels_last when ``x`` is a dense NHWC map
    with the bias along its channels (kept, as the native kernels keep it: no copy either way for
    a channels_last network), else contiguous (a copy when ``x`` is not)."""
    if (x.dim() == 4 and dim == 1 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)):
        return torch.channels_last
    return torch.contiguous_format


def _geometry(x: torch.Tensor, b: torch.Tensor | None, dim: int) -> tuple[int, int]:
    """(C, inner): the bias index of the i-th element in memory is (i // inner) % C."""
    if b is None:
        return 1, 1
    if _layout(x, dim) == torch.channels_last:
        return x.shape[1], 1  # memory order N, H, W, C
    inner = 1
    for d in x.shape[dim + 1 :]:
        inner *= d
    return x.shape[dim], inner


def _launch(kernel, inputs, x, b, dim, act, alpha, gain, clamp, out):
    c, inner = _geometry(x, b, dim)
    numel = x.numel()
    if numel == 0:
        return out
    block = block_for(numel)
    f64 = acc_dtype(x) == torch.float64
    # fp32 accumulation takes the constants as kernel arguments: no tensor built per call (a
    # host-to-device copy each time, which also stops CUDA-graph capture). fp64 needs them in
    # double precision, which Triton's float arguments are not: a small tensor then.
    coef = torch.tensor([alpha, gain, clamp], dtype=torch.float64, device=x.device) if f64 else out
    wrap_triton(kernel)[(num_blocks(numel, block),)](
        *inputs,
        coef,
        out,
        numel,
        c,
        inner,
        float(alpha),
        float(gain),
        float(clamp),
        ACT=int(act),
        HAS_B=b is not None,
        HAS_CLAMP=clamp >= 0.0,
        F64=f64,
        BLOCK=block,
    )
    return out


def _fwd(
    x: torch.Tensor,
    b: torch.Tensor | None,
    dim: int,
    act: int,
    alpha: float,
    gain: float,
    clamp: float,
) -> torch.Tensor:
    xc = x.contiguous(memory_format=_layout(x, dim))
    bc = b.contiguous() if b is not None else xc
    y = torch.empty_like(xc)
    return _launch(_fwd_kernel, (xc, bc), xc, b, dim, act, alpha, gain, clamp, y)


def _grad(
    dy: torch.Tensor,
    x: torch.Tensor,
    b: torch.Tensor | None,
    dim: int,
    act: int,
    alpha: float,
    gain: float,
    clamp: float,
) -> torch.Tensor:
    fmt = _layout(x, dim)
    xc = x.contiguous(memory_format=fmt)
    bc = b.contiguous() if b is not None else xc
    dyc = dy.to(x.dtype).contiguous(memory_format=fmt)  # walked in x's order
    dx = torch.empty_like(xc)
    return _launch(_grad_kernel, (dyc, xc, bc), xc, b, dim, act, alpha, gain, clamp, dx)


def _fwd_fake(x, b, dim, act, alpha, gain, clamp):
    return torch.empty_like(x, memory_format=_layout(x, dim))


def _grad_fake(dy, x, b, dim, act, alpha, gain, clamp):
    return torch.empty_like(x, memory_format=_layout(x, dim))


bias_act_fwd = make_op("bias_act_fwd", _fwd, _fwd_fake, _fwd_kernel)
bias_act_grad = make_op("bias_act_grad", _grad, _grad_fake, _grad_kernel)


def _bias_grad(dx: torch.Tensor, b: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    """db: dx summed over every dim but ``dim`` (None without a bias)."""
    if b is None:
        return None
    dims = [d for d in range(dx.dim()) if d != dim]
    return dx.sum(dim=dims) if dims else dx


def _fwd_setup(ctx, inputs, output):
    x, b, dim, act, alpha, gain, clamp = inputs
    ctx.args = (dim, act, alpha, gain, clamp)
    ctx.save_for_backward(x, b)


def _fwd_backward(ctx, dy):
    x, b = ctx.saved_tensors
    dx = bias_act_grad(dy, x, b, *ctx.args)
    return dx, _bias_grad(dx, b, ctx.args[0]), None, None, None, None, None


bias_act_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def _composite_grad(dy, x, b, dim, act, alpha, gain, clamp):
    """dx of the reference op by autograd (a composite of differentiable PyTorch ops)."""

    def f(xx, bb):
        return _ref_bias_act(
            xx, bb, dim, ACT_NAMES[act], alpha, gain, None if clamp < 0.0 else clamp
        )

    if b is None:
        return torch.func.vjp(lambda xx: f(xx, None), x)[1](dy)[0]
    return torch.func.vjp(f, x, b)[1](dy)[0]


def _grad_setup(ctx, inputs, output):
    dy, x, b, dim, act, alpha, gain, clamp = inputs
    ctx.args = (dim, act, alpha, gain, clamp)
    ctx.save_for_backward(dy, x, b)


def _grad_backward(ctx, g):
    """Second order: dx = dy * f(x + b) is linear in dy, so d/d dy is the grad op itself."""
    dy, x, b = ctx.saved_tensors
    dim, act = ctx.args[0], ctx.args[1]
    g_dy = bias_act_grad(g, x, b, *ctx.args)
    if ACT_NAMES[act] in ("linear", "relu", "lrelu"):  # piecewise linear: f'' = 0
        g_x = None
    else:
        # dx depends on x and b only through z = x + b, so d/db is d/dx summed over other dims
        _, vjp = torch.func.vjp(lambda xx: _composite_grad(dy, xx, b, *ctx.args), x)
        (g_x,) = vjp(g)
    g_b = _bias_grad(g_x, b, dim) if g_x is not None else None
    return g_dy, g_x, g_b, None, None, None, None, None


bias_act_grad.register_autograd(_grad_backward, setup_context=_grad_setup)


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    dim: int = 1,
    act: str = "linear",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """``act(x + b) * gain`` clamped to ``[-clamp, clamp]``, ``b`` broadcast along ``dim`` (Triton).

    Defaults as the reference: alpha 0.2 (lrelu), gain sqrt(2) for relu/lrelu else 1, no clamp.
    First and second derivatives with respect to ``x`` and ``b`` are supported.
    """
    dim_v, spec, alpha_v, gain_v, clamp_v = check_bias_act_args(x, b, dim, act, alpha, gain, clamp)
    check_device("x", x)
    return bias_act_fwd(x, b, dim_v, spec.code, alpha_v, gain_v, clamp_v)

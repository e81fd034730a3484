"""Fused bias + activation + gain + clamp (``mtcore::bias_act``), differentiable twice.

As in StyleGAN2 (Karras et al. 2020) the backward is itself an op, ``mtcore::bias_act_grad``, whose
autograd formula makes the R1 penalty's double backward work: w.r.t. ``dy`` it is bias_act_grad
again, w.r.t. ``x`` and ``b`` it uses the activation's second derivative (zero for linear, relu and
lrelu, so nothing is recomputed there). The backward keeps only ``y`` for relu/lrelu (the mask is
y's sign) or linear with clamp, and ``x`` (+ ``b``) for tanh/sigmoid/silu.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import layers as ref
from . import backend_for, native_ready

__all__ = ["bias_act"]

_LINEAR, _RELU, _LRELU, _TANH, _SIGMOID, _SILU = range(6)


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    dim: int = 1,
    act: str = "linear",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``clamp(act(x + b) * gain, -clamp, clamp)`` with ``b`` broadcast along ``dim``, in one pass.

    act in {linear, relu, lrelu, tanh, sigmoid, silu}; alpha defaults to 0.2 (lrelu only), gain to
    sqrt(2) for relu/lrelu else 1. The gradient is zero where ``|y| >= clamp`` (also at the bound;
    for linear/relu/lrelu in bf16/fp16, where the stored y rounds to +-clamp).
    See :func:`mtcore.kernels.reference.bias_act` for the oracle.
    """
    d, spec, alpha_v, gain_v, clamp_v = ref.check_bias_act_args(x, b, dim, act, alpha, gain, clamp)
    name = backend_for(x, backend, "bias_act")
    if name == "reference":
        return ref.bias_act(x, b, dim, act, alpha, gain, clamp)
    if name == "triton":
        return _backend.triton_function("bias_act")(x, b, dim, act, alpha, gain, clamp)
    native_ready("bias_act", _register)
    return torch.ops.mtcore.bias_act(x, b, d, spec.code, alpha_v, gain_v, clamp_v)


def _uses_x(act: int) -> bool:
    """Whether bias_act_grad reads x (+ b): the activations whose derivative needs z = x + b."""
    return act in (_TANH, _SIGMOID, _SILU)


def _uses_y(act: int, clamp: float) -> bool:
    """Whether bias_act_grad reads y: relu/lrelu take their mask from y's sign, linear its clamp mask."""
    return act in (_RELU, _LRELU) or (act == _LINEAR and clamp >= 0)


def _bias_grad(dx: torch.Tensor, dim: int) -> torch.Tensor:
    """db: dx summed over every dimension but ``dim`` (sum(dims=[]) would reduce them all)."""
    dims = [i for i in range(dx.dim()) if i != dim]
    return dx.sum(dims) if dims else dx


# ---------------------------------------------------------------- mtcore::bias_act


def _bias_act_fake(x, b, dim, act, alpha, gain, clamp):
    return torch.empty_like(x)


def _bias_act_setup(ctx, inputs, output):
    x, b, dim, act, alpha, gain, clamp = inputs
    ctx.params = (dim, act, alpha, gain, clamp)
    ctx.has_b = b is not None
    need_x = _uses_x(act)
    ctx.save_for_backward(
        x if need_x else None,
        b if need_x else None,
        output if _uses_y(act, clamp) else None,
    )


def _bias_act_backward(ctx, dy):
    x, b, y = ctx.saved_tensors
    dim, act, alpha, gain, clamp = ctx.params
    empty = dy.new_empty((0,))
    dx = torch.ops.mtcore.bias_act_grad(
        dy, empty if x is None else x, b, empty if y is None else y, dim, act, alpha, gain, clamp
    )
    db = None
    if ctx.has_b and ctx.needs_input_grad[1]:
        db = _bias_grad(dx, dim)
    return dx if ctx.needs_input_grad[0] else None, db, None, None, None, None, None


# ---------------------------------------------------------------- mtcore::bias_act_grad


def _bias_act_grad_fake(dy, x, b, y, dim, act, alpha, gain, clamp):
    # Same layout rule as the C++ kernel: the saved activation's strides when there is one.
    if _uses_y(act, clamp) and y.numel() > 0:
        return torch.empty_like(y)
    if _uses_x(act) and x.numel() > 0:
        return torch.empty_like(x)
    return torch.empty_like(dy)


def _bias_act_grad_setup(ctx, inputs, output):
    dy, x, b, y, dim, act, alpha, gain, clamp = inputs
    ctx.params = (dim, act, alpha, gain, clamp)
    ctx.has_b = b is not None
    ctx.save_for_backward(dy, x, b, y)


def _act_and_second_derivative(act: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(z), act''(z)) for tanh, sigmoid and silu, as differentiable torch ops."""
    if act == _TANH:
        t = torch.tanh(z)
        return t, -2.0 * t * (1.0 - t * t)
    s = torch.sigmoid(z)
    if act == _SIGMOID:
        return s, s * (1.0 - s) * (1.0 - 2.0 * s)
    return z * s, s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))  # silu


def _bias_act_grad_backward(ctx, g):
    dy, x, b, y = ctx.saved_tensors
    dim, act, alpha, gain, clamp = ctx.params
    d_dy = d_x = d_b = None
    if ctx.needs_input_grad[0]:  # dx is linear in dy: its transpose is bias_act_grad itself
        d_dy = torch.ops.mtcore.bias_act_grad(g, x, b, y, dim, act, alpha, gain, clamp)
    want_b = ctx.has_b and ctx.needs_input_grad[2]
    if _uses_x(act) and (ctx.needs_input_grad[1] or want_b):
        z = x
        if b is not None:
            shape = [1] * x.dim()
            shape[dim] = -1
            z = x + b.reshape(shape)
        v, f2 = _act_and_second_derivative(act, z)
        d_x = g * dy * (gain * f2)
        if clamp >= 0:  # the same mask as the kernel: recomputed, not read from y
            d_x = d_x * ((v * gain).abs() < clamp)
        if want_b:
            d_b = _bias_grad(d_x, dim)
        if not ctx.needs_input_grad[1]:
            d_x = None
    # relu/lrelu/linear: act'' = 0, so x and b get no second-order gradient; y is a saved
    # reference (its dependence on x is accounted for in d_x), never differentiated through.
    return d_dy, d_x, d_b, None, None, None, None, None, None


def _register() -> None:
    torch.library.register_fake("mtcore::bias_act", _bias_act_fake)
    torch.library.register_fake("mtcore::bias_act_grad", _bias_act_grad_fake)
    torch.library.register_autograd(
        "mtcore::bias_act", _bias_act_backward, setup_context=_bias_act_setup
    )
    torch.library.register_autograd(
        "mtcore::bias_act_grad", _bias_act_grad_backward, setup_context=_bias_act_grad_setup
    )

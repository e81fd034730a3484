"""Fused bias + activation + gain + clamp (``mtcore::bias_act``), differentiable twice.

As in StyleGAN2 (Karras et al. 2020) the backward is itself an op, ``mtcore::bias_act_grad``, whose
autograd formula (C++: csrc/autograd/bias_act_autograd.h) makes the R1 penalty's double backward work: w.r.t. ``dy`` it is bias_act_grad
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
    for linear/relu/lrelu in bf16/fp16, where the stored y rounds to +-clamp). ``b`` must have
    x's dtype, except under ``torch.autocast``, where it is cast to it. The native backends save
    ``y`` for relu/lrelu (and linear with a clamp): an in-place change of the output before the
    backward is then an autograd error, as after ``torch.sigmoid``; add out of place.
    See :func:`mtcore.kernels.reference.bias_act` for the oracle.
    """
    if (b is not None and b.dtype != x.dtype and x.is_floating_point() and b.is_floating_point()
            and torch.is_autocast_enabled(x.device.type)):
        b = b.to(x.dtype)  # under autocast the bias follows the activations, as a conv's own does
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


def _bias_act_fake(x, b, dim, act, alpha, gain, clamp):
    return torch.empty_like(x)


def _bias_act_grad_fake(dy, x, b, y, dim, act, alpha, gain, clamp):
    # Same layout rule as the C++ kernel: the saved activation's strides when there is one.
    if _uses_y(act, clamp) and y.numel() > 0:
        return torch.empty_like(y)
    if _uses_x(act) and x.numel() > 0:
        return torch.empty_like(x)
    return torch.empty_like(dy)


def _register() -> None:
    # The autograd formulas are C++ (csrc/autograd/bias_act_autograd.h).
    torch.library.register_fake("mtcore::bias_act", _bias_act_fake)
    torch.library.register_fake("mtcore::bias_act_grad", _bias_act_grad_fake)

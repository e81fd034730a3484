"""BatchNorm + activation in one pass (``mtcore::bn_act_fwd`` / ``mtcore::bn_act_bwd``).

The conv -> BatchNorm -> ReLU blocks of the backbones and decoders spend more time in BatchNorm
and the activation than in anything but the convolutions: ATen's channels-last BatchNorm
backward at 32 channels alone takes as long as ~15 copies of the tensor. The fused op normalises
and activates in one pass after the statistics, and its backward is two passes (the sums, then
dx), recomputing the activation's mask from x (csrc/cpu/batch_norm_act.cpp has the math;
autograd in C++: csrc/autograd/batch_norm_act_autograd.h). It has no second derivative (BatchNorm is in no
discriminator, the only network differentiated twice). CUDA: csrc/cuda/batch_norm_act.cu;
Triton: mtcore/kernels/triton_kernels/bn_act.py.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import layers as ref
from . import backend_for, native_ready, output_format

__all__ = ["batch_norm_act"]


def batch_norm_act(
    x: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    act: str = "relu",
    alpha: float = 0.2,
    backend: str | None = None,
) -> torch.Tensor:
    """``act(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))``.

    Arguments as :func:`torch.nn.functional.batch_norm`'s (in training the running statistics,
    if given, move towards the batch's by ``momentum``, the variance unbiased); act in {linear,
    relu, lrelu} with slope ``alpha`` for lrelu. x is [N, C, ...]; channels-last stays
    channels-last. See :func:`mtcore.kernels.reference.batch_norm_act` for the oracle.
    """
    code = ref.check_batch_norm_act_args(x, running_mean, running_var, weight, bias, training,
                                         eps, act, alpha)
    name = backend_for(x, backend, "bn_act_fwd")
    if name == "reference" or x.numel() == 0:  # an empty x: nothing to fuse, F.batch_norm's result
        return ref.batch_norm_act(x, running_mean, running_var, weight, bias, training, momentum,
                                  eps, act, alpha)
    if name == "triton":
        fwd = _backend.triton_function("batch_norm_act")
    else:
        native_ready("batch_norm_act", _register)
        fwd = torch.ops.mtcore.bn_act_fwd
    stats = (None, None) if training else (running_mean, running_var)
    y, mean, var = fwd(x, weight, bias, *stats, float(eps), code, float(alpha))
    if training and running_mean is not None:
        with torch.no_grad():  # F.batch_norm's update: the unbiased variance, weight `momentum`
            m = x.numel() // x.shape[1]
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * (m / (m - 1))).to(running_var.dtype), momentum)
    return y


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fwd_fake(x, weight, bias, running_mean, running_var, eps, act, alpha):
    c = x.shape[1]
    return (torch.empty_like(x, memory_format=output_format(x)),
            x.new_empty((c,), dtype=_stat_dtype(x)), x.new_empty((c,), dtype=_stat_dtype(x)))


def _bwd_fake(dy, x, weight, bias, mean, var, eps, act, alpha, training):
    c = x.shape[1]
    dtype = weight.dtype if weight is not None else _stat_dtype(x)
    return (torch.empty_like(x, memory_format=output_format(x)),
            x.new_empty((c,), dtype=dtype), x.new_empty((c,), dtype=dtype))


def _register() -> None:
    # The autograd formula is C++ (csrc/autograd/batch_norm_act_autograd.h).
    torch.library.register_fake("mtcore::bn_act_fwd", _fwd_fake)
    torch.library.register_fake("mtcore::bn_act_bwd", _bwd_fake)

"""Pixel norm + activation in one pass (``mtcore::pn_act_fwd`` / ``mtcore::pn_act_bwd``).

The GAN generator normalises each pixel's feature vector to unit RMS and then applies a leaky
ReLU (Karras et al. 2018). In eager PyTorch that is pow, mean, add, rsqrt, mul and leaky_relu,
and about twice as many ops backward, each a pass over the map; the fused op reads each pixel's
channels once forward and once backward (csrc/cpu/pixel_norm_act.cpp has the math; autograd in
C++: csrc/autograd/pixel_norm_act_autograd.h). No second derivative: the generator is never
differentiated twice. CUDA: csrc/cuda/pixel_norm_act.cu; Triton:
mtcore/kernels/triton_kernels/pn_act.py.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import layers as ref
from . import backend_for, native_ready, output_format

__all__ = ["pixel_norm_act"]


def pixel_norm_act(x: torch.Tensor, eps: float = 1e-8, act: str = "linear", alpha: float = 0.2,
                   backend: str | None = None) -> torch.Tensor:
    """``act(x * rsqrt(mean(x^2 over dim 1) + eps))`` for x [N, C, ...]; act in {linear, relu,
    lrelu} (slope ``alpha``). See :func:`mtcore.kernels.reference.pixel_norm_act` for the oracle."""
    code = ref.check_pixel_norm_act_args(x, eps, act, alpha)
    name = backend_for(x, backend, "pn_act_fwd")
    if name == "reference" or x.numel() == 0:
        return ref.pixel_norm_act(x, eps, act, alpha)
    if name == "triton":
        return _backend.triton_function("pixel_norm_act")(x, eps, act, alpha)
    native_ready("pixel_norm_act", _register)
    return torch.ops.mtcore.pn_act_fwd(x, float(eps), code, float(alpha))


def _fwd_fake(x, eps, act, alpha):
    return torch.empty_like(x, memory_format=output_format(x))


def _bwd_fake(dy, x, eps, act, alpha):
    return torch.empty_like(x, memory_format=output_format(x))


def _register() -> None:
    # The autograd formula is C++ (csrc/autograd/pixel_norm_act_autograd.h).
    torch.library.register_fake("mtcore::pn_act_fwd", _fwd_fake)
    torch.library.register_fake("mtcore::pn_act_bwd", _bwd_fake)

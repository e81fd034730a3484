"""Nearest x2 upsampling + 3x3 convolution as one stride-2 transposed convolution.

Upsampling by repeating each pixel 2x2 and then convolving with a 3x3 kernel ``w`` (padding 1)
gives each output pixel of phase (a, b) a 2x2 window of the input: the two kernel rows (and
columns) that land on the same input row are summed. Along one axis the four phases' taps are
``K = [w2, w1 + w2, w0 + w1, w0]`` (``K = F w`` with a 4x3 0/1 matrix ``F``), which is exactly a
transposed convolution with kernel 4, stride 2, padding 1: 4 instead of 9 multiply-adds per
output value and input channel (16 instead of 36 per 2x2 output block), and no 4x larger
upsampled map written and read back (nor its gradient). The function is the same as the
reference's; the sums run in another order (float rounding differs). The convolution itself is
ATen's (oneDNN on CPU, cuDNN on CUDA) on every non-reference backend; the fold of the weights is
an op of the cpp and cuda backends (``mtcore::upsample_fold``, csrc/cpu/upsample_fold.cpp and
csrc/cuda/upsample_fold.cu: a few adds per value, where two batched 3x3 matrix products cost
~0.1-0.5 ms a call on the CPU; C++ autograd, its backward its transpose) and the matrix products
on the triton backend.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..reference import layers as ref
from . import backend_for, native_ready

__all__ = ["fold_upsample_weight", "upsample_conv2d"]

# taps of the 3x3 kernel that each of the 4 transposed-kernel positions sums (one axis)
_FOLD = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))


def fold_upsample_weight(weight: torch.Tensor) -> torch.Tensor:
    """The ``[Cin, Cout, 4, 4]`` transposed-convolution kernel equal to upsample-then-``weight``
    (``[Cout, Cin, 3, 3]``): ``F w F^T`` per channel pair, differentiable."""
    f = _fold_matrix(weight.dtype, weight.device)
    return (f @ weight @ f.t()).transpose(0, 1)


@functools.cache
def _fold_matrix(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``F`` on ``device``, made once (a host-to-device copy per call would also stop CUDA-graph
    capture)."""
    return torch.tensor(_FOLD, dtype=dtype, device=device)


def upsample_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)``:
    x [N, Cin, H, W], weight [Cout, Cin, 3, 3] -> [N, Cout, 2H, 2W]. See
    :func:`mtcore.kernels.reference.upsample_conv2d` for the oracle."""
    ref.check_upsample_conv2d_args(x, weight, bias)
    name = backend_for(x, backend, "upsample_fold")
    if name == "reference":
        return ref.upsample_conv2d(x, weight, bias)
    if name in ("cpp", "cuda"):
        native_ready("upsample_conv2d", _register)
        kernel = torch.ops.mtcore.upsample_fold(weight)
    else:
        kernel = fold_upsample_weight(weight)
    return F.conv_transpose2d(x, kernel, bias, stride=2, padding=1)


def _fold_fake(weight):
    o, i = weight.shape[:2]
    return weight.new_empty((i, o, 4, 4))


def _fold_backward_fake(grad):
    i, o = grad.shape[:2]
    return grad.new_empty((o, i, 3, 3))


def _register() -> None:
    # The autograd formulas are C++ (csrc/autograd/upsample_fold_autograd.h).
    torch.library.register_fake("mtcore::upsample_fold", _fold_fake)
    torch.library.register_fake("mtcore::upsample_fold_backward", _fold_backward_fake)

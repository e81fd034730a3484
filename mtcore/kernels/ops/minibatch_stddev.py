"""Minibatch standard deviation layer (``mtcore::mbstd_fwd`` / ``mtcore::mbstd_bwd``).

StyleGAN2's discriminator layer (Karras et al. 2020): appends the per-group std of the features so
D can see the variety of a batch. The backward is an op too; its own backward (for R1's double
backward) is a composite of differentiable ATen ops (C++: csrc/autograd/).
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import layers as ref
from . import backend_for, native_ready

__all__ = ["minibatch_stddev"]


def minibatch_stddev(
    x: torch.Tensor, group_size: int = 4, num_channels: int = 1, backend: str | None = None
) -> torch.Tensor:
    """x [N, C, H, W] -> [N, C + num_channels, H, W] with the group std maps appended.

    G = min(group_size, N) must divide N and num_channels must divide C (else ValueError). See
    :func:`mtcore.kernels.reference.minibatch_stddev` for the oracle.
    """
    ref.check_mbstd_args(x, group_size, num_channels)
    name = backend_for(x, backend, "mbstd_fwd")
    if name == "reference":
        return ref.minibatch_stddev(x, group_size, num_channels)
    if name == "triton":
        return _backend.triton_function("minibatch_stddev")(x, group_size, num_channels)
    native_ready("minibatch_stddev", _register)
    return torch.ops.mtcore.mbstd_fwd(x, group_size, num_channels)


def _layout(x: torch.Tensor, num_channels: int) -> torch.memory_format:
    """The memory format of the C++ and CUDA kernels' outputs: they keep a channels-last x with one
    std channel (csrc/cpu/minibatch_stddev.cpp), otherwise outputs are NCHW-contiguous."""
    keep = (num_channels == 1 and x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))
    return torch.channels_last if keep else torch.contiguous_format


def _fwd_fake(x, group_size, num_channels):
    n, c, h, w = x.shape
    return torch.empty((n, c + num_channels, h, w), dtype=x.dtype, device=x.device,
                       memory_format=_layout(x, num_channels))


def _bwd_fake(grad_out, x, group_size, num_channels):
    return torch.empty_like(x, memory_format=_layout(x, num_channels))


def _register() -> None:
    torch.library.register_fake("mtcore::mbstd_fwd", _fwd_fake)
    torch.library.register_fake("mtcore::mbstd_bwd", _bwd_fake)
    # The autograd formulas are C++ (csrc/autograd/minibatch_stddev_autograd.h).

"""Minibatch standard deviation layer (``mtcore::mbstd_fwd`` / ``mtcore::mbstd_bwd``).

StyleGAN2's discriminator layer (Karras et al. 2020): appends the per-group std of the features so
D can see the variety of a batch. The backward is an op too; its own backward (for R1's double
backward) is a composite of differentiable torch ops.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import layers as ref
from . import backend_for, native_ready

__all__ = ["minibatch_stddev"]

_EPS = 1e-8


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


def _fwd_fake(x, group_size, num_channels):
    n, c, h, w = x.shape
    return x.new_empty((n, c + num_channels, h, w))


def _bwd_fake(grad_out, x, group_size, num_channels):
    return x.new_empty(x.shape)


def _fwd_setup(ctx, inputs, output):
    x, group_size, num_channels = inputs
    ctx.params = (group_size, num_channels)
    ctx.save_for_backward(x)


def _fwd_backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return torch.ops.mtcore.mbstd_bwd(grad_out, x, *ctx.params), None, None


def _bwd_setup(ctx, inputs, output):
    grad_out, x, group_size, num_channels = inputs
    ctx.params = (group_size, num_channels)
    ctx.save_for_backward(grad_out, x)


def _bwd_backward(ctx, gg):
    """Transpose of dx = go_x + S/(K G) * d/s (see csrc/cpu/minibatch_stddev.cpp), as torch ops."""
    grad_out, x = ctx.saved_tensors
    group_size, f = ctx.params
    n, c, h, w = x.shape
    g = min(group_size, n)
    m = n // g
    k = (c // f) * h * w
    xr = x.reshape(g, m, f, c // f, h, w)
    d = xr - xr.mean(0)
    s = torch.sqrt(d.square().mean(0) + _EPS)
    ggr = gg.reshape(g, m, f, c // f, h, w)
    d_go = d_x = None
    if ctx.needs_input_grad[0]:
        t = (ggr * d / s).sum((0, 3, 4, 5)) / (k * g)  # [M, F]: d sigma in direction gg
        t_maps = t.reshape(1, m, f, 1, 1).expand(g, m, f, h, w).reshape(n, f, h, w)
        d_go = torch.cat([gg, t_maps], 1)
    if ctx.needs_input_grad[1]:
        big_s = grad_out[:, c:].reshape(g, m, f, h, w).sum((0, 3, 4))  # [M, F]
        a = (big_s / (k * g)).reshape(1, m, f, 1, 1, 1)
        p = (ggr * d).sum(0)
        d_x = a * ((ggr - ggr.mean(0)) / s - p * d / (g * s**3))
        d_x = d_x.reshape(n, c, h, w)
    return d_go, d_x, None, None


def _register() -> None:
    torch.library.register_fake("mtcore::mbstd_fwd", _fwd_fake)
    torch.library.register_fake("mtcore::mbstd_bwd", _bwd_fake)
    torch.library.register_autograd("mtcore::mbstd_fwd", _fwd_backward, setup_context=_fwd_setup)
    torch.library.register_autograd("mtcore::mbstd_bwd", _bwd_backward, setup_context=_bwd_setup)

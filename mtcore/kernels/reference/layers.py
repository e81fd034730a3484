"""Reference (pure PyTorch) layer ops: fused bias + activation, and minibatch standard deviation.

These are the oracles the C++, CUDA and Triton kernels are tested against. ``bias_act`` follows
the fused op of StyleGAN2 (Karras et al. 2020, "Analyzing and Improving the Image Quality of
StyleGAN"); ``minibatch_stddev`` is the discriminator layer of the same paper (introduced in
Karras et al. 2018, "Progressive Growing of GANs").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "ActSpec",
    "bias_act",
    "check_bias_act_args",
    "check_mbstd_args",
    "minibatch_stddev",
]


@dataclass(frozen=True)
class ActSpec:
    """An activation of ``bias_act``: its integer code in the C++ schema and its default gain."""

    code: int
    default_gain: float
    has_2nd_grad: bool


ACTIVATIONS: dict[str, ActSpec] = {
    "linear": ActSpec(0, 1.0, False),
    "relu": ActSpec(1, math.sqrt(2.0), False),
    "lrelu": ActSpec(2, math.sqrt(2.0), False),
    "tanh": ActSpec(3, 1.0, True),
    "sigmoid": ActSpec(4, 1.0, True),
    "silu": ActSpec(5, 1.0, True),
}

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_bias_act_args(
    x: torch.Tensor,
    b: torch.Tensor | None,
    dim: int,
    act: str,
    alpha: float | None,
    gain: float | None,
    clamp: float | None,
) -> tuple[int, ActSpec, float, float, float]:
    """Validate ``bias_act``'s arguments; returns (dim >= 0, spec, alpha, gain, clamp or -1.0)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"bias_act: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"bias_act: x must be a floating point tensor, got x of dtype {x.dtype} "
            f"and shape {tuple(x.shape)}"
        )
    if act not in ACTIVATIONS:
        raise ValueError(f"bias_act: unknown act {act!r}; expected one of {tuple(ACTIVATIONS)}")
    spec = ACTIVATIONS[act]
    if b is not None:
        if x.dim() == 0:
            raise ValueError("bias_act: x is 0-d, so it has no dimension to add the bias b along")
        if not -x.dim() <= dim < x.dim():
            raise ValueError(f"bias_act: dim={dim} is out of range for x of shape {tuple(x.shape)}")
        dim = dim % x.dim()
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"bias_act: b must be a torch.Tensor or None, got {type(b).__name__}")
        if b.dim() != 1 or b.shape[0] != x.shape[dim]:
            raise ValueError(
                f"bias_act: b must have shape [x.shape[dim]] = [{x.shape[dim]}] "
                f"(x of shape {tuple(x.shape)}, dim={dim}), got b of shape {tuple(b.shape)}"
            )
        if b.dtype != x.dtype:
            raise TypeError(
                f"bias_act: b has dtype {b.dtype} but x has dtype {x.dtype}; they must match"
            )
        if b.device != x.device:
            raise ValueError(f"bias_act: b is on {b.device} but x is on {x.device}")
    else:
        dim = 0  # without a bias, dim plays no part
    if act == "lrelu":
        alpha_v = 0.2 if alpha is None else float(alpha)
        if not (alpha_v >= 0.0 and math.isfinite(alpha_v)):
            raise ValueError(
                f"bias_act: alpha must be a finite number >= 0 for lrelu, got {alpha!r}"
            )
    else:
        alpha_v = 0.0  # relu is lrelu with slope 0; the other activations ignore alpha
    gain_v = float(gain) if gain is not None else spec.default_gain
    if not math.isfinite(gain_v):
        raise ValueError(f"bias_act: gain must be finite, got {gain!r}")
    if clamp is None:
        clamp_v = -1.0
    else:
        clamp_v = float(clamp)
        if not clamp_v >= 0.0:
            raise ValueError(f"bias_act: clamp must be None or >= 0, got {clamp!r}")
    return dim, spec, alpha_v, gain_v, clamp_v


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    dim: int = 1,
    act: str = "linear",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """``act(x + b) * gain``, then clamped to ``[-clamp, clamp]``; ``b`` is broadcast along ``dim``.

    act is one of linear, relu, lrelu (slope ``alpha``, default 0.2), tanh, sigmoid, silu; gain
    defaults to sqrt(2) for relu/lrelu (He-style variance preservation, as in StyleGAN2), else 1.
    """
    dim, _, alpha_v, gain_v, clamp_v = check_bias_act_args(x, b, dim, act, alpha, gain, clamp)
    if b is not None:
        shape = [1] * x.dim()
        shape[dim] = -1
        x = x + b.reshape(shape)
    if act == "relu":
        x = F.relu(x)
    elif act == "lrelu":
        x = F.leaky_relu(x, alpha_v)
    elif act == "tanh":
        x = torch.tanh(x)
    elif act == "sigmoid":
        x = torch.sigmoid(x)
    elif act == "silu":
        x = F.silu(x)
    if gain_v != 1.0:
        x = x * gain_v
    if clamp_v >= 0.0:
        x = x.clamp(-clamp_v, clamp_v)
    return x


def check_mbstd_args(x: torch.Tensor, group_size: int, num_channels: int) -> tuple[int, int]:
    """Validate ``minibatch_stddev``'s arguments; returns (G, F) = (min(group_size, N), num_channels)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"minibatch_stddev: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"minibatch_stddev: x must be a floating point tensor, got x of dtype {x.dtype} "
            f"and shape {tuple(x.shape)}"
        )
    if x.dim() != 4:
        raise ValueError(
            f"minibatch_stddev: x must be [N, C, H, W], got x of shape {tuple(x.shape)}"
        )
    n, c = x.shape[0], x.shape[1]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"minibatch_stddev: group_size must be an int >= 1, got {group_size!r}")
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
        raise ValueError(
            f"minibatch_stddev: num_channels must be an int >= 1, got {num_channels!r}"
        )
    if n == 0:
        raise ValueError(f"minibatch_stddev: x has an empty batch (shape {tuple(x.shape)})")
    if c == 0:  # the statistic would be a mean over nothing
        raise ValueError(f"minibatch_stddev: x has no channels (shape {tuple(x.shape)})")
    g = min(group_size, n)
    if n % g != 0:
        raise ValueError(
            f"minibatch_stddev: the batch size N={n} of x (shape {tuple(x.shape)}) must be divisible "
            f"by the group size G=min(group_size, N)={g}"
        )
    if c % num_channels != 0:
        raise ValueError(
            f"minibatch_stddev: the channel count C={c} of x (shape {tuple(x.shape)}) must be "
            f"divisible by num_channels={num_channels}"
        )
    return g, num_channels


def minibatch_stddev(x: torch.Tensor, group_size: int = 4, num_channels: int = 1) -> torch.Tensor:
    """Append ``num_channels`` feature maps holding the per-group standard deviation of ``x``.

    x [N, C, H, W] -> [N, C + F, H, W]. Samples n = g*(N//G) + m (g < G) form group column m; the
    std over g is averaged over the channels of each of the F channel groups and over H, W.
    """
    g, f = check_mbstd_args(x, group_size, num_channels)
    n, c, h, w = x.shape
    y = x.reshape(g, n // g, f, c // f, h, w)
    y = y - y.mean(dim=0)
    y = torch.sqrt(y.square().mean(dim=0) + 1e-8)
    y = y.mean(dim=(2, 3, 4))  # [N//G, F]
    y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w)  # sample n uses group column n % (N//G)
    return torch.cat([x, y], dim=1)

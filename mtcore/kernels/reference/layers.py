"""Reference (pure PyTorch) layer ops: fused bias + activation, minibatch standard deviation,
BatchNorm + activation, pixel norm + activation and nearest x2 upsampling + 3x3 convolution.

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
    "NORM_ACTIVATIONS",
    "batch_norm_act",
    "bias_act",
    "check_batch_norm_act_args",
    "check_bias_act_args",
    "check_mbstd_args",
    "check_pixel_norm_act_args",
    "check_upsample_conv2d_args",
    "minibatch_stddev",
    "pixel_norm_act",
    "upsample_conv2d",
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


#: activations of ``batch_norm_act``: name -> code in the C++ schema (bias_act's codes)
NORM_ACTIVATIONS: dict[str, int] = {"linear": 0, "relu": 1, "lrelu": 2}


def _check_norm_act_input(op: str, x: torch.Tensor, eps: float, act: str, alpha: float) -> None:
    """The checks batch_norm_act and pixel_norm_act share: x a float [N, C, ...] tensor, a known
    activation, alpha >= 0 for lrelu, eps > 0."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be a floating point tensor, got x of dtype {x.dtype} and "
                        f"shape {tuple(x.shape)}")
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be [N, C, ...], got x of shape {tuple(x.shape)}")
    if act not in NORM_ACTIVATIONS:
        raise ValueError(f"{op}: unknown act {act!r}; expected one of {tuple(NORM_ACTIVATIONS)}")
    if act == "lrelu" and not (alpha >= 0.0 and math.isfinite(alpha)):
        raise ValueError(f"{op}: alpha must be a finite number >= 0 for lrelu, got {alpha!r}")
    if not eps > 0:
        raise ValueError(f"{op}: eps must be > 0, got {eps!r}")


def _check_channel_vector(name: str, t: torch.Tensor | None, x: torch.Tensor, op: str) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != x.shape[1]:
        raise ValueError(f"{op}: {name} must have shape [C] = [{x.shape[1]}] (x of shape "
                         f"{tuple(x.shape)}), got {name} of shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating point tensor, got dtype {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def check_batch_norm_act_args(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    eps: float,
    act: str,
    alpha: float,
) -> int:
    """Validate ``batch_norm_act``'s arguments; returns the activation's code."""
    op = "batch_norm_act"
    _check_norm_act_input(op, x, eps, act, alpha)
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        _check_channel_vector(name, t, x, op)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: give both running_mean and running_var or neither")
    if not training and running_mean is None:
        raise ValueError(f"{op}: training=False normalises with the running statistics, but "
                         "running_mean and running_var are None")
    if training and x.numel() // max(x.shape[1], 1) == 1:  # F.batch_norm's rule: empty is fine
        raise ValueError(f"{op}: training statistics need more than one value per channel, got x "
                         f"of shape {tuple(x.shape)}")
    return NORM_ACTIVATIONS[act]


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
) -> torch.Tensor:
    """``act(F.batch_norm(x, ...))``: BatchNorm (arguments as ``F.batch_norm``'s) followed by
    linear, relu or lrelu (slope ``alpha``)."""
    check_batch_norm_act_args(x, running_mean, running_var, weight, bias, training, eps, act,
                              alpha)
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    # in place on BatchNorm's fresh output, as nn.ReLU(inplace=True) after nn.BatchNorm2d
    if act == "relu":
        return F.relu(y, inplace=True)
    if act == "lrelu":
        return F.leaky_relu(y, alpha, inplace=True)
    return y


def check_pixel_norm_act_args(x: torch.Tensor, eps: float, act: str, alpha: float) -> int:
    """Validate ``pixel_norm_act``'s arguments; returns the activation's code."""
    op = "pixel_norm_act"
    _check_norm_act_input(op, x, eps, act, alpha)
    return NORM_ACTIVATIONS[act]


def pixel_norm_act(x: torch.Tensor, eps: float = 1e-8, act: str = "linear",
                   alpha: float = 0.2) -> torch.Tensor:
    """``act(x / sqrt(mean_c x^2 + eps))``: each pixel's feature vector scaled to unit RMS
    (Karras et al. 2018, progressive GANs), then linear, relu or lrelu (slope ``alpha``)."""
    check_pixel_norm_act_args(x, eps, act, alpha)
    y = x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)
    if act == "relu":  # in place on the fresh product, as nn.ReLU(inplace=True) after PixelNorm
        return F.relu(y, inplace=True)
    if act == "lrelu":
        return F.leaky_relu(y, alpha, inplace=True)
    return y


def check_upsample_conv2d_args(x: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor | None) -> None:
    """Validate ``upsample_conv2d``'s arguments (x [N, Cin, H, W], weight [Cout, Cin, 3, 3])."""
    op = "upsample_conv2d"
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be a floating point tensor, got dtype {t.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be [N, C, H, W], got x of shape {tuple(x.shape)}")
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 3, 3):
        raise ValueError(f"{op}: weight must be [C_out, {x.shape[1]}, 3, 3] for x of shape "
                         f"{tuple(x.shape)}, got weight of shape {tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor)
                             or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"{op}: bias must be None or of shape [{weight.shape[0]}], got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else bias!r}")


def upsample_conv2d(x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest x2 upsampling, then a 3x3 convolution with padding 1: the decoders' upsampling
    stage, ``[N, Cin, H, W] -> [N, Cout, 2H, 2W]``."""
    check_upsample_conv2d_args(x, weight, bias)
    return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)

"""``FusedSequential``: an ``nn.Sequential`` whose norm + activation and upsample + conv pairs run
as mtcore's fused ops; ``PixelNorm``, the GAN generator's normalisation.

The model keeps plain ``nn.BatchNorm2d``/``nn.ReLU``/``nn.Upsample``/``nn.Conv2d`` children, so its
structure, state dict and checkpoints are those of the unfused network; only the forward changes:

- ``BatchNorm2d`` followed by ``ReLU`` or ``LeakyReLU`` (slope >= 0) runs as one
  :func:`~mtcore.kernels.batch_norm_act` (a ``BatchNorm2d`` followed by anything else runs as
  ``batch_norm_act`` with ``act="linear"``), with ``nn.BatchNorm2d``'s semantics: train/eval
  statistics, momentum (or the cumulative average when it is None), ``num_batches_tracked``,
  ``track_running_stats``;
- :class:`PixelNorm` followed by ``ReLU`` or ``LeakyReLU`` runs as one
  :func:`~mtcore.kernels.pixel_norm_act` (a lone ``PixelNorm`` runs it with ``act="linear"``);
- ``Upsample(scale_factor=2, mode="nearest")`` followed by a 3x3, stride-1, padding-1 ``Conv2d``
  runs as one :func:`~mtcore.kernels.upsample_conv2d`.

A pair is left unfused when either module has forward or backward hooks (or global module hooks
are set), so hooks always see what they expect. With the reference backend the fused ops are the plain
PyTorch modules' computation, so the two layouts agree exactly there.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

from .ops.batch_norm_act import batch_norm_act
from .ops.pixel_norm_act import pixel_norm_act
from .ops.upsample_conv import upsample_conv2d

__all__ = ["FusedSequential", "PixelNorm"]


class PixelNorm(nn.Module):
    """Scale each pixel's feature vector to unit RMS (Karras et al. 2018, progressive GANs): a
    normalisation with no batch statistics, so an EMA copy of the weights samples correctly."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_norm_act(x, self.eps, "linear")

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def _hooked(m: nn.Module) -> bool:
    """Whether ``m`` has forward or backward hooks (a fused pair would bypass them)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def _activation(m: nn.Module | None) -> tuple[str, float, int]:
    """(act, alpha, modules consumed) for what follows a BatchNorm2d."""
    if type(m) is nn.ReLU and not _hooked(m):
        return "relu", 0.0, 2
    if type(m) is nn.LeakyReLU and m.negative_slope >= 0 and not _hooked(m):
        return "lrelu", float(m.negative_slope), 2
    return "linear", 0.0, 1


def _is_upsample2(m: nn.Module) -> bool:
    if type(m) is not nn.Upsample or m.mode != "nearest" or m.size is not None:
        return False
    s = m.scale_factor
    return all(float(v) == 2.0 for v in (s if isinstance(s, tuple) else (s, s)))


def _is_conv3(m: nn.Module | None) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.stride == (1, 1)
            and m.padding == (1, 1) and m.dilation == (1, 1) and m.groups == 1
            and m.padding_mode == "zeros" and not _hooked(m))


def _batch_norm_module_act(bn: nn.BatchNorm2d, x: torch.Tensor, act: str,
                           alpha: float) -> torch.Tensor:
    """``act(bn(x))`` through :func:`batch_norm_act`, with ``nn.BatchNorm2d.forward``'s rules for
    the statistics (train/eval, momentum, num_batches_tracked, track_running_stats)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    return batch_norm_act(x, bn.running_mean if keep else None, bn.running_var if keep else None,
                          bn.weight, bn.bias, training, factor, bn.eps, act, alpha)


class FusedSequential(nn.Sequential):
    """``nn.Sequential`` running BatchNorm2d/PixelNorm + ReLU/LeakyReLU and nearest-x2 Upsample +
    3x3 Conv2d pairs as fused ops (see the module docstring); same children, same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mods = list(self._modules.values())
        fuse = not _global_hooks()
        i = 0
        while i < len(mods):
            m = mods[i]
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            if fuse and type(m) is nn.BatchNorm2d and not _hooked(m) and x.dim() == 4:
                act, alpha, used = _activation(nxt)
                x = _batch_norm_module_act(m, x, act, alpha)
                i += used
            elif fuse and type(m) is PixelNorm and not _hooked(m):
                act, alpha, used = _activation(nxt)
                x = pixel_norm_act(x, m.eps, act, alpha)
                i += used
            elif fuse and _is_upsample2(m) and not _hooked(m) and _is_conv3(nxt) and x.dim() == 4:
                x = upsample_conv2d(x, nxt.weight, nxt.bias)
                i += 2
            else:
                x = m(x)
                i += 1
        return x

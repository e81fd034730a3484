"""Fused cross entropy for segmentation ([N, C, *spatial]) and classification ([N, C]) logits.

The C++/CUDA op ``mtcore::seg_ce_fwd`` returns the loss and d(loss)/d(logits) from one pass (no
softmax is kept); the autograd backward (C++) only scales that gradient. First derivatives only.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import losses as ref
from . import backend_for, native_ready

__all__ = ["seg_cross_entropy"]


def seg_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """Cross entropy over dim 1, equal to ``F.cross_entropy`` except: a mean over zero targets is 0.

    ``weight`` (per-class) gets no gradient on the fused backends: one that requires grad is a
    ValueError there (the reference differentiates it). ``backend`` overrides the
    configured kernel backend (see :mod:`mtcore.kernels`).
    """
    ref.check_seg_ce_args(logits, target, weight, label_smoothing, reduction, ignore_index)
    name = backend_for(logits, backend, "seg_ce_fwd")
    if name == "reference":
        return ref.seg_cross_entropy(
            logits, target, weight, ignore_index, label_smoothing, reduction
        )
    ref.check_constant_weight(weight)
    if logits.dtype == torch.float16:
        # The fused gradient is stored pre-scaled by 1/#targets, which in fp16 sinks into the
        # subnormals (or to 0) before a GradScaler factor could lift it: compute in fp32, as
        # torch.autocast runs cross entropy, and hand back an fp16 loss.
        w = weight.float() if weight is not None and weight.dtype == torch.float16 else weight
        return seg_cross_entropy(logits.float(), target, w, ignore_index, label_smoothing,
                                 reduction, backend=name).to(torch.float16)
    if name == "triton":  # it checks the target values itself
        fn = _backend.triton_function("seg_cross_entropy")
        return fn(logits, target, weight, ignore_index, label_smoothing, reduction)
    native_ready("seg_ce_fwd", _register)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = torch.ops.mtcore.seg_ce_fwd(
        logits,
        target.long(),  # the kernels read int64; int32/uint8 masks are accepted as everywhere
        weight,
        int(ignore_index),
        float(label_smoothing),
        ref.REDUCTIONS.index(reduction),
        compute_grad,
    )
    return loss


def _fake(logits, target, weight, ignore_index, label_smoothing, reduction, compute_grad):
    loss = logits.new_empty(target.shape) if reduction == 0 else logits.new_empty(())
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0,))
    return loss, grad


def _register() -> None:
    # The autograd formula is C++ (csrc/autograd/seg_cross_entropy_autograd.h).
    torch.library.register_fake("mtcore::seg_ce_fwd", _fake)

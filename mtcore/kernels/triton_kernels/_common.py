"""Shared pieces of the Triton ops: op registration, block sizes and numerically careful math.

Every op is a ``torch.library.triton_op`` (namespace ``mtcore_triton``) so ``torch.compile`` sees
its kernels. Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tests) ``wrap_triton``
cannot hide a launch from FakeTensors, so there the op gets a shape-only fake kernel and stays
opaque to functionalization instead of being decomposed into its kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op

__all__ = [
    "INTERPRETED",
    "NAMESPACE",
    "acc_dtype",
    "check_device",
    "block_for",
    "channel_block",
    "is_interpreted",
    "log1p_exp_neg_abs",
    "make_op",
    "neg_slope",
    "num_blocks",
    "sigmoid",
    "tanh",
]

NAMESPACE = "mtcore_triton"
MAX_BLOCK = 1024


def is_interpreted(kernel: Any) -> bool:
    """True if ``kernel`` runs in the Triton interpreter (TRITON_INTERPRET=1 at decoration time)."""
    return type(kernel).__name__ == "InterpretedFunction"


def make_op(name: str, fn: Callable[..., Any], fake: Callable[..., Any], kernel: Any) -> Any:
    """Register ``fn`` as ``mtcore_triton::<name>`` with ``triton_op``; return the CustomOpDef.

    ``fake`` computes output metadata only. It replaces the traced-``fn`` fake kernel when
    ``kernel`` is interpreted, where launching on FakeTensors would read their (absent) data.
    """
    op = triton_op(f"{NAMESPACE}::{name}", fn, mutates_args=())
    if is_interpreted(kernel):
        op.register_fake(fake)

        def _opaque(mode: Any, op_: Any, types: Any, args: Any, kwargs: Any) -> Any:
            return mode.__torch_dispatch__(op_, types, args, kwargs)

        op.register_torch_dispatch(FunctionalTensorMode, _opaque)
    return op


def check_device(name: str, t: torch.Tensor) -> None:
    """ValueError unless the kernels can read ``t``: CUDA, or any device when interpreted."""
    if not INTERPRETED and t.device.type != "cuda":
        raise ValueError(
            f"the triton backend runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1 set "
            f"before mtcore's triton kernels are imported); {name} is on {t.device} "
            f"(shape {tuple(t.shape)}, dtype {t.dtype})"
        )


def channel_block(c: int) -> int:
    """The channel tile of the norm + activation kernels: C rounded up to a power of 2, <= 64."""
    return min(64, triton.next_power_of_2(max(int(c), 1)))


def neg_slope(act: int, alpha: float) -> float:
    """act' below zero of the norm + activation ops' codes: linear 1, relu 0, lrelu alpha."""
    return 1.0 if act == 0 else (0.0 if act == 1 else float(alpha))


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype kernels accumulate in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def block_for(n: int, cap: int = MAX_BLOCK, floor: int = 16) -> int:
    """A power-of-two block size covering ``n`` elements, between ``floor`` and ``cap``."""
    return max(floor, min(cap, triton.next_power_of_2(max(int(n), 1))))


def num_blocks(n: int, block: int) -> int:
    """Programs needed to cover ``n`` elements with ``block`` each."""
    return triton.cdiv(int(n), block)


@triton.jit
def _probe(x_ptr):
    pass


INTERPRETED = is_interpreted(_probe)
"""Whether this process's kernels run in the Triton interpreter (decided when they were defined)."""


@triton.jit
def log1p_exp_neg_abs(x):
    """log(1 + exp(-|x|)), accurate also where exp(-|x|) is small: a two-term series below 1e-4,
    above it log(u) * t / (u - 1) with u = 1 + t, which cancels the rounding of 1 + t (a plain
    log(1 + t) is 5e-4 off in fp32 near |x| = 9)."""
    t = tl.exp(-tl.abs(x))
    u = 1.0 + t
    d = u - 1.0
    return tl.where(t < 1e-4, t * (1.0 - 0.5 * t), tl.log(u) * (t / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def sigmoid(x):
    """1 / (1 + exp(-x)), from exp(-|x|) so nothing overflows."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def tanh(x):
    """tanh(x) from exp (libdevice is unavailable in the interpreter); a series near 0."""
    x2 = x * x
    small = x * (
        1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0))))
    )
    e = tl.exp(-2.0 * tl.abs(x))
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    return tl.where(tl.abs(x) < 0.125, small, big)

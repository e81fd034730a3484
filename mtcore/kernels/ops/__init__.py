"""Dispatching wrappers of the fused ops, plus the shared glue every op module uses.

Each op module defines its public function (argument checks -> :func:`backend_for` -> reference,
triton, or ``torch.ops.mtcore.*``) and a ``_register()`` that adds ``register_fake`` to its C++
ops (their autograd formulas are C++ too: ``csrc/autograd/``, registered for the Autograd key, where
a forward + backward costs ~10 us instead of ~100 us through ``torch.library.register_autograd``).
The C++ ops exist only once the extension is loaded, so registration runs lazily, once, via
:func:`native_ready`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from .. import _backend, _build

__all__ = ["backend_for", "native_ready", "output_format"]

_done: set[str] = set()
_lock = threading.Lock()


def native_ready(key: str, register: Callable[[], None]) -> None:
    """Load the extension (building lazily) and run ``register`` once per process for ``key``.

    ``register`` calls torch.library.register_fake for the module's ops.
    Call it before using ``torch.ops.mtcore.<op>``; cheap after the first call.
    """
    if key in _done:
        return
    with _lock:
        if key in _done:
            return
        if not _build.load_ops():
            raise RuntimeError(f"mtcore C++ kernels are not available: {_build.build_error()}")
        register()
        _done.add(key)


def backend_for(tensor: torch.Tensor, backend: str | None, op: str) -> str:
    """The concrete backend for ``op`` (a ``torch.ops.mtcore`` op name) on ``tensor``'s device.

    Thin alias of :func:`mtcore.kernels._backend.resolve` so op modules share one call.
    """
    return _backend.resolve(tensor, backend, op=op)


def output_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the layer kernels (batch_norm_act, pixel_norm_act) give their outputs, on every
    backend: a channels-last x stays so, anything else is made contiguous."""
    nhwc = (x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))
    return torch.channels_last if nhwc else torch.contiguous_format

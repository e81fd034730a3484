"""Dispatching wrappers of the fused ops, plus the shared glue every op module uses.

Each op module defines its public function (argument checks -> :func:`backend_for` -> reference,
triton, or ``torch.ops.mtcore.*``) and a ``_register()`` that adds ``register_fake`` and
``register_autograd`` to its C++ ops. The C++ ops exist only once the extension is loaded, so
registration runs lazily, once, via :func:`native_ready`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import is_fake

from .. import _backend, _build

__all__ = ["backend_for", "is_one", "native_ready"]

_done: set[str] = set()
_lock = threading.Lock()


def native_ready(key: str, register: Callable[[], None]) -> None:
    """Load the extension (building lazily) and run ``register`` once per process for ``key``.

    ``register`` calls torch.library.register_fake / register_autograd for the module's ops.
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


def or_zero(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """An incoming gradient, or a zero scalar where autograd passed None (an unused output).

    The ops call ``ctx.set_materialize_grads(False)``: otherwise autograd fills a zero tensor the
    size of every unused output (the stored gradients), costing a full pass and its memory."""
    return like.new_zeros(()) if g is None else g


def is_one(g: torch.Tensor) -> bool:
    """True if ``g`` is a real (not traced) scalar equal to 1: the backward may then hand back the
    stored gradient itself, saving a pass and an allocation (autograd steals it into .grad)."""
    if g.numel() != 1 or torch.compiler.is_compiling() or is_fake(g):
        return False
    return bool(g.reshape(()) == 1)

"""Which kernel backend runs an op: reference (PyTorch), cpp (csrc/cpu), cuda (csrc/cuda) or triton.

Precedence: the ``backend=`` argument of a call > :func:`set_backend` (the config key ``kernels``)
> the environment variable ``MTCORE_KERNELS`` > ``"auto"``. ``auto`` picks, for a CUDA tensor,
cuda if built, else triton if available, else reference; for a CPU tensor, cpp if the build works,
else reference. A configured backend that is unavailable warns once and falls back to ``auto``; an
unavailable backend passed explicitly as ``backend=`` raises.

Inside a ``torch.func`` transform (grad, vjp, jacrev, vmap, ...) or a forward-mode AD level
(``torch.autograd.forward_ad.dual_level``) only the reference is available:
the native ops' autograd is a C++ Function and the Triton ops' a ``torch.library`` one, and
functorch can differentiate neither. So auto picks the reference there.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import _build

__all__ = [
    "BACKENDS",
    "available_backends",
    "get_backend",
    "resolve",
    "set_backend",
    "triton_function",
    "using_backend",
]

BACKENDS = ("reference", "cpp", "cuda", "triton")
_CHOICES = (*BACKENDS, "auto")
ENV_VAR = "MTCORE_KERNELS"

_selected: str | None = None
_warned: set[str] = set()


def _check_name(name: str, where: str) -> str:
    if not isinstance(name, str) or name.lower() not in _CHOICES:
        raise ValueError(f"{where}: unknown kernel backend {name!r}; expected one of {_CHOICES}")
    return name.lower()


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` or ``"auto"`` restores automatic choice)."""
    global _selected
    _selected = None if name is None else _check_name(name, "set_backend")


@contextlib.contextmanager
def using_backend(name: str | None) -> Iterator[None]:
    """:func:`set_backend` for the block; afterwards the setting is exactly what it was (unset
    stays unset, so ``MTCORE_KERNELS`` still counts). Process-wide while it lasts."""
    global _selected
    before = _selected
    set_backend(name)
    try:
        yield
    finally:
        _selected = before


def get_backend() -> str:
    """The configured backend name: set_backend's, else ``$MTCORE_KERNELS``, else ``"auto"``."""
    if _selected is not None:
        return _selected
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _check_name(env, f"environment variable {ENV_VAR}")
    return "auto"


def _triton_available() -> bool:
    try:
        from . import triton_kernels
    except Exception:  # noqa: BLE001 - a broken optional backend is just unavailable
        return False
    fn = getattr(triton_kernels, "is_available", None)
    try:
        return bool(fn()) if fn is not None else False
    except Exception:  # noqa: BLE001
        return False


_present: set[tuple[str, str]] = set()  # (op, dispatch key) pairs found: a kernel never goes away


def _has_kernel(op: str | None, key: str) -> bool:
    """Whether ``mtcore::op`` has a kernel for dispatch ``key``; a hit is cached, since every op
    call asks (the dispatcher query costs ~15 us, a tenth of a small op)."""
    if op is None or (op, key) in _present:
        return True
    try:
        found = bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"mtcore::{op}", key))
    except RuntimeError:
        return False
    if found:
        _present.add((op, key))
    return found


def _under_functorch() -> bool:
    """Whether a torch.func transform, or forward-mode AD (``torch.autograd.forward_ad``), is
    active around this call in eager mode (under ``torch.compile`` dynamo cannot trace the check,
    and does not run functorch's eager interpreters, so this says False there)."""
    if torch.compiler.is_compiling():
        return False
    return (torch._C._functorch.peek_interpreter_stack() is not None
            or torch.autograd.forward_ad._current_level >= 0)


def _why_unavailable(name: str, device: torch.device | None, op: str | None) -> str | None:
    """None if backend ``name`` can run ``op`` on ``device``, else the reason it cannot."""
    if name == "reference":
        return None
    why = _why_native_unavailable(name, device, op)
    if why is None and _under_functorch():
        why = ("a torch.func transform (grad, vjp, jacrev, vmap, ...) or forward-mode AD is "
               "active, and neither can differentiate this backend's autograd; the reference "
               "backend works there")
    return why


def _why_native_unavailable(name: str, device: torch.device | None, op: str | None) -> str | None:
    """_why_unavailable for the non-reference backends, transforms aside."""
    if name == "cpp":
        if device is not None and device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got a {device.type} tensor"
        if not _build.load_cpu_ops():
            return f"the C++ build failed ({_build.build_error()})"
        if not _has_kernel(op, "CPU"):
            return f"the C++ build has no CPU kernel for mtcore::{op}"
        return None
    if name == "cuda":
        if device is not None and device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got a {device.type} tensor"
        if not torch.cuda.is_available():
            return "torch has no CUDA device"
        if not _build.load_ops():
            return f"the C++/CUDA build failed ({_build.build_error()})"
        if not _has_kernel(op or "seg_ce_fwd", "CUDA"):
            return "the build has no CUDA kernels (nvcc/CUDA_HOME missing?)"
        return None
    if name == "triton":
        if not _triton_available():
            return "triton is not importable or has no CUDA device (set TRITON_INTERPRET=1 on CPU)"
        return None
    return f"unknown backend {name!r}"


def _auto(device: torch.device | None, op: str | None) -> str:
    if device is not None and device.type == "cuda":
        for name in ("cuda", "triton"):
            if _why_unavailable(name, device, op) is None:
                return name
        return "reference"
    if device is None or device.type == "cpu":
        if _why_unavailable("cpp", device, op) is None:
            return "cpp"
    return "reference"


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (any device if None); may trigger the lazy C++ build."""
    dev = torch.device(device) if device is not None else None
    return [b for b in BACKENDS if _why_unavailable(b, dev, None) is None]


def resolve(tensor: torch.Tensor | None, backend: str | None = None, op: str | None = None) -> str:
    """The concrete backend (never "auto") to run an op on ``tensor``'s device.

    ``backend`` is the caller's explicit ``backend=`` argument: an unavailable one raises
    RuntimeError. Otherwise the configured backend (set_backend / MTCORE_KERNELS) is used, falling
    back to auto with ONE warning if it cannot run. ``op`` optionally names the ``torch.ops.mtcore``
    op, so a backend missing that one kernel counts as unavailable. K1b's ops call this too.
    """
    device = tensor.device if isinstance(tensor, torch.Tensor) else None
    if backend is not None:
        name = _check_name(backend, "backend")
        if name == "auto":
            return _auto(device, op)
        why = _why_unavailable(name, device, op)
        if why is not None:
            raise RuntimeError(f"kernel backend {name!r} requested but unavailable: {why}")
        return name
    name = get_backend()
    if name == "auto":
        return _auto(device, op)
    why = _why_unavailable(name, device, op)
    if why is None:
        return name
    fallback = _auto(device, op)
    key = f"{name}/{device.type if device else None}/{fallback}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"mtcore: kernel backend {name!r} is unavailable ({why}); using {fallback!r} instead.",
            RuntimeWarning,
            stacklevel=3,
        )
    return fallback


def triton_function(name: str) -> Callable[..., Any]:
    """The public function ``name`` of the triton backend (``mtcore.kernels.triton_kernels``), imported lazily."""
    from . import triton_kernels

    fn = getattr(triton_kernels, name, None)
    if fn is None:
        raise RuntimeError(f"the triton backend has no {name!r} (mtcore.kernels.triton_kernels)")
    return fn

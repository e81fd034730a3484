"""Lazy, cached build of the C++/CUDA kernels in ``csrc/`` into one torch.library extension.

The first use compiles ``csrc/cpu/*.cpp`` and ``csrc/autograd/*.cpp`` (plus ``csrc/cuda/*.cu`` when
CUDA torch and nvcc are present) with ninja via :func:`torch.utils.cpp_extension.load`; the result is cached under
``$MTCORE_CACHE/ext/<hash>`` (default ``~/.cache/mtcore/ext/<hash>``), where the hash covers the
sources, the flags and the torch version, so an edit or a torch upgrade rebuilds. A failed build
never raises: it warns once, naming the reason, and the caller falls back to the reference ops.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["build_extensions", "cache_dir", "csrc_dir", "load_cpu_ops", "load_ops", "loaded"]

# -O3 and OpenMP (at::parallel_for and `#pragma omp` need -fopenmp, or they run serially).
# -fno-trapping-math lets GCC if-convert (and so vectorise) clamps. No -march=native: the cache
# directory may move between machines; hot loops use target_clones instead (csrc/cpu/common.h).
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
LDFLAGS = ["-fopenmp"]
CUDA_FLAGS = ["-O3", "--use_fast_math", "-std=c++17"]

_lock = threading.RLock()
_state: dict[str, object] = {"tried": False, "ok": False, "path": None, "error": None}


def csrc_dir() -> Path:
    """The ``csrc`` directory: package data ``mtcore.csrc`` if installed, else the repo's ``csrc/``."""
    try:
        root = importlib.resources.files("mtcore.csrc")
        path = Path(str(root))
        if (path / "cpu").is_dir():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "csrc"


def cache_dir() -> Path:
    """Root of the build cache: ``$MTCORE_CACHE/ext`` or ``~/.cache/mtcore/ext``."""
    base = os.environ.get("MTCORE_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "mtcore"
    return root / "ext"


def _with_cuda() -> bool:
    """CUDA sources are built only with a CUDA torch, a visible GPU and nvcc (CUDA_HOME)."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def _sources(with_cuda: bool) -> list[Path]:
    root = csrc_dir()
    srcs = sorted((root / "cpu").glob("*.cpp")) + sorted((root / "autograd").glob("*.cpp"))
    if with_cuda:
        srcs += sorted((root / "cuda").glob("*.cu"))
    return srcs


def _headers(with_cuda: bool) -> list[Path]:
    root = csrc_dir()
    hdrs = sorted((root / "cpu").glob("*.h")) + sorted((root / "autograd").glob("*.h"))
    if with_cuda:
        hdrs += sorted((root / "cuda").glob("*.cuh"))
    return hdrs


def _digest(srcs: list[Path], hdrs: list[Path], with_cuda: bool) -> str:
    h = hashlib.sha256()
    for p in srcs + hdrs:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    flags = CFLAGS + LDFLAGS + (CUDA_FLAGS if with_cuda else [])
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    h.update(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    h.update(str(torch.version.cuda).encode())
    return h.hexdigest()[:16]


#: libraries loaded into this process; kept across ``_reset_for_tests`` (a library loads once).
_LOADED: set[Path] = set()


def _build(verbose: bool) -> Path:
    from torch.utils.cpp_extension import load

    with_cuda = _with_cuda()
    srcs = _sources(with_cuda)
    if not srcs:
        raise FileNotFoundError(f"no C++ sources found in {csrc_dir() / 'cpu'}")
    if shutil.which("ninja") is None and not _ninja_in_venv():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    digest = _digest(srcs, _headers(with_cuda), with_cuda)
    name = f"mtcore_C_{digest}"
    build_dir = cache_dir() / digest
    build_dir.mkdir(parents=True, exist_ok=True)
    lib = build_dir / f"{name}.so"
    if lib in _LOADED:
        return lib
    if _LOADED:  # a second library would run the TORCH_LIBRARY registrations again: an abort
        raise RuntimeError(f"another build of the kernels ({next(iter(_LOADED)).name}) is already "
                           "loaded in this process (did csrc/ change?); restart Python to load "
                           f"{lib.name}")
    if lib.exists():  # cached: skip ninja's (slow) up-to-date check
        torch.ops.load_library(str(lib))
        _LOADED.add(lib)
        return lib
    # a first build takes a minute or more (several with CUDA): say so, or a run sits silent
    print(f"mtcore: building the {'C++/CUDA' if with_cuda else 'C++'} kernels, once for these "
          f"sources ({'several minutes' if with_cuda else 'about a minute'}; cached in "
          f"{build_dir}; MTCORE_KERNELS=reference runs without them)", file=sys.stderr, flush=True)
    load(
        name=name,
        sources=[str(s) for s in srcs],
        # copies: load() appends to these lists, which would change the digest of a later call
        extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS),
        extra_cuda_cflags=list(CUDA_FLAGS) if with_cuda else None,
        extra_include_paths=[str(csrc_dir() / "cpu")],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    _LOADED.add(lib)
    return lib


def _ninja_in_venv() -> bool:
    return (Path(sys.executable).parent / "ninja").exists()


def load_ops(verbose: bool = False) -> bool:
    """Build (once per process, cached on disk) and load the extension; True if ``torch.ops.mtcore`` works.

    Thread-safe and idempotent. On failure it emits ONE warning naming the reason and the fallback
    (the reference PyTorch ops) and returns False on every later call without retrying.
    """
    if _state["ok"]:  # no lock once loaded: every op call asks, and torch.compile cannot trace one
        return True
    with _lock:
        if _state["tried"]:
            return bool(_state["ok"])
        _state["tried"] = True
        if shutil.which("ninja") is None and _ninja_in_venv():
            os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        try:
            _state["path"] = _build(verbose)
            _state["ok"] = True
        except Exception as exc:  # noqa: BLE001 - any build error means: fall back
            reason = str(exc).strip().splitlines()
            short = reason[-1] if reason else type(exc).__name__
            _state["error"] = f"{type(exc).__name__}: {short}"
            warnings.warn(
                f"mtcore: building the C++ kernels failed ({_state['error']}); "
                "falling back to the reference PyTorch ops. `mtcore build-ext --verbose` "
                "shows the compiler log.",
                RuntimeWarning,
                stacklevel=2,
            )
        return bool(_state["ok"])


def load_cpu_ops() -> bool:
    """True if the CPU kernels (``torch.ops.mtcore.*`` on CPU) are built and loaded; builds lazily.

    The one call every op wrapper makes before using the "cpp" backend; cheap after the first call.
    """
    return load_ops()


def loaded() -> bool:
    """Whether the extension is already loaded in this process (never triggers a build)."""
    return bool(_state["ok"])


def build_error() -> str | None:
    """The reason the last build failed, or None."""
    return _state["error"]  # type: ignore[return-value]


def build_extensions(verbose: bool = False) -> Path | None:
    """Build the kernels ahead of time (``mtcore build-ext``); returns the library path or None on failure.

    A failure warns once with the reason, exactly like the lazy build.
    """
    ok = load_ops(verbose=verbose)
    return _state["path"] if ok else None  # type: ignore[return-value]


def _reset_for_tests() -> None:
    """Forget the outcome of the last build attempt (tests simulate failures with it)."""
    with _lock:
        _state.update(tried=False, ok=False, path=None, error=None)

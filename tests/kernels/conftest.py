"""Shared fixtures of the kernel tests: the C++ build (once per session) and small helpers."""

from __future__ import annotations

import pytest

from mtcore.kernels import _build


@pytest.fixture(scope="session")
def cpp_built() -> bool:
    """Build and load the C++ kernels once per session; a failed build fails the tests using it."""
    if not _build.load_cpu_ops():
        pytest.fail(f"the C++ kernels did not build: {_build.build_error()}")
    return True


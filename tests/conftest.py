"""Test-session setup shared by every test module."""

import os

# Without a GPU, Triton kernels run through the interpreter, which must be chosen before the
# kernels are defined (first import of mtcore.kernels.triton_kernels.*).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
# Keep kernel builds and evaluator caches of a test session out of the user's cache.
os.environ.setdefault("MTCORE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mtcore-tests"))

import pytest  # noqa: E402  (after the environment set-up above)


@pytest.fixture(scope="session")
def cpp_built() -> bool:
    """Build and load the C++ kernels once per session; a failed build fails the tests using it."""
    from mtcore.kernels import _build

    if not _build.load_cpu_ops():
        pytest.fail(f"the C++ kernels did not build: {_build.build_error()}")
    return True

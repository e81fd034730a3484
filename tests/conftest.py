"""Test-session setup shared by every test module."""

import os

# Triton kernels run on the CPU through the interpreter; it must be chosen before `import triton`.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Keep kernel builds and evaluator caches of a test session out of the user's cache.
os.environ.setdefault("MTCORE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mtcore-tests"))

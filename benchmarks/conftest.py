"""Shared fixtures of the pytest-benchmark suite: one op, implementation and pass per test.

The inputs and the reference are those of :mod:`mtcore.kernels.bench` (which imports
:mod:`mtcore.kernels.reference`, the oracle of the tests); every benchmark first checks that the
implementation agrees with the reference on its inputs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import pytest
import torch

from mtcore import kernels
from mtcore.kernels import _backend, bench
from mtcore.kernels import reference as ref

IMPLS = ("eager", "compiled", "cpp", "cuda", "triton")
PASSES = ("fwd", "bwd", "fwd+bwd")
QUICK = os.environ.get("MTCORE_BENCH_QUICK", "") not in ("", "0")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_compiled: dict[str, Callable] = {}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parameterise every benchmark by implementation and pass."""
    if "impl" in metafunc.fixturenames:
        metafunc.parametrize("impl", IMPLS)
    if "pass_" in metafunc.fixturenames:
        metafunc.parametrize("pass_", PASSES)


def implementation(case: bench.BenchCase, impl: str) -> Callable:
    """The callable for ``impl``, or skip (with the reason) when it cannot run here."""
    reference = getattr(ref, case.public)
    if impl == "eager":
        return reference
    if impl == "compiled":
        if case.public not in _compiled:
            _compiled[case.public] = torch.compile(reference, dynamic=False)
        return _compiled[case.public]
    if impl == "triton" and DEVICE.type != "cuda":
        pytest.skip("triton is timed on CUDA only (on the CPU only its interpreter runs)")
    why = _backend._why_unavailable(impl, DEVICE, None)
    if why is not None:
        pytest.skip(f"{impl} unavailable: {why}")
    return functools.partial(getattr(kernels, case.public), backend=impl)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture
def run_bench(benchmark) -> Callable[[str, str, str], None]:
    """``run_bench(op, impl, pass_)``: check against the reference, then time one pass."""

    def run(op: str, impl: str, pass_: str) -> None:
        case = bench.CASES[op]
        torch.manual_seed(0)
        inputs = case.make(QUICK, DEVICE)
        fn = implementation(case, impl)
        leaves = [t for t in inputs.values() if t.requires_grad]
        expected = case.call(getattr(ref, case.public), inputs)
        grad_out = None if expected.dim() == 0 else torch.randn_like(expected)
        try:
            got = case.call(fn, inputs)
        except Exception as exc:  # noqa: BLE001 - e.g. torch.compile without a working compiler
            if impl == "compiled":
                pytest.skip(f"torch.compile failed here: {type(exc).__name__}: {exc}"[:300])
            raise
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
        benchmark.extra_info.update(op=op, impl=impl, shape=case.quick_shape if QUICK else case.shape)

        def forward() -> torch.Tensor:
            out = case.call(fn, inputs)
            _sync()
            return out

        def backward(out: torch.Tensor) -> None:
            torch.autograd.grad(out, leaves, grad_out)
            _sync()

        if pass_ == "fwd":
            benchmark(forward)
        elif pass_ == "bwd":
            benchmark.pedantic(backward, setup=lambda: ((case.call(fn, inputs),), {}),
                               rounds=5 if QUICK else 30, warmup_rounds=1)
        else:
            benchmark(lambda: backward(forward()))

    return run

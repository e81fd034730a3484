"""Benchmark of the minibatch standard deviation; shapes in :data:`mtcore.kernels.bench.CASES`."""

import pytest

pytestmark = pytest.mark.parametrize("op", ["mbstd"])


def test_mbstd(run_bench, op, impl, pass_):
    run_bench(op, impl, pass_)

"""Benchmark of the bias + leaky ReLU (bias_act); shapes in :data:`mtcore.kernels.bench.CASES`."""

import pytest

pytestmark = pytest.mark.parametrize("op", ["bias_lrelu"])


def test_bias_lrelu(run_bench, op, impl, pass_):
    run_bench(op, impl, pass_)

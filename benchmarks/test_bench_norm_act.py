"""Benchmark of BatchNorm + ReLU and pixel norm + leaky ReLU; shapes in
:data:`mtcore.kernels.bench.CASES`."""

import pytest

pytestmark = pytest.mark.parametrize("op", ["bn_relu", "pixel_norm_lrelu"])


def test_norm_act(run_bench, op, impl, pass_):
    run_bench(op, impl, pass_)

"""Benchmark of nearest x2 upsampling + 3x3 convolution; shapes in
:data:`mtcore.kernels.bench.CASES`."""

import pytest

pytestmark = pytest.mark.parametrize("op", ["upsample_conv"])


def test_upsample_conv(run_bench, op, impl, pass_):
    run_bench(op, impl, pass_)

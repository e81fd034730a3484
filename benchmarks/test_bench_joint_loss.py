"""Benchmark of the default task set's joint loss; shapes in :data:`mtcore.kernels.bench.CASES`."""

import pytest

pytestmark = pytest.mark.parametrize("op", ["joint_loss"])


def test_joint_loss(run_bench, op, impl, pass_):
    run_bench(op, impl, pass_)

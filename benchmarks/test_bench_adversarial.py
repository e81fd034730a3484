"""Benchmark of the adversarial (non-saturating, generator) loss; shapes in :data:`mtcore.kernels.bench.CASES`."""

import pytest

pytestmark = pytest.mark.parametrize("op", ["adversarial"])


def test_adversarial(run_bench, op, impl, pass_):
    run_bench(op, impl, pass_)

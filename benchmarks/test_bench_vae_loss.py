"""Benchmark of the VAE loss; shapes in :data:`mtcore.kernels.bench.CASES`."""

import pytest

pytestmark = pytest.mark.parametrize("op", ["vae_loss"])


def test_vae_loss(run_bench, op, impl, pass_):
    run_bench(op, impl, pass_)

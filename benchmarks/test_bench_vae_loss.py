"""Benchmark of the VAE loss (MSE and Bernoulli reconstruction); shapes in
:data:`mtcore.kernels.bench.CASES`."""

import pytest

pytestmark = pytest.mark.parametrize("op", ["vae_loss", "vae_bce"])


def test_vae_loss(run_bench, op, impl, pass_):
    run_bench(op, impl, pass_)

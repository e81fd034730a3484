"""Triton vae_loss against the mtcore reference and hand-written PyTorch expressions.

Without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1 before their import).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():  # run the kernels in the Triton interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from mtcore.kernels import reference  # noqa: E402
from mtcore.kernels import triton_kernels as tk  # noqa: E402

if not tk.is_available():
    pytest.skip(
        "triton cannot run here (no CUDA and TRITON_INTERPRET unset)", allow_module_level=True
    )

from mtcore.kernels.triton_kernels import vae  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture(autouse=True)
def _on_device():
    with torch.device(DEVICE):
        yield


DT = torch.float64


def _inputs(seed, shape=(3, 2, 5, 3), z=7):
    g = torch.Generator(DEVICE).manual_seed(seed)
    recon = torch.randn(shape, dtype=DT, generator=g).requires_grad_()
    target = torch.rand(shape, dtype=DT, generator=g)
    mu = torch.randn(shape[0], z, dtype=DT, generator=g).requires_grad_()
    logvar = torch.randn(shape[0], z, dtype=DT, generator=g).requires_grad_()
    return recon, target, mu, logvar


@pytest.mark.parametrize("kind", ["mse", "bernoulli"])
def test_terms_and_gradients_match_independent_expression(kind):
    recon, target, mu, logvar = _inputs(0)
    n, beta = recon.shape[0], 0.7
    got = tk.vae_loss(recon, target, mu, logvar, beta=beta, recon_kind=kind)
    if kind == "mse":
        rec = F.mse_loss(recon, target, reduction="sum") / n
    else:
        rec = F.binary_cross_entropy_with_logits(recon, target, reduction="sum") / n
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / n
    want = (rec, kl, rec + beta * kl)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # a combination of all three outputs checks how backward mixes their gradients with beta
    inputs = (recon, mu, logvar)
    g_got = torch.autograd.grad(0.3 * got.rec - 1.1 * got.kl + 0.5 * got.total, inputs)
    g_want = torch.autograd.grad(0.3 * want[0] - 1.1 * want[1] + 0.5 * want[2], inputs)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_matches_reference_odd_sizes_float32():
    g = torch.Generator(DEVICE).manual_seed(1)
    recon = torch.randn(5, 1031, generator=g).requires_grad_()  # > one 1024 block
    target = torch.rand(5, 1031, generator=g)
    mu, logvar = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    got = tk.vae_loss(recon, target, mu, logvar, 2.0, "bernoulli")
    want = reference.vae_loss(recon, target, mu, logvar, 2.0, "bernoulli")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_extreme_logits_stay_finite():
    recon = torch.tensor([[-200.0, -30.0, 0.0, 30.0, 200.0]], dtype=DT, requires_grad=True)
    target = torch.tensor([[1.0, 0.0, 0.5, 1.0, 0.0]], dtype=DT)
    mu = torch.zeros(1, 2, dtype=DT)
    got = tk.vae_loss(recon, target, mu, mu.clone(), recon_kind="bernoulli")
    want = F.binary_cross_entropy_with_logits(recon, target, reduction="sum")
    torch.testing.assert_close(got.rec, want, rtol=1e-12, atol=1e-12)
    assert got.kl.item() == 0.0  # KL(N(0, 1) || N(0, 1)) = 0
    (g,) = torch.autograd.grad(got.total, recon)
    torch.testing.assert_close(g, torch.sigmoid(recon) - target, rtol=1e-12, atol=1e-12)


def test_empty_batch_gives_zeros():
    out = tk.vae_loss(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 2), torch.zeros(0, 2))
    assert all(t.item() == 0.0 for t in out)


def test_bad_inputs_raise_clear_errors():
    recon, target, mu, logvar = _inputs(2)
    with pytest.raises(ValueError, match="target must not require grad"):
        tk.vae_loss(recon, target.requires_grad_(), mu, logvar)
    with pytest.raises(ValueError, match="recon must be one of"):
        tk.vae_loss(recon, target.detach(), mu, logvar, recon_kind="l1")
    with pytest.raises(ValueError, match="batch size"):
        tk.vae_loss(recon, target.detach(), mu[:2], logvar[:2])


def test_opcheck():
    recon, target, mu, logvar = _inputs(3, shape=(2, 5), z=3)
    torch.library.opcheck(vae.vae_loss_fwd, (recon, target, mu, logvar, 0.5, 1, True))

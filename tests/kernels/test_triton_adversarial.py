"""Triton adversarial_loss against hand-written PyTorch expressions of each GAN loss.

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

from mtcore.kernels.triton_kernels import adversarial  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture(autouse=True)
def _on_device():
    with torch.device(DEVICE):
        yield


EXPECTED = {  # the contract's table, written independently of both implementations
    ("non_saturating", "d_real"): lambda x: F.softplus(-x),
    ("non_saturating", "d_fake"): F.softplus,
    ("non_saturating", "g"): lambda x: F.softplus(-x),
    ("hinge", "d_real"): lambda x: F.relu(1 - x),
    ("hinge", "d_fake"): lambda x: F.relu(1 + x),
    ("hinge", "g"): lambda x: -x,
    ("least_squares", "d_real"): lambda x: (x - 1) ** 2,
    ("least_squares", "d_fake"): lambda x: x**2,
    ("least_squares", "g"): lambda x: (x - 1) ** 2,
}


@pytest.mark.parametrize("kind,role", sorted(EXPECTED))
def test_value_and_gradient(kind, role):
    g = torch.Generator(DEVICE).manual_seed(0)
    x = (torch.randn(7, 3, dtype=torch.float64, generator=g) * 4).requires_grad_()
    got = adversarial.adversarial_loss(x, kind, role)
    want = EXPECTED[kind, role](x).mean()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0], rtol=1e-12, atol=1e-12
    )


def test_many_blocks_and_extremes_float32():
    x = torch.linspace(-150, 150, 2500).reshape(50, 50).t().requires_grad_()  # non-contiguous
    got = tk.adversarial_loss(x, "non_saturating", "d_fake")
    want = reference.adversarial_loss(x, "non_saturating", "d_fake")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(g, torch.sigmoid(x) / x.numel(), rtol=1e-5, atol=1e-9)


def test_softplus_tail_is_accurate_in_float32():
    """d_fake's softplus(x) near x = -9, where log(1 + t) with t = exp(-9) loses ~5e-4 in fp32."""
    x = torch.linspace(-9.5, -7.0, 64)
    for xi in x:
        got = tk.adversarial_loss(xi.reshape(1), "non_saturating", "d_fake")
        want = torch.nn.functional.softplus(xi.double())
        assert abs(got.double().item() / want.item() - 1) < 2e-6, float(xi)


def test_hinge_kink_has_zero_gradient_like_torch():
    x = torch.tensor([1.0, -1.0, 0.5], requires_grad=True)
    (g,) = torch.autograd.grad(tk.adversarial_loss(x, "hinge", "d_real"), x)
    torch.testing.assert_close(g, torch.tensor([0.0, -1.0, -1.0]) / 3)


def test_empty_logits_give_zero_and_bad_choice_raises():
    assert tk.adversarial_loss(torch.zeros(0, 1)).item() == 0.0
    with pytest.raises(ValueError, match="kind must be one of"):
        tk.adversarial_loss(torch.zeros(2), kind="wasserstein")
    with pytest.raises(ValueError, match="role must be one of"):
        tk.adversarial_loss(torch.zeros(2), role="d")
    with pytest.raises(TypeError, match="logits must be"):
        tk.adversarial_loss(torch.zeros(2, dtype=torch.long))


def test_opcheck():
    x = torch.randn(3, 2, requires_grad=True)
    torch.library.opcheck(adversarial.adv_loss_fwd, (x, 1, 0, True))

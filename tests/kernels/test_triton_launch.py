"""What every Triton op's launch must not do: build a tensor from Python values per call.

On a GPU, ``torch.tensor(...)``, ``torch.as_tensor`` and ``Tensor.new_tensor`` with Python numbers
are a host-to-device copy on every call (a stall per launch, and no CUDA-graph capture); the
launchers pass constants as kernel arguments or fill them on the device (``torch.full``). Runs in
the Triton interpreter on CPU, where the same calls are counted.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from mtcore.kernels import triton_kernels as tk  # noqa: E402

if not tk.is_available():
    pytest.skip("triton cannot run here (no CUDA and TRITON_INTERPRET unset)",
                allow_module_level=True)

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture
def made(monkeypatch):
    """The tensors built from Python values while the test runs (a list of their arguments)."""
    calls = []

    def spy(real):
        return lambda *a, **k: calls.append(a) or real(*a, **k)

    monkeypatch.setattr(torch, "tensor", spy(torch.tensor))
    monkeypatch.setattr(torch, "as_tensor", spy(torch.as_tensor))
    monkeypatch.setattr(torch.Tensor, "new_tensor", spy(torch.Tensor.new_tensor))
    return calls


def _leaf(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).to(DEVICE).requires_grad_()


def _all_ops(dtype):
    """Every Triton op, forward and backward, on small inputs of ``dtype``."""
    seg, t = _leaf(2, 3, 4, 5, dtype=dtype), torch.randint(0, 3, (2, 4, 5)).to(DEVICE)
    cls, ct = _leaf(2, 4, dtype=dtype, seed=1), torch.randint(0, 4, (2,)).to(DEVICE)
    recon, mu, lv = (_leaf(*s, dtype=dtype, seed=i) for i, s in
                     enumerate([(2, 3, 4, 4), (2, 5), (2, 5)], 2))
    image = torch.rand(2, 3, 4, 4, dtype=dtype).to(DEVICE)
    fake, w = _leaf(2, 1, dtype=dtype, seed=5), _leaf(4, dtype=dtype, seed=6)
    x, b = _leaf(4, 3, 4, 4, dtype=dtype, seed=7), _leaf(3, dtype=dtype, seed=8)
    losses = [
        tk.seg_cross_entropy(seg, t, label_smoothing=0.1),
        tk.seg_cross_entropy(cls, ct, reduction="sum"),
        tk.vae_loss(recon, image, mu, lv, 0.5, "bernoulli").total,
        tk.adversarial_loss(fake, "hinge", "d_fake"),
        tk.joint_loss(seg, t, cls, ct, recon, image, mu, lv, fake, w, "uncertainty").total,
        tk.minibatch_stddev(tk.bias_act(x, b, 1, "lrelu", clamp=0.5), 2).square().mean(),
        tk.batch_norm_act(x, b, b, None, None, 1e-5, 2, 0.2)[0].square().mean(),
        tk.batch_norm_act(x, None, None, b.detach(), b.detach().abs() + 1, 1e-5, 1, 0.0)[0].mean(),
        tk.pixel_norm_act(x, 1e-8, "lrelu", 0.2).square().mean(),
    ]
    torch.autograd.grad(sum(losses), [seg, cls, recon, mu, lv, fake, w, x, b])


def test_fp32_and_bf16_launches_build_no_tensor_from_python_values(made):
    _all_ops(torch.float32)
    _all_ops(torch.bfloat16)
    assert made == []


def test_the_check_sees_such_a_tensor(made):
    """fp64 bias_act keeps its constants in a double-precision tensor (Triton's float arguments
    are fp32): the one launch allowed to build one, and proof that the spy sees it."""
    x, b = _leaf(4, 3, 4, 4, dtype=torch.float64), _leaf(3, dtype=torch.float64, seed=1)
    tk.bias_act(x, b, 1, "lrelu", clamp=0.5)
    assert len(made) == 1

"""Triton joint_loss against the mtcore reference and the closed-form weight gradients.

Without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1 before their import).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():  # run the kernels in the Triton interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from mtcore.kernels import reference  # noqa: E402
from mtcore.kernels import triton_kernels as tk  # noqa: E402

if not tk.is_available():
    pytest.skip(
        "triton cannot run here (no CUDA and TRITON_INTERPRET unset)", allow_module_level=True
    )

from mtcore.kernels.triton_kernels import joint  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture(autouse=True)
def _on_device():
    with torch.device(DEVICE):
        yield


DT = torch.float64


def _inputs(seed=0, dtype=DT):
    g = torch.Generator(DEVICE).manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, dtype=dtype, generator=g).requires_grad_()

    seg_t = torch.randint(0, 3, (2, 3, 5), generator=g)
    seg_t[0, 0] = -100
    cls_t = torch.randint(0, 5, (2,), generator=g)
    image = torch.rand(2, 3, 3, 5, dtype=dtype, generator=g)
    weights = (torch.rand(4, dtype=dtype, generator=g) + 0.1).requires_grad_()
    return (
        rn(2, 3, 3, 5),
        seg_t,
        rn(2, 5),
        cls_t,
        rn(2, 3, 3, 5),
        image,
        rn(2, 4),
        rn(2, 4),
        rn(2, 1),
        weights,
    )


@pytest.mark.parametrize("mode", ["fixed", "uncertainty"])
def test_terms_total_and_gradients_match_reference(mode):
    args = _inputs()
    kw = dict(beta=0.5, label_smoothing=0.1, recon_kind="bernoulli", adv_kind="hinge")
    got = tk.joint_loss(*args, mode, **kw)
    want = reference.joint_loss(*args, mode, **kw)
    torch.testing.assert_close(got.terms, want.terms, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.total, want.total, rtol=1e-12, atol=1e-12)
    diff = [a for a in args if a.requires_grad]
    mix = torch.tensor([0.3, -0.2, 0.7, 1.1], dtype=DT)  # gradients through terms AND total
    g_got = torch.autograd.grad(got.total + (got.terms * mix).sum(), diff)
    g_want = torch.autograd.grad(want.total + (want.terms * mix).sum(), diff)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["fixed", "uncertainty"])
def test_weight_gradient_closed_form(mode):
    args = _inputs(1)
    out = tk.joint_loss(*args, mode)
    (g,) = torch.autograd.grad(out.total, args[-1])
    terms, s = out.terms.detach(), args[-1].detach()
    expected = terms if mode == "fixed" else 1 - torch.exp(-s) * terms  # Kendall et al. 2018
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)


def test_float32_matches_reference():
    args = _inputs(2, torch.float32)
    got = tk.joint_loss(*args, "uncertainty", label_smoothing=0.05)
    want = reference.joint_loss(*args, "uncertainty", label_smoothing=0.05)
    torch.testing.assert_close(got.terms, want.terms, rtol=1e-5, atol=1e-5)
    assert got.terms.dtype == torch.float32 and got.total.shape == ()


def test_bad_inputs_raise_clear_errors():
    args = list(_inputs(3))
    with pytest.raises(ValueError, match="mode must be one of"):
        tk.joint_loss(*args, "gradnorm")
    args[-1] = torch.ones(3, dtype=DT)
    with pytest.raises(ValueError, match="weights must have shape"):
        tk.joint_loss(*args)
    args = list(_inputs(3))
    args[3] = torch.tensor([0, 9])
    with pytest.raises(ValueError, match="class index 9"):
        tk.joint_loss(*args)


def test_opcheck():
    # test_aot_dispatch_dynamic is left out to keep the interpreted suite fast (~4 s more for this
    # 17-argument op); the same glue (make_op, register_autograd) passes it for the other ops.
    args = _inputs(4, torch.float32)
    torch.library.opcheck(
        joint.joint_loss_fwd,
        (*args, 1, 0.5, 0.1, -100, 0, 0, True),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )

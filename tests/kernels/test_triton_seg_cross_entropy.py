"""Triton seg_cross_entropy against torch.nn.functional.cross_entropy and the mtcore reference.

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

from mtcore.kernels.triton_kernels import seg_ce  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture(autouse=True)
def _on_device():
    with torch.device(DEVICE):
        yield


DT = torch.float64


def _grads(loss, x, seed=0):
    g = torch.randn(
        loss.shape, dtype=loss.dtype, generator=torch.Generator(DEVICE).manual_seed(seed)
    )
    return torch.autograd.grad(loss, x, g)[0]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted,smoothing", [(False, 0.0), (True, 0.0), (True, 0.15)])
def test_matches_torch_spatial_odd_sizes(reduction, weighted, smoothing):
    torch.manual_seed(1)
    x = torch.randn(2, 5, 3, 7, dtype=DT, requires_grad=True)  # 42 pixels, 5 classes: tails
    t = torch.randint(0, 5, (2, 3, 7))
    t[0, 0, :3] = -100
    w = torch.rand(5, dtype=DT) + 0.5 if weighted else None
    got = tk.seg_cross_entropy(x, t, w, label_smoothing=smoothing, reduction=reduction)
    want = F.cross_entropy(x, t, w, label_smoothing=smoothing, reduction=reduction)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grads(got, x), _grads(want, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_classification_many_classes_spans_chunks(smoothing):
    torch.manual_seed(2)
    x = torch.randn(3, 1500, dtype=DT, requires_grad=True)  # C > one 1024-wide class chunk
    t = torch.tensor([0, 1499, 731])
    got = tk.seg_cross_entropy(x, t, label_smoothing=smoothing)
    want = F.cross_entropy(x, t, label_smoothing=smoothing)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grads(got, x), _grads(want, x), rtol=1e-10, atol=1e-12)


def test_matches_reference_with_custom_ignore_index():
    torch.manual_seed(3)
    x = torch.randn(2, 4, 5, dtype=DT, requires_grad=True)
    t = torch.randint(0, 4, (2, 5))
    t[:, ::2] = 255
    w = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=DT)
    got = tk.seg_cross_entropy(x, t, w, ignore_index=255, label_smoothing=0.2)
    want = reference.seg_cross_entropy(x, t, w, ignore_index=255, label_smoothing=0.2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g = _grads(got, x)
    torch.testing.assert_close(g, _grads(want, x), rtol=1e-10, atol=1e-12)
    assert torch.all(g.permute(0, 2, 1)[t == 255] == 0)  # ignored pixels get no gradient


def test_large_logits_stay_finite():
    torch.manual_seed(4)
    x = (torch.randn(3, 6, 5) * 1e4).requires_grad_()
    t = torch.randint(0, 6, (3, 5))
    got = tk.seg_cross_entropy(x, t)
    want = F.cross_entropy(x.double(), t)
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-3)
    g = _grads(got, x)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g.double(), _grads(want, x).double(), rtol=1e-5, atol=1e-6)


def test_all_ignored_and_empty_batch_give_zero_not_nan():
    x = torch.randn(2, 3, 4, requires_grad=True)
    t = torch.full((2, 4), -100)
    loss = tk.seg_cross_entropy(x, t)
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, x)
    assert torch.all(g == 0)
    assert torch.isnan(F.cross_entropy(x, t))  # the documented difference from torch
    empty = torch.randn(0, 3, 4, requires_grad=True)
    for red, shape in (("mean", ()), ("sum", ()), ("none", (0, 4))):
        out = tk.seg_cross_entropy(empty, torch.zeros(0, 4, dtype=torch.long), reduction=red)
        assert out.shape == shape and out.sum().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_float32_reference(dtype):
    torch.manual_seed(5)
    x = torch.randn(2, 5, 3, 3).to(dtype).to(memory_format=torch.channels_last).requires_grad_()
    t = torch.randint(0, 5, (2, 3, 3))
    got = tk.seg_cross_entropy(x, t, label_smoothing=0.1)
    assert got.dtype == dtype
    want = F.cross_entropy(x.float(), t, label_smoothing=0.1)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    (g,) = torch.autograd.grad(got, x)
    assert g.dtype == dtype
    (g_want,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(g.float(), g_want.float(), rtol=2e-2, atol=2e-3)


def test_no_gradient_buffer_without_requires_grad():
    x = torch.randn(2, 3, 4)
    t = torch.randint(0, 3, (2, 4))
    loss, grad = seg_ce.seg_ce_fwd(x, t, None, -100, 0.0, 1, False)
    assert grad.numel() == 0
    torch.testing.assert_close(loss, F.cross_entropy(x, t))
    with torch.no_grad():
        out = tk.seg_cross_entropy(x.requires_grad_(), t)
    assert out.grad_fn is None


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="class index 7"):
        tk.seg_cross_entropy(x, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="target must have shape"):
        tk.seg_cross_entropy(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="reduction"):
        tk.seg_cross_entropy(x, torch.tensor([0, 1]), reduction="avg")
    with pytest.raises(ValueError, match="weight gets no gradient"):
        tk.seg_cross_entropy(x, torch.tensor([0, 1]), torch.ones(3, requires_grad=True))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        tk.seg_cross_entropy(x, torch.tensor([0, 1]), ignore_index=1.5)


def test_negative_class_weights_divide_like_torch():
    """The mean's denominator sum(w[y]) may be negative (F.cross_entropy divides by it)."""
    x = torch.randn(4, 3, 5, dtype=DT, generator=torch.Generator(DEVICE).manual_seed(3),
                    requires_grad=True)
    t = torch.tensor([[0, 1, 2, 1, 1], [1, 1, 0, 2, 1], [2, 1, 1, 1, 0], [1, 0, 1, 2, 1]])
    w = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    want = F.cross_entropy(x, t, weight=w)
    got = tk.seg_cross_entropy(x, t, w)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(_grads(got, x), _grads(want, x))


def test_opcheck():
    # The fake kernel is shape-only under the interpreter (see _common.make_op), so opcheck's
    # FakeTensor and AOT-dispatch tests run here without launching the interpreter on fakes.
    x = torch.randn(2, 3, 4, requires_grad=True)
    t = torch.randint(0, 3, (2, 4))
    torch.library.opcheck(seg_ce.seg_ce_fwd, (x, t, torch.rand(3), -100, 0.1, 0, True))

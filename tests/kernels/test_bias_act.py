"""bias_act: the reference against hand formulas, the C++ kernel against the reference (values,
first and second derivatives, layouts, dtypes), torch.library.opcheck, and input errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtcore.kernels.ops import bias_act as ops_mod
from mtcore.kernels.ops import native_ready
from mtcore.kernels.ops.bias_act import bias_act
from mtcore.kernels.reference import layers as ref

ACTS = ["linear", "relu", "lrelu", "tanh", "sigmoid", "silu"]
SQRT2 = math.sqrt(2.0)


@pytest.fixture(scope="module")
def cpp(cpp_built):
    """torch.ops.mtcore with this module's fake and autograd registered (conftest builds the ops)."""
    native_ready("bias_act", ops_mod._register)
    return torch.ops.mtcore


def _hand(x, b, dim, act, alpha=0.2, gain=None, clamp=None):
    """An independent expression of bias_act: explicit broadcasting and textbook formulas."""
    if b is not None:
        shape = [1] * x.dim()
        shape[dim] = x.shape[dim]
        x = x + b.reshape(shape).expand_as(x)
    z = x
    y = {
        "linear": z,
        "relu": torch.where(z > 0, z, torch.zeros_like(z)),
        "lrelu": torch.where(z > 0, z, alpha * z),
        "tanh": (torch.exp(z) - torch.exp(-z)) / (torch.exp(z) + torch.exp(-z)),
        "sigmoid": 1.0 / (1.0 + torch.exp(-z)),
        "silu": z / (1.0 + torch.exp(-z)),
    }[act]
    if gain is None:
        gain = SQRT2 if act in ("relu", "lrelu") else 1.0
    y = y * gain
    if clamp is not None:
        y = torch.minimum(torch.maximum(y, torch.full_like(y, -clamp)), torch.full_like(y, clamp))
    return y


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("clamp", [None, 0.7])
def test_reference_matches_hand_formula(act, clamp):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    got = ref.bias_act(x, b, 1, act, clamp=clamp)
    torch.testing.assert_close(got, _hand(x, b, 1, act, clamp=clamp))


def test_reference_hand_values_and_defaults():
    # lrelu default alpha 0.2, gain sqrt(2): x + b = [-1, 0.5] -> [-0.2*sqrt2, 0.5*sqrt2]
    x = torch.tensor([[-1.5, 0.0]])
    b = torch.tensor([0.5, 0.5])
    y = ref.bias_act(x, b, dim=1, act="lrelu")
    torch.testing.assert_close(y, torch.tensor([[-0.2 * SQRT2, 0.5 * SQRT2]]))
    # relu's default gain is sqrt(2); tanh's is 1; clamp bounds the result
    assert ref.bias_act(torch.tensor([2.0]), act="relu").item() == pytest.approx(2 * SQRT2)
    assert ref.bias_act(torch.tensor([2.0]), act="tanh").item() == pytest.approx(math.tanh(2.0))
    assert ref.bias_act(torch.tensor([2.0]), act="relu", clamp=1.0).item() == 1.0
    # an explicit gain and alpha override the defaults
    assert ref.bias_act(torch.tensor([-2.0]), act="lrelu", alpha=0.5, gain=3.0).item() == -3.0


def test_reference_matches_eager_lrelu_expression():
    x = torch.randn(2, 6, 3, 3)
    b = torch.randn(6)
    expected = F.leaky_relu(x + b.view(1, -1, 1, 1), 0.2) * SQRT2
    torch.testing.assert_close(ref.bias_act(x, b, act="lrelu"), expected)


# ---------------------------------------------------------------- C++ vs reference


def _grads(fn, x, b, gy, create_graph=False):
    x = x.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y = fn(x, b)
    inputs = (x,) if b is None else (x, b)
    return (y, *torch.autograd.grad(y, inputs, gy, create_graph=create_graph))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("clamp", [None, 0.6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_matches_reference(cpp, act, clamp, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 7, 9, generator=g, dtype=dtype)
    b = torch.randn(5, generator=g, dtype=dtype)
    gy = torch.randn(3, 5, 7, 9, generator=g, dtype=dtype)
    want = _grads(lambda t, c: ref.bias_act(t, c, 1, act, clamp=clamp), x, b, gy)
    got = _grads(lambda t, c: bias_act(t, c, 1, act, clamp=clamp, backend="cpp"), x, b, gy)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    for w, o in zip(want, got, strict=True):
        torch.testing.assert_close(o, w, **tol)


LAYOUTS = {
    "dim_last": lambda g: (torch.randn(4, 3, 6, generator=g, dtype=torch.float64), -1),
    "dim0": lambda g: (torch.randn(5, 3, 2, generator=g, dtype=torch.float64), 0),
    "channels_last": lambda g: (
        torch.randn(2, 7, 3, 5, generator=g, dtype=torch.float64).to(
            memory_format=torch.channels_last
        ),
        1,
    ),
    "strided_slice": lambda g: (
        torch.randn(3, 10, 4, 5, generator=g, dtype=torch.float64)[:, ::2],
        1,
    ),
    "transposed": lambda g: (torch.randn(6, 4, generator=g, dtype=torch.float64).t(), 1),
    "vector": lambda g: (torch.randn(9, generator=g, dtype=torch.float64), 0),
    "one_channel": lambda g: (torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64), 1),
    "long_rows": lambda g: (torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64), 1),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("act", ["lrelu", "silu"])
def test_cpp_layouts(cpp, layout, act):
    g = torch.Generator().manual_seed(3)
    x, dim = LAYOUTS[layout](g)
    b = torch.randn(x.shape[dim], generator=g, dtype=x.dtype)
    gy = torch.randn(x.shape, generator=g, dtype=x.dtype)
    want = _grads(lambda t, c: ref.bias_act(t, c, dim, act, clamp=0.9), x, b, gy)
    got = _grads(lambda t, c: bias_act(t, c, dim, act, clamp=0.9, backend="cpp"), x, b, gy)
    for w, o in zip(want, got, strict=True):
        torch.testing.assert_close(o, w)
    if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
        assert got[0].is_contiguous(memory_format=torch.channels_last)  # layout is kept


@pytest.mark.parametrize("act", ACTS)
def test_cpp_without_bias_and_custom_gain_alpha(cpp, act):
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    gy = torch.randn_like(x)
    kw = {"alpha": 0.05, "gain": -1.7}
    want = _grads(lambda t, c: ref.bias_act(t, None, act=act, **kw), x, None, gy)
    got = _grads(lambda t, c: bias_act(t, None, act=act, backend="cpp", **kw), x, None, gy)
    for w, o in zip(want, got, strict=True):
        torch.testing.assert_close(o, w)


@pytest.mark.parametrize("act", ACTS)
def test_cpp_bfloat16(cpp, act):
    # The kernel computes in float32 and rounds once: within half a bf16 ulp (2^-9 relative) of the
    # float64 reference on the same (bf16) inputs; we allow 2^-8.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 5, 7, generator=g).bfloat16()
    b = torch.randn(8, generator=g).bfloat16()
    gy = torch.randn(2, 8, 5, 7, generator=g).bfloat16()
    want_y, want_dx, _ = _grads(
        lambda t, c: ref.bias_act(t, c, 1, act, clamp=1.5), x.double(), b.double(), gy.double()
    )
    got = _grads(lambda t, c: bias_act(t, c, 1, act, clamp=1.5, backend="cpp"), x, b, gy)
    assert all(t.dtype == torch.bfloat16 for t in got)
    if act in ("linear", "relu", "lrelu"):
        # documented: these read the clamp mask from the stored y, so an output that rounds to
        # +-clamp in bf16 counts as clamped (tanh/sigmoid/silu recompute it exactly)
        want_dx = want_dx * (want_y.bfloat16().double().abs() < 1.5)
    want_db = want_dx.sum((0, 2, 3))
    torch.testing.assert_close(got[0].double(), want_y, rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(got[1].double(), want_dx, rtol=2**-8, atol=1e-6)
    # db sums 70 bf16-rounded terms per channel and is rounded to bf16: each rounding is within
    # 2^-9 relative, so |error| <= 2^-8 * (sum |dx| + |db|)
    bound = 2**-8 * (want_dx.abs().sum((0, 2, 3)) + want_db.abs())
    assert ((got[2].double() - want_db).abs() <= bound).all()


# ---------------------------------------------------------------- derivatives


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("clamp", [None, 0.8])
def test_cpp_gradcheck_and_gradgradcheck(cpp, act, clamp):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(t, c):
        return bias_act(t, c, 1, act, clamp=clamp, backend="cpp")

    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))


@pytest.mark.parametrize("act", ACTS)
def test_r1_penalty_matches_reference(cpp, act):
    """R1 (Mescheder et al. 2018): |d D(x)/dx|^2 through two bias_act layers, then its gradient."""
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(4, 6, generator=g, dtype=torch.float64)
    params0 = [
        torch.randn(6, 5, generator=g, dtype=torch.float64),
        torch.randn(5, generator=g, dtype=torch.float64),
        torch.randn(5, 3, generator=g, dtype=torch.float64),
        torch.randn(3, generator=g, dtype=torch.float64),
    ]

    def run(fn):
        x = x0.clone().requires_grad_()
        w1, b1, w2, b2 = (p.clone().requires_grad_() for p in params0)
        h = fn(x @ w1, b1, 1, act)
        d = fn(h @ w2, b2, 1, "tanh" if act in ("linear", "relu", "lrelu") else act)
        (gx,) = torch.autograd.grad(d.sum(), x, create_graph=True)
        penalty = gx.square().sum()
        return penalty, torch.autograd.grad(penalty, (x, w1, b1, w2, b2))

    want_p, want_g = run(ref.bias_act)
    got_p, got_g = run(lambda *a: bias_act(*a, backend="cpp"))
    torch.testing.assert_close(got_p, want_p)
    for w, o in zip(want_g, got_g, strict=True):
        torch.testing.assert_close(o, w)
    assert any(t.abs().sum() > 0 for t in got_g)  # the second-order path carried signal


def test_lrelu_backward_keeps_y_not_x(cpp):
    """For lrelu the mask comes from y's sign, so the backward saves y and never x."""
    saved = []
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = bias_act(x, b, act="lrelu", backend="cpp")
    assert all(t.data_ptr() != x.data_ptr() for t in saved)
    assert any(t.data_ptr() == y.data_ptr() for t in saved)


# ---------------------------------------------------------------- torch.library


@pytest.mark.parametrize(
    "act,clamp", [(0, -1.0), (1, -1.0), (2, 0.5), (3, -1.0), (4, 0.3), (5, -1.0), (5, 0.4)]
)
def test_opcheck(cpp, act, clamp):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(cpp.bias_act.default, (x, b, 1, act, 0.2, 1.3, clamp))
    torch.library.opcheck(cpp.bias_act.default, (x.detach(), None, 1, act, 0.2, 1.3, clamp))
    y = cpp.bias_act(x.detach(), b.detach(), 1, act, 0.2, 1.3, clamp)
    dy = torch.randn_like(y, requires_grad=True)
    xs = x if act >= 3 else x.new_empty(0)
    ys = y if (act in (1, 2) or (act == 0 and clamp >= 0)) else y.new_empty(0)
    bs = b if act >= 3 else None
    torch.library.opcheck(cpp.bias_act_grad.default, (dy, xs, bs, ys, 1, act, 0.2, 1.3, clamp))


# ---------------------------------------------------------------- errors


def test_bad_bias_shape_is_a_clear_error():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"b must have shape \[x.shape\[dim\]\] = \[3\].*\(5,\)"):
        bias_act(x, torch.randn(5), act="relu")


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        ({"x": torch.ones(2, 3, dtype=torch.int64)}, TypeError, "floating point.*int64"),
        ({"b": torch.ones(3, dtype=torch.float64)}, TypeError, "b has dtype torch.float64"),
        ({"act": "gelu"}, ValueError, "unknown act 'gelu'"),
        ({"act": "lrelu", "alpha": -0.1}, ValueError, "alpha must be .* >= 0"),
        ({"clamp": -1.0}, ValueError, "clamp must be None or >= 0"),
        ({"dim": 2}, ValueError, "dim=2 is out of range"),
        ({"b": torch.ones(3, 1)}, ValueError, r"got b of shape \(3, 1\)"),
    ],
)
def test_bad_arguments(kwargs, exc, msg):
    args = {"x": torch.ones(2, 3), "b": torch.ones(3), "dim": 1, "act": "linear"}
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        bias_act(**args)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown kernel backend"):
        bias_act(torch.ones(2, 3), backend="fortran")


def test_kernel_checks_its_inputs(cpp):
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"b must have shape \[x.size\(dim\)\] = \[3\]"):
        cpp.bias_act(x, torch.randn(4), 1, 2, 0.2, 1.0, -1.0)
    with pytest.raises(TypeError, match="x must be float32, float64, bfloat16 or float16"):
        cpp.bias_act(x.int(), None, 1, 0, 0.0, 1.0, -1.0)
    with pytest.raises(ValueError, match="act must be 0..5"):
        cpp.bias_act(x, None, 1, 9, 0.0, 1.0, -1.0)
    with pytest.raises(ValueError, match="needs y of dy's shape"):
        cpp.bias_act_grad(x, x.new_empty(0), None, x.new_empty(0), 1, 2, 0.2, 1.0, -1.0)

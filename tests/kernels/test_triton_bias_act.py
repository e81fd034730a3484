"""Triton bias_act: values, first and second derivatives against the reference.

Without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1 before their import).
"""

import math
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

from mtcore.kernels.triton_kernels import fused_bias_act  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture(autouse=True)
def _on_device():
    with torch.device(DEVICE):
        yield


DT = torch.float64
ACTS = ["linear", "relu", "lrelu", "tanh", "sigmoid", "silu"]


def _x_b(seed, shape=(2, 3, 5), dim=1, dtype=DT):
    g = torch.Generator(DEVICE).manual_seed(seed)
    x = (torch.randn(shape, dtype=dtype, generator=g) * 2).requires_grad_()
    b = torch.randn(shape[dim], dtype=dtype, generator=g).requires_grad_()
    return x, b


@pytest.mark.parametrize("clamp", [None, 0.6])
@pytest.mark.parametrize("act", ACTS)
def test_value_first_and_second_derivative(act, clamp):
    x, b = _x_b(0)
    got = tk.bias_act(x, b, 1, act, clamp=clamp)
    want = reference.bias_act(x, b, 1, act, clamp=clamp)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)
    dy = torch.randn_like(got)
    g_got = torch.autograd.grad(got, (x, b), dy, create_graph=True)
    g_want = torch.autograd.grad(want, (x, b), dy, create_graph=True)
    for a, c in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-11, atol=1e-12)
    # second order, R1-style: differentiate a function of the first gradient again
    r_got = ((g_got[0] ** 2) * x).sum() + (g_got[1] * b).sum()
    r_want = ((g_want[0] ** 2) * x).sum() + (g_want[1] * b).sum()
    h_got = torch.autograd.grad(r_got, (x, b))
    h_want = torch.autograd.grad(r_want, (x, b))
    for a, c in zip(h_got, h_want, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("act", ["lrelu", "silu"])
def test_gradcheck_and_gradgradcheck(act):
    x, b = _x_b(1, shape=(2, 3, 2))
    fn = lambda x, b: tk.bias_act(x, b, 1, act, alpha=0.3, gain=1.7, clamp=2.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x, b), fast_mode=True)


def test_defaults_dims_and_shapes():
    x, _ = _x_b(2, shape=(3, 4, 5))
    # default gain sqrt(2) for lrelu with alpha 0.2, checked by hand
    y = tk.bias_act(x, act="lrelu")
    torch.testing.assert_close(y, torch.where(x > 0, x, 0.2 * x) * math.sqrt(2))
    for dim in (0, 2, -1):
        _, b = _x_b(3, shape=(3, 4, 5), dim=dim)
        torch.testing.assert_close(
            tk.bias_act(x, b, dim, "tanh"), reference.bias_act(x, b, dim, "tanh")
        )
    xt = x.detach().transpose(0, 2)  # non-contiguous
    b = torch.randn(4, dtype=DT)
    torch.testing.assert_close(
        tk.bias_act(xt, b, 1, "sigmoid"), reference.bias_act(xt, b, 1, "sigmoid")
    )
    scalar = torch.tensor(-2.0, dtype=DT)
    torch.testing.assert_close(tk.bias_act(scalar, act="relu"), torch.tensor(0.0, dtype=DT))
    assert tk.bias_act(torch.zeros(0, 3), torch.ones(3), act="silu").shape == (0, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_float32_reference(dtype):
    x, b = _x_b(4, shape=(2, 8, 3), dtype=dtype)
    got = tk.bias_act(x, b, 1, "silu", gain=1.5, clamp=2.0)
    assert got.dtype == dtype
    want = reference.bias_act(x.float(), b.float(), 1, "silu", gain=1.5, clamp=2.0)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def test_bad_inputs_raise_clear_errors():
    x, b = _x_b(5)
    with pytest.raises(ValueError, match="unknown act"):
        tk.bias_act(x, b, act="gelu")
    with pytest.raises(ValueError, match="b must have shape"):
        tk.bias_act(x, b, dim=2)
    with pytest.raises(ValueError, match="clamp must be"):
        tk.bias_act(x, b, clamp=-1.0)


@pytest.mark.parametrize("act", ["lrelu", "silu"])
def test_channels_last_stays_channels_last(act):
    """An NHWC map (the default model's layout) is walked in place: the output and the gradient
    keep its layout, values and first and second derivatives as the reference's."""
    x = torch.randn(2, 5, 3, 4, dtype=DT).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    b = torch.randn(5, dtype=DT, requires_grad=True)
    up = torch.randn(2, 5, 3, 4, dtype=DT).contiguous(memory_format=torch.channels_last)
    outs = {}
    for name, fn in (("triton", tk.bias_act), ("reference", reference.bias_act)):
        y = fn(x, b, 1, act, clamp=1.5)
        gx, gb = torch.autograd.grad((y * up).sum(), [x, b], create_graph=True)
        # an R1-style double backward (lrelu's f'' = 0: no path to b, a zero gradient)
        (ggb,) = torch.autograd.grad(gx.square().sum(), [b], allow_unused=True)
        outs[name] = (y, gx, gb, torch.zeros_like(b) if ggb is None else ggb)
    y, gx = outs["triton"][:2]
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert gx.is_contiguous(memory_format=torch.channels_last)
    for got, want in zip(outs["triton"], outs["reference"], strict=True):
        torch.testing.assert_close(got, want)
    torch.library.opcheck(fused_bias_act.bias_act_fwd,
                          (x.detach(), b.detach(), 1, 2, 0.2, 1.0, 1.5))
    torch.library.opcheck(fused_bias_act.bias_act_grad,
                          (up, x.detach(), b.detach(), 1, 5, 0.2, 1.0, 1.5))


def test_opcheck_forward_and_grad_ops():
    x, b = _x_b(6, shape=(2, 3, 4), dtype=torch.float32)
    torch.library.opcheck(fused_bias_act.bias_act_fwd, (x, b, 1, 5, 0.0, 1.0, 0.5))
    dy = torch.randn(2, 3, 4, requires_grad=True)
    torch.library.opcheck(fused_bias_act.bias_act_grad, (dy, x, b, 1, 3, 0.0, 1.0, -1.0))


def test_torch_compile_fullgraph_matches_eager():
    # aot_eager exercises dynamo, the fake kernels, functionalization and the autograd
    # registration; inductor would add a ~1 min C++ build on CPU without testing more of our code.
    x, b = _x_b(7, dtype=torch.float32)
    fn = torch.compile(
        lambda x, b: tk.bias_act(x, b, 1, "lrelu", clamp=1.0), backend="aot_eager", fullgraph=True
    )
    got = fn(x, b)
    want = reference.bias_act(x, b, 1, "lrelu", clamp=1.0)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got.sum(), (x, b))
    g_want = torch.autograd.grad(want.sum(), (x, b))
    for a, c in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, c)

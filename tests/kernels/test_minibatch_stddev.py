"""minibatch_stddev: the reference against a per-sample loop, the C++ kernel against the reference
(values, first and second derivatives, dtypes, layouts), torch.library.opcheck, and input errors."""

from __future__ import annotations

import math

import pytest
import torch

from mtcore.kernels.ops import minibatch_stddev as ops_mod
from mtcore.kernels.ops import native_ready
from mtcore.kernels.ops.minibatch_stddev import minibatch_stddev
from mtcore.kernels.reference import layers as ref


@pytest.fixture(scope="module")
def cpp(cpp_built):
    """torch.ops.mtcore with this module's fake and autograd registered (conftest builds the ops)."""
    native_ready("minibatch_stddev", ops_mod._register)
    return torch.ops.mtcore


def _loop(x, group_size, f):
    """Independent oracle: for each sample find its group mates and average their per-feature std."""
    n, c, h, w = x.shape
    g = min(group_size, n)
    m = n // g
    out = torch.empty(n, c + f, h, w, dtype=x.dtype)
    out[:, :c] = x
    for i in range(n):
        mates = [j for j in range(n) if j % m == i % m]  # n = g*M + m: same column m
        assert len(mates) == g
        for k in range(f):
            feats = x[mates][:, k * (c // f) : (k + 1) * (c // f)]  # [G, c, H, W]
            std = torch.sqrt(feats.var(dim=0, unbiased=False) + 1e-8)
            out[i, c + k] = std.mean()
    return out


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize(
    "shape,group,f", [((8, 4, 3, 2), 4, 1), ((6, 6, 2, 3), 2, 3), ((3, 2, 2, 2), 8, 2)]
)
def test_reference_matches_loop(shape, group, f):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(ref.minibatch_stddev(x, group, f), _loop(x, group, f))


def test_reference_hand_value():
    # two samples in one group, one feature each: std of {1, 3} is 1 -> sqrt(1 + 1e-8)
    x = torch.tensor([1.0, 3.0], dtype=torch.float64).reshape(2, 1, 1, 1)
    y = ref.minibatch_stddev(x, group_size=2)
    assert y.shape == (2, 2, 1, 1)
    assert y[:, 1].flatten().tolist() == pytest.approx([math.sqrt(1 + 1e-8)] * 2)
    assert torch.equal(y[:, :1], x)


# ---------------------------------------------------------------- C++ vs reference

CASES = [  # (N, C, H, W, group_size, num_channels)
    (8, 6, 5, 3, 4, 1),
    (6, 4, 3, 3, 2, 2),
    (4, 6, 2, 7, 4, 3),
    (3, 4, 3, 1, 8, 1),  # G = min(8, 3) = 3
    (5, 3, 2, 2, 1, 1),  # G = 1: std is sqrt(1e-8)
    (4, 2, 40, 40, 2, 1),  # K = 3200 > one chunk of the kernel
]


def _fwd_bwd(fn, x, go):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    return y, torch.autograd.grad(y, x, go)[0]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_matches_reference(cpp, case, dtype):
    n, c, h, w, group, f = case
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    go = torch.randn(n, c + f, h, w, generator=g, dtype=dtype)
    want = _fwd_bwd(lambda t: ref.minibatch_stddev(t, group, f), x, go)
    got = _fwd_bwd(lambda t: minibatch_stddev(t, group, f, backend="cpp"), x, go)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    for wv, ov in zip(want, got, strict=True):
        torch.testing.assert_close(ov, wv, **tol)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_cpp_non_contiguous_input(cpp, layout):
    g = torch.Generator().manual_seed(2)
    if layout == "channels_last":
        x = torch.randn(4, 6, 3, 5, generator=g, dtype=torch.float64).to(
            memory_format=torch.channels_last
        )
    else:
        x = torch.randn(4, 12, 3, 5, generator=g, dtype=torch.float64)[:, 1::2]
    go = torch.randn(4, 8, 3, 5, generator=g, dtype=torch.float64)
    want = _fwd_bwd(lambda t: ref.minibatch_stddev(t, 2, 2), x, go)
    got = _fwd_bwd(lambda t: minibatch_stddev(t, 2, 2, backend="cpp"), x, go)
    for wv, ov in zip(want, got, strict=True):
        torch.testing.assert_close(ov, wv)


@pytest.mark.parametrize("case", [(8, 6, 5, 3, 4), (4, 300, 4, 4, 2), (3, 4, 1, 2, 8), (6, 2000, 2, 1, 2)],
                         ids=str)
def test_cpp_channels_last_keeps_its_layout(cpp, case):
    """With one std channel a channels-last x gives channels-last outputs (the next convolution
    then copies nothing), same values; pixels per task: several (C=6), a few (C=300), one with a
    1x2 map and G = N = 3, and a pixel wider than a task's features (C=2000)."""
    n, c, h, w, group = case
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    go = torch.randn(n, c + 1, h, w, generator=g, dtype=torch.float64)
    want = _fwd_bwd(lambda t: ref.minibatch_stddev(t, group, 1), x, go)
    cl = torch.channels_last
    for grad_layout in (cl, torch.contiguous_format):
        got = _fwd_bwd(lambda t: minibatch_stddev(t, group, 1, backend="cpp"),
                       x.to(memory_format=cl), go.contiguous(memory_format=grad_layout))
        for wv, ov in zip(want, got, strict=True):
            assert ov.is_contiguous(memory_format=cl)
            torch.testing.assert_close(ov, wv)
    x_cl = x[:, :6, :2, :1].contiguous(memory_format=cl).requires_grad_()  # small: gradcheck
    assert torch.autograd.gradcheck(lambda t: minibatch_stddev(t, group, 1, backend="cpp"), (x_cl,))
    assert torch.autograd.gradgradcheck(lambda t: minibatch_stddev(t, group, 1, backend="cpp"),
                                        (x_cl,))
    torch.library.opcheck(cpp.mbstd_fwd.default, (x_cl, group, 1))
    go_cl = go[:, :7, :2, :1].contiguous(memory_format=cl).requires_grad_()
    torch.library.opcheck(cpp.mbstd_bwd.default, (go_cl, x_cl, group, 1))


def test_cpp_bfloat16(cpp):
    # The kernel accumulates in float32 and rounds once; the reference runs in float64 on the same
    # bf16 inputs. Results are within a bf16 ulp (2^-8 relative) plus the rounding of the inputs.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 8, 4, 4, generator=g).bfloat16()
    go = torch.randn(8, 9, 4, 4, generator=g).bfloat16()
    want = _fwd_bwd(lambda t: ref.minibatch_stddev(t, 4, 1), x.double(), go.double())
    got = _fwd_bwd(lambda t: minibatch_stddev(t, 4, 1, backend="cpp"), x, go)
    assert got[0].dtype == torch.bfloat16
    torch.testing.assert_close(got[0].double(), want[0], rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(got[1].double(), want[1], rtol=2**-7, atol=2e-3)


# ---------------------------------------------------------------- derivatives


@pytest.mark.parametrize(
    "case", [(4, 4, 1, 2, 2, 2), (6, 3, 2, 1, 3, 1), (2, 2, 2, 2, 1, 1)], ids=str
)
def test_cpp_gradcheck_and_gradgradcheck(cpp, case):
    n, c, h, w, group, f = case
    x = torch.randn(n, c, h, w, dtype=torch.float64, requires_grad=True)

    def fn(t):
        return minibatch_stddev(t, group, f, backend="cpp")

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_r1_penalty_matches_reference(cpp):
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64)
    wt = torch.randn(8, 5, 3, 3, generator=g, dtype=torch.float64)

    def run(fn):
        x = x0.clone().requires_grad_()
        d = (fn(x).tanh() * wt).sum()
        (gx,) = torch.autograd.grad(d, x, create_graph=True)
        penalty = gx.square().sum()
        return penalty, torch.autograd.grad(penalty, x)[0]

    want = run(lambda t: ref.minibatch_stddev(t, 4, 1))
    got = run(lambda t: minibatch_stddev(t, 4, 1, backend="cpp"))
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


# ---------------------------------------------------------------- torch.library


@pytest.mark.parametrize("case", [(4, 4, 2, 3, 2, 2), (3, 2, 3, 3, 4, 1)], ids=str)
def test_opcheck(cpp, case):
    n, c, h, w, group, f = case
    x = torch.randn(n, c, h, w, dtype=torch.float64, requires_grad=True)
    go = torch.randn(n, c + f, h, w, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(cpp.mbstd_fwd.default, (x, group, f))
    torch.library.opcheck(cpp.mbstd_bwd.default, (go, x, group, f))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "x,group,f,exc,msg",
    [
        (torch.ones(6, 4, 2, 2), 4, 1, ValueError, r"N=6 .*divisible by the group size G=.*=4"),
        (torch.ones(4, 6, 2, 2), 4, 4, ValueError, "C=6 .*divisible by num_channels=4"),
        (torch.ones(4, 4, 2, 2, dtype=torch.int32), 4, 1, TypeError, "floating point.*int32"),
        (torch.ones(4, 4, 2), 4, 1, ValueError, r"\[N, C, H, W\].*\(4, 4, 2\)"),
        (torch.ones(4, 4, 2, 2), 0, 1, ValueError, "group_size must be an int >= 1"),
        (torch.ones(0, 4, 2, 2), 4, 1, ValueError, "empty batch"),
        (torch.ones(4, 0, 2, 2), 4, 1, ValueError, "no channels"),
    ],
)
def test_bad_arguments(x, group, f, exc, msg):
    with pytest.raises(exc, match=msg):
        minibatch_stddev(x, group, f)


def test_kernel_checks_its_inputs(cpp):
    with pytest.raises(ValueError, match="N=6 .*divisible by the group size G=min"):
        cpp.mbstd_fwd(torch.ones(6, 4, 2, 2), 4, 1)
    with pytest.raises(
        ValueError, match=r"grad_out must have shape \[N, C \+ num_channels, H, W\]"
    ):
        cpp.mbstd_bwd(torch.ones(4, 4, 2, 2), torch.ones(4, 4, 2, 2), 4, 1)
    with pytest.raises(TypeError, match="x must be float32, float64, bfloat16 or float16"):
        cpp.mbstd_fwd(torch.ones(4, 4, 2, 2, dtype=torch.int64), 4, 1)

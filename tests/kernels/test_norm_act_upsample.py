"""batch_norm_act, pixel_norm_act and upsample_conv2d: the references against hand computations
and torch's modules, the native kernels (and the folded upsample-conv) against the references
(values, gradients, running statistics, layouts, dtypes), gradcheck and opcheck, input errors,
and FusedSequential against the plain nn.Sequential it replaces.

The ``cuda`` cases need a CUDA device (``python -m pytest -m gpu`` on a GPU machine); the nvcc
compile test guards csrc/cuda in CI."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtcore import kernels as K
from mtcore.kernels.ops.upsample_conv import fold_upsample_weight
from mtcore.kernels.reference import layers as ref

_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (a GPU machine)")])


def _backend_on(backend: str) -> tuple[str, str]:
    """(device, backend), the ops' fakes registered; fails (not skips) if the backend that
    should be there is not. Triton runs in its interpreter on the CPU (conftest sets
    TRITON_INTERPRET=1 there)."""
    device = "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) \
        else "cpu"
    if backend not in K.available_backends(device):
        pytest.fail(f"the {backend} backend is unavailable on {device}")
    K.batch_norm_act(torch.randn(2, 3, 2, device=device), training=True, backend=backend)
    K.pixel_norm_act(torch.randn(2, 3, 2, device=device), backend=backend)
    K.upsample_conv2d(torch.randn(1, 2, 2, 2, device=device), torch.randn(2, 2, 3, 3, device=device),
                      backend=backend)
    return device, backend


@pytest.fixture(params=["cpp", _CUDA, "triton"])
def on(request, cpp_built):
    """Every backend with a kernel of these ops."""
    return _backend_on(request.param)


@pytest.fixture(params=["cpp", _CUDA])
def native(request, cpp_built):
    """The backends of torch.ops.mtcore (C++ and CUDA)."""
    return _backend_on(request.param)


@pytest.fixture(scope="module")
def cpp(cpp_built):
    if "cpp" not in K.available_backends("cpu"):
        pytest.fail("the cpp backend is unavailable: the extension did not build")
    K.batch_norm_act(torch.randn(2, 3, 2), training=True, backend="cpp")  # registers the fakes
    K.pixel_norm_act(torch.randn(2, 3, 2), backend="cpp")
    return torch.ops.mtcore


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (shift + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a non-contiguous view: every other column
        return torch.cat([x, x], dim=-1)[..., ::2]
    return x


# ------------------------------------------------------------------------------ batch_norm_act


def test_batch_norm_act_reference_by_hand():
    x = torch.tensor([[[1.0, 3.0]], [[5.0, -1.0]]], dtype=torch.float64)  # [N=2, C=1, L=2]
    mean, var = 2.0, (1 + 1 + 9 + 9) / 4  # values 1, 3, 5, -1
    w, b = torch.tensor([2.0], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)
    rm, rv = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    y = ref.batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5, "lrelu", 0.2)
    z = [(v - mean) / math.sqrt(var + 1e-5) * 2 - 1 for v in (1, 3, 5, -1)]
    want = [v if v > 0 else 0.2 * v for v in z]
    assert y.flatten().tolist() == pytest.approx([want[0], want[1], want[2], want[3]])
    assert rm.item() == pytest.approx(0.1 * mean)
    assert rv.item() == pytest.approx(0.9 + 0.1 * var * 4 / 3)  # unbiased batch variance


def _bn_case(shape, layout, act, training, affine, dtype, backend, seed=0, shift=0.0,
             device="cpu"):
    c = shape[1]
    x = _layout(_rand(*shape, seed=seed, scale=2.0, shift=shift).to(device), layout).to(dtype)
    x.requires_grad_()
    pt = torch.float64 if dtype == torch.float64 else torch.float32  # parameters: fp32 under bf16
    w = _rand(c, seed=seed + 1, dtype=pt).to(device).requires_grad_() if affine else None
    b = _rand(c, seed=seed + 2, dtype=pt).to(device).requires_grad_() if affine else None
    rm = _rand(c, seed=seed + 3, dtype=pt).to(device)
    rv = (_rand(c, seed=seed + 4, dtype=pt).abs() + 0.5).to(device)
    y = K.batch_norm_act(x, rm, rv, w, b, training, 0.3, 1e-5, act, 0.2, backend=backend)
    g = _rand(*y.shape, seed=seed + 5).to(dtype).to(device)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, leaves, g)
    return y, grads, (rm, rv)


@pytest.mark.parametrize("shape,layout", [
    ((4, 5, 7, 3), "contiguous"), ((4, 5, 7, 3), "channels_last"), ((3, 6, 5, 9), "strided"),
    ((8, 3, 11), "contiguous"), ((9, 4), "contiguous"), ((32, 16, 8, 8), "channels_last"),
    ((6, 40, 5, 3), "channels_last"),  # two channel tiles of the CUDA reduction, the second partial
])
@pytest.mark.parametrize("act", ["linear", "relu", "lrelu"])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_act_matches_reference(on, shape, layout, act, training):
    device, backend = on
    y, g, stats = _bn_case(shape, layout, act, training, True, torch.float32, backend,
                           device=device)
    y0, g0, stats0 = _bn_case(shape, layout, act, training, True, torch.float64, "reference")
    assert _rel(y.cpu(), y0) <= 2e-5
    for a, b in zip(g, g0, strict=True):
        assert _rel(a.cpu(), b) <= 5e-5
    for a, b in zip(stats, stats0, strict=True):
        assert _rel(a.cpu(), b) <= 1e-6
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert g[0].is_contiguous(memory_format=torch.channels_last)


def test_batch_norm_act_without_affine_and_in_bf16(on):
    device, backend = on
    y, g, _ = _bn_case((4, 6, 5, 5), "channels_last", "relu", True, False, torch.float32, backend,
                       device=device)
    y0, g0, _ = _bn_case((4, 6, 5, 5), "channels_last", "relu", True, False, torch.float64,
                         "reference")
    assert _rel(y.cpu(), y0) <= 2e-5 and _rel(g[0].cpu(), g0[0]) <= 5e-5
    # bf16 activations, fp32 parameters (as under autocast): statistics in fp32, outputs rounded
    yb, gb, _ = _bn_case((4, 6, 5, 5), "channels_last", "lrelu", True, True, torch.bfloat16,
                         backend, device=device)
    y0, g0, _ = _bn_case((4, 6, 5, 5), "channels_last", "lrelu", True, True, torch.float64,
                         "reference")
    assert yb.dtype == torch.bfloat16
    assert _rel(yb.cpu(), y0) <= 2e-2
    assert _rel(gb[0].cpu(), g0[0]) <= 5e-2 and _rel(gb[1].cpu(), g0[1]) <= 2e-2


def test_batch_norm_act_large_mean_keeps_the_variance(on):
    """|mean| = 1000 std: a one-pass E[x^2] - E[x]^2 in float would lose every digit."""
    device, backend = on
    x = _rand(8, 3, 6, 6, seed=3, scale=0.5, shift=500.0).float()
    y = K.batch_norm_act(x.to(device), training=True, act="linear", backend=backend)
    want = K.batch_norm_act(x.double(), training=True, act="linear", backend="reference")
    assert _rel(y.cpu(), want) <= 1e-4


def test_batch_norm_act_gradcheck(on):
    device, backend = on
    for act, training in (("relu", True), ("lrelu", True), ("linear", True), ("lrelu", False)):
        x = _rand(3, 4, 3, 2, seed=7, dtype=torch.float64).to(device).contiguous(
            memory_format=torch.channels_last).requires_grad_()
        w = _rand(4, seed=8, dtype=torch.float64).to(device).requires_grad_()
        b = _rand(4, seed=9, dtype=torch.float64).to(device).requires_grad_()
        rm = _rand(4, seed=10, dtype=torch.float64).to(device)
        rv = (_rand(4, seed=11, dtype=torch.float64).abs() + 0.5).to(device)

        def f(x, w, b, act=act, training=training, rm=rm, rv=rv):
            stats = (None, None) if training else (rm, rv)
            return K.batch_norm_act(x, *stats, w, b, training, 0.1, 1e-5, act, 0.3,
                                    backend=backend)

        assert torch.autograd.gradcheck(f, (x, w, b))


def test_batch_norm_act_opcheck(native):
    device, _ = native
    ops = torch.ops.mtcore
    x = _rand(3, 4, 5, 2).to(device).requires_grad_()
    w, b = _rand(4, seed=1).to(device).requires_grad_(), _rand(4, seed=2).to(device)
    torch.library.opcheck(ops.bn_act_fwd.default, (x, w, b, None, None, 1e-5, 2, 0.2))
    torch.library.opcheck(ops.bn_act_fwd.default,
                          (x.contiguous(memory_format=torch.channels_last), None, None,
                           _rand(4, seed=3).to(device), _rand(4, seed=4).abs().to(device), 1e-5,
                           1, 0.0))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_batch_norm_act_double_backward_is_a_clear_error(cpp, backend):
    """A create_graph backward through the op works (a regulariser or balancer may take one
    without differentiating this op again); differentiating its result again raises, naming the
    op, instead of giving a silent zero."""
    _backend_on(backend)
    x = _rand(4, 3, 2, 2).requires_grad_()
    w = torch.ones(3, requires_grad=True)
    y = K.batch_norm_act(x, None, None, w, None, True, act="relu", backend=backend)
    gx, gw = torch.autograd.grad((y * y).sum(), (x, w), create_graph=True)
    y0 = K.batch_norm_act(x, None, None, w, None, True, act="relu", backend="reference")
    gx0, gw0 = torch.autograd.grad((y0 * y0).sum(), (x, w))
    assert _rel(gx, gx0) <= 1e-5 and _rel(gw, gw0) <= 1e-5
    with pytest.raises(RuntimeError, match="batch_norm_act has no second derivative"):
        gw.sum().backward()
    # plain backward, and a create_graph one whose result stays unused beyond this op: no error
    (gx,) = torch.autograd.grad((y * y).sum(), x, retain_graph=True)
    assert gx.shape == x.shape


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_batch_norm_act_bad_input(cpp, backend):
    x = _rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"weight must have shape \[C\] = \[3\]"):
        K.batch_norm_act(x, weight=torch.ones(4), training=True, backend=backend)
    with pytest.raises(ValueError, match="running_mean and running_var are None"):
        K.batch_norm_act(x, training=False, backend=backend)
    with pytest.raises(ValueError, match="more than one value per channel"):
        K.batch_norm_act(_rand(1, 3), training=True, backend=backend)
    empty = _rand(0, 3, 4, 4)  # an empty batch passes through, as in F.batch_norm
    assert K.batch_norm_act(empty, training=True, backend=backend).shape == empty.shape
    with pytest.raises(TypeError, match="floating point"):
        K.batch_norm_act(torch.ones(2, 3, 2, dtype=torch.long), training=True, backend=backend)
    with pytest.raises(ValueError, match="unknown act 'tanh'"):
        K.batch_norm_act(x, training=True, act="tanh", backend=backend)


# ------------------------------------------------------------------------------ pixel_norm_act


def test_pixel_norm_act_reference_by_hand():
    x = torch.tensor([3.0, -4.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    r = 1 / math.sqrt(12.5 + 1e-8)
    y = ref.pixel_norm_act(x, 1e-8, "lrelu", 0.2)
    assert y.flatten().tolist() == pytest.approx([3 * r, -0.8 * r])


@pytest.mark.parametrize("shape,layout", [
    ((4, 5, 7, 3), "contiguous"), ((4, 5, 7, 3), "channels_last"), ((3, 6, 5, 9), "strided"),
    ((2, 7), "contiguous"), ((32, 16, 8, 8), "channels_last"), ((2, 3, 300), "contiguous"),
])
@pytest.mark.parametrize("act", ["linear", "relu", "lrelu"])
def test_pixel_norm_act_matches_reference(on, shape, layout, act):
    device, backend = on

    def run(dtype, backend, device):
        x = _layout(_rand(*shape, scale=3.0).to(device), layout).to(dtype).requires_grad_()
        y = K.pixel_norm_act(x, 1e-8, act, 0.2, backend=backend)
        g = _rand(*shape, seed=1).to(dtype).to(device)
        return y, torch.autograd.grad(y, x, g)[0]
    y, g = run(torch.float32, backend, device)
    y0, g0 = run(torch.float64, "reference", "cpu")
    assert _rel(y.cpu(), y0) <= 2e-6 and _rel(g.cpu(), g0) <= 2e-6
    yb, gb = run(torch.bfloat16, backend, device)
    assert yb.dtype == torch.bfloat16
    assert _rel(yb.cpu(), y0) <= 1e-2 and _rel(gb.cpu(), g0) <= 2e-2
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_pixel_norm_act_gradcheck_opcheck_and_errors(on):
    device, backend = on
    for act in ("linear", "lrelu"):
        x = _rand(2, 5, 3, 3, dtype=torch.float64).to(device).contiguous(
            memory_format=torch.channels_last).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x, act=act: K.pixel_norm_act(x, 1e-8, act, 0.3, backend=backend), (x,))
    if backend == "triton":
        from mtcore.kernels.triton_kernels import pn_act as tpn
        fwd = tpn.pn_act_fwd
    else:
        fwd = torch.ops.mtcore.pn_act_fwd.default
    torch.library.opcheck(fwd, (_rand(2, 3, 4, 5).to(device).requires_grad_(), 1e-8, 2, 0.2))
    x = _rand(3, 4, 2, 2).to(device).requires_grad_()
    (gx,) = torch.autograd.grad(K.pixel_norm_act(x, backend=backend).pow(3).sum(), x,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="pixel_norm_act has no second derivative"):
        gx.sum().backward()
    empty = torch.ones(2, 0, 3, device=device)  # as the plain PixelNorm: empty in, empty out
    assert K.pixel_norm_act(empty, backend=backend).shape == empty.shape
    with pytest.raises(ValueError, match="eps must be > 0"):
        K.pixel_norm_act(x, eps=0.0, backend=backend)


# ------------------------------------------------------------------------------ upsample_conv2d


def test_fold_matches_the_taps_by_hand():
    """One channel pair, kernel rows/columns a..c: the 4 transposed taps are [c, b+c, a+b, a]."""
    w = torch.arange(1.0, 10.0, dtype=torch.float64).reshape(1, 1, 3, 3)  # rows [1 2 3] [4 5 6] ...
    k = fold_upsample_weight(w)[0, 0]
    rows = [w[0, 0, 2], w[0, 0, 1] + w[0, 0, 2], w[0, 0, 0] + w[0, 0, 1], w[0, 0, 0]]
    want = torch.stack([torch.stack([r[2], r[1] + r[2], r[0] + r[1], r[0]]) for r in rows])
    assert torch.equal(k, want)


@pytest.mark.parametrize("shape,cout,layout,bias", [
    ((2, 3, 4, 5), 4, "contiguous", True), ((3, 5, 3, 3), 2, "channels_last", False),
    ((1, 2, 1, 1), 3, "contiguous", True), ((2, 6, 5, 2), 5, "strided", True),
])
def test_upsample_conv2d_matches_reference(on, shape, cout, layout, bias):
    device, backend = on

    def run(backend, dtype, device="cpu"):
        x = _layout(_rand(*shape).to(device), layout).to(dtype).requires_grad_()
        w = _rand(cout, shape[1], 3, 3, seed=1).to(dtype).to(device).requires_grad_()
        b = _rand(cout, seed=2).to(dtype).to(device).requires_grad_() if bias else None
        y = K.upsample_conv2d(x, w, b, backend=backend)
        leaves = [t for t in (x, w, b) if t is not None]
        return y, torch.autograd.grad(y, leaves, _rand(*y.shape, seed=3).to(dtype).to(device))
    want, g_want = run("reference", torch.float64)
    assert want.shape == (shape[0], cout, 2 * shape[2], 2 * shape[3])
    # (cuDNN may run float32 convolutions in TF32: 1e-3 there)
    tol32 = 1e-5 if device == "cpu" else 1e-3
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, tol32)):
        got, g_got = run(backend, dtype, device)
        assert _rel(got.cpu(), want) <= tol
        for a, b in zip(g_got, g_want, strict=True):
            assert _rel(a.cpu(), b) <= tol
    if layout == "channels_last":
        y = run(backend, torch.float32, device)[0]
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_upsample_conv2d_bad_input():
    x = _rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"weight must be \[C_out, 3, 3, 3\]"):
        K.upsample_conv2d(x, _rand(4, 3, 5, 5))
    with pytest.raises(ValueError, match="x must be"):
        K.upsample_conv2d(_rand(2, 3, 4), _rand(4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"bias must be None or of shape \[4\]"):
        K.upsample_conv2d(x, _rand(4, 3, 3, 3), _rand(3))


# ------------------------------------------------------------------------------ FusedSequential


def _pair(*layers: nn.Module) -> tuple[nn.Sequential, K.FusedSequential]:
    plain = nn.Sequential(*layers)
    fused = K.FusedSequential(*copy.deepcopy(list(layers)))
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def _step(model: nn.Module, x: torch.Tensor, backend: str):
    K.set_backend(backend)
    try:
        x = x.clone().requires_grad_()
        y = model(x)
        grads = torch.autograd.grad(y, [x, *model.parameters()], _rand(*y.shape, seed=9))
        return y, grads
    finally:
        K.set_backend(None)


@pytest.mark.parametrize("backend,tol", [("reference", 0.0), ("cpp", 2e-5)])
def test_fused_sequential_equals_the_plain_modules(cpp, backend, tol):
    torch.manual_seed(0)
    # (no conv bias before a BatchNorm: its gradient is zero up to rounding, nothing to compare)
    layers = [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(4, 6, 3, padding=1, bias=False),
              nn.BatchNorm2d(6), nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(6, 5, 3, padding=1),
              K.PixelNorm(), nn.ReLU(inplace=True), nn.Conv2d(5, 5, 1, bias=False),
              nn.BatchNorm2d(5)]
    plain, fused = _pair(*layers)
    x = _rand(3, 4, 5, 6)
    for mode in ("train", "train", "eval"):
        plain.train(mode == "train")
        fused.train(mode == "train")
        y0, g0 = _step(plain, x, "reference")
        y1, g1 = _step(fused, x, backend)
        assert _rel(y1, y0) <= tol
        for a, b in zip(g1, g0, strict=True):
            assert _rel(a, b) <= 20 * tol
        for (k, a), b in zip(fused.state_dict().items(), plain.state_dict().values(), strict=True):
            assert _rel(a.double(), b.double()) <= tol, k  # running stats, num_batches_tracked


def test_fused_sequential_empty_batch_as_the_plain_modules(cpp):
    plain, fused = _pair(nn.Upsample(scale_factor=2), nn.Conv2d(3, 4, 3, padding=1),
                         nn.BatchNorm2d(4), nn.ReLU(), K.PixelNorm(), nn.LeakyReLU(0.2))
    x = _rand(0, 3, 5, 5)
    assert fused(x).shape == plain(x).shape == (0, 4, 10, 10)


def test_fused_sequential_batchnorm_options(cpp):
    """momentum=None (cumulative average) and track_running_stats=False follow nn.BatchNorm2d."""
    for bn in (nn.BatchNorm2d(3, momentum=None), nn.BatchNorm2d(3, track_running_stats=False),
               nn.BatchNorm2d(3, affine=False)):
        plain, fused = _pair(bn, nn.ReLU())
        for _ in range(3):
            x = _rand(4, 3, 3, 3, seed=len(plain.state_dict()) + _)
            y0, _g0 = _step(plain, x, "reference")
            y1, _g1 = _step(fused, x, "cpp")
            assert _rel(y1, y0) <= 2e-5
        for a, b in zip(fused.state_dict().values(), plain.state_dict().values(), strict=True):
            assert _rel(a.double(), b.double()) <= 1e-6


def test_fused_sequential_runs_hooked_modules_unfused(cpp):
    """A forward or backward hook on a fused module must still fire: the pair then runs module
    by module."""
    plain, fused = _pair(nn.BatchNorm2d(3), nn.ReLU())
    seen = []
    fused[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    y = fused(_rand(2, 3, 4, 4))
    assert seen == [y.shape]
    torch.testing.assert_close(y, plain(_rand(2, 3, 4, 4)))
    for where in ("module", "global"):
        _, fused = _pair(nn.BatchNorm2d(3), nn.ReLU())
        called = []

        def hook(m, grad_in, grad_out, called=called):
            called.append(type(m).__name__)
        if where == "module":
            handle = fused[0].register_full_backward_hook(hook)
        else:
            handle = torch.nn.modules.module.register_module_full_backward_hook(hook)
        try:
            x = _rand(2, 3, 4, 4).requires_grad_()
            fused(x).sum().backward()
        finally:
            handle.remove()
        assert "BatchNorm2d" in called, where


def test_fused_sequential_leaves_other_upsamplings_alone(cpp):
    """Only nearest x2 + 3x3/stride 1/padding 1: a bilinear upsample or a 5x5 conv run as is."""
    for up, conv in ((nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(2, 2, 3, padding=1)),
                     (nn.Upsample(scale_factor=2), nn.Conv2d(2, 2, 5, padding=2)),
                     (nn.Upsample(scale_factor=3), nn.Conv2d(2, 2, 3, padding=1))):
        plain, fused = _pair(up, conv)
        x = _rand(1, 2, 3, 3)
        K.set_backend("cpp")
        try:
            assert torch.equal(fused(x), plain(x))
        finally:
            K.set_backend(None)


def test_batch_norm_act_functional_matches_module():
    """The reference path is F.batch_norm's: exactly nn.BatchNorm2d + ReLU."""
    bn = nn.BatchNorm2d(4)
    x = _rand(3, 4, 2, 5)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    y = ref.batch_norm_act(x, rm, rv, bn.weight, bn.bias, True, 0.1, 1e-5, "relu")
    assert torch.equal(y, F.relu(bn(x)))
    assert torch.equal(rm, bn.running_mean) and torch.equal(rv, bn.running_var)


def test_native_fold_matches_the_matrix_fold_and_is_twice_differentiable(native):
    device, _ = native
    ops = torch.ops.mtcore
    w = _rand(5, 3, 3, 3, dtype=torch.float64).to(device).requires_grad_()
    assert torch.equal(ops.upsample_fold(w), fold_upsample_weight(w))
    assert torch.autograd.gradcheck(ops.upsample_fold, (w,))
    assert torch.autograd.gradgradcheck(ops.upsample_fold, (w,))
    g = _rand(3, 5, 4, 4, seed=1, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(ops.upsample_fold_backward, (g,))
    torch.library.opcheck(ops.upsample_fold.default, (w,))
    torch.library.opcheck(ops.upsample_fold_backward.default, (g,))
    with pytest.raises(ValueError, match=r"weight must be \[\*, \*, 3, 3\]"):
        ops.upsample_fold(_rand(2, 2, 2, 2).to(device))


def test_native_kernels_check_their_inputs(native):
    """Called directly (past the Python wrappers' checks), the C++ and CUDA kernels raise the same
    exception types: ValueError for shapes and arguments, TypeError for dtypes."""
    device, _ = native
    ops = torch.ops.mtcore
    x = _rand(2, 3, 4, 4).to(device)
    with pytest.raises(ValueError, match=r"weight must have shape \[3\]"):
        ops.bn_act_fwd(x, torch.ones(4, device=device), None, None, None, 1e-5, 1, 0.0)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        ops.bn_act_fwd(x, None, None, torch.zeros(3, device=device), None, 1e-5, 1, 0.0)
    with pytest.raises(ValueError, match="act must be 0"):
        ops.pn_act_fwd(x, 1e-8, 7, 0.2)
    with pytest.raises(TypeError, match="x must be float32, float64, bfloat16 or float16"):
        ops.pn_act_fwd(x.long(), 1e-8, 2, 0.2)
    with pytest.raises(ValueError, match="dy has shape"):
        ops.pn_act_bwd(x[:1], x, 1e-8, 2, 0.2)


def test_triton_batch_norm_act_opcheck():
    """The Triton ops (mtcore_triton::bn_act_fwd / bn_act_bwd): schema, autograd registration and
    fake tensors, in the interpreter on the CPU."""
    _backend_on("triton")
    from mtcore.kernels.triton_kernels import bn_act as tbn

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = _rand(3, 4, 5, 2).to(device).requires_grad_()
    w, b = _rand(4, seed=1).to(device).requires_grad_(), _rand(4, seed=2).to(device)
    stats = (torch.zeros(4, device=device), torch.ones(4, device=device))
    for xx in (x, x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()):
        torch.library.opcheck(tbn.bn_act_fwd, (xx, w, b, *stats, True, 1e-5, 2, 0.2))
    y, mean, var = tbn.bn_act_fwd(x, w, b, *stats, True, 1e-5, 1, 0.0)
    torch.library.opcheck(tbn.bn_act_bwd, (torch.randn_like(y), x.detach(), w.detach(), b, mean,
                                           var, True, 1e-5, 1, 0.0),
                          test_utils=("test_schema", "test_faketensor"))

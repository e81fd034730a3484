"""The native kernels against the reference: values, gradients, layouts, edge cases, for the CUDA
backend (csrc/cuda) and, with the same checks, the C++ one.

The ``cuda`` cases need a CUDA device (a GPU machine: ``python -m pytest -m gpu``); CI has none,
and there the nvcc compile test (test_cuda_compile.py) guards the sources. The ``cpp`` cases run
everywhere and keep this suite itself working between GPU runs.
"""

from __future__ import annotations

import pytest
import torch

from mtcore import kernels as K

# fp32 kernels accumulate in float; bf16 outputs are rounded to 8 bits.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
ACTS = ["linear", "relu", "lrelu", "tanh", "sigmoid", "silu"]


@pytest.fixture(params=[
    "cpp",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (a GPU machine)")]),
])
def on(request):
    """(device, backend) under test; fails (not skips) if a backend that should be there is not."""
    device = "cpu" if request.param == "cpp" else "cuda"
    if request.param not in K.available_backends(device):
        pytest.fail(f"the {request.param} backend is unavailable on {device}: the extension did "
                    "not build")
    return device, request.param


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest error relative to the expected tensor's largest magnitude (gradients of mean losses
    are ~1e-3, so no absolute floor: an all-zero gradient must fail)."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


class Const:
    """A float input that takes no gradient (a target image)."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


def _run(fn, inputs, backend, device, dtype):
    """(outputs, grads) of scalar ``fn(*inputs, backend)``; float inputs are leaves, but Const."""
    def put(t):
        if isinstance(t, Const):
            return t.value.to(device=device, dtype=dtype)
        if t.is_floating_point():
            return t.to(device=device, dtype=dtype).requires_grad_()
        return t.to(device)
    leaves = [put(t) for t in inputs]
    out = fn(*leaves, backend)
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad])
    return out, grads


def _check(on, fn, inputs, dtype=torch.float32):
    device, backend = on
    got, g_got = _run(fn, inputs, backend, device, dtype)
    want, g_want = _run(fn, inputs, "reference", "cpu", torch.float64)
    assert _rel(got, want) <= TOL[dtype]
    for a, b in zip(g_got, g_want, strict=True):
        assert _rel(a, b) <= TOL[dtype]


@pytest.mark.parametrize("shape", [(3, 7, 13, 17), (5, 19), (2, 21, 9, 70), (1, 2, 1, 1)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seg_cross_entropy(on, shape, smoothing, dtype):
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]),
                           generator=torch.Generator().manual_seed(1))
    target.view(-1)[1::4] = -100  # some ignored, never all (the 1-pixel case keeps its target)
    weight = torch.rand(shape[1], generator=torch.Generator().manual_seed(2)) + 0.5
    for w in (None, weight):
        _check(on, lambda x, t, be, w=w: K.seg_cross_entropy(
            x, t, None if w is None else w.to(x.device, x.dtype), -100, smoothing, "mean",
            backend=be), [_rand(*shape, scale=3.0), target], dtype)
    _check(on, lambda x, t, be: K.seg_cross_entropy(x, t, None, -100, smoothing, "none",
                                                backend=be).square().sum(),
           [_rand(*shape, scale=3.0), target], dtype)


def test_seg_cross_entropy_channels_last_and_masked_classes(on):
    x = _rand(4, 5, 6, 7, scale=3.0).contiguous(memory_format=torch.channels_last)
    x[:, [0, 3]] = float("-inf")  # masked classes, the first one too: exp(-inf) = 0, not NaN
    target = torch.randint(0, 5, (4, 6, 7), generator=torch.Generator().manual_seed(3))
    target[(target == 0) | (target == 3)] = 1
    _check(on, lambda z, t, be: K.seg_cross_entropy(z, t, backend=be), [x, target])
    rows = _rand(9, 40, scale=2.0)
    rows[:, ::3] = float("-inf")
    labels = torch.arange(9) * 3 + 1
    _check(on, lambda z, t, be: K.seg_cross_entropy(z, t, backend=be), [rows, labels])


@pytest.mark.parametrize("kind", ["mse", "bernoulli"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vae_loss(on, kind, dtype):
    image = torch.rand(3, 3, 11, 13, generator=torch.Generator().manual_seed(4))
    inputs = [_rand(3, 3, 11, 13, seed=5), Const(image), _rand(3, 8, seed=6), _rand(3, 8, seed=7)]

    def fn(recon, img, mu, logvar, be):
        t = K.vae_loss(recon, img, mu, logvar, 0.7, kind, backend=be)
        return t.total + 0.5 * t.rec - 2.0 * t.kl
    _check(on, fn, inputs, dtype)


@pytest.mark.parametrize("kind", ["non_saturating", "hinge", "least_squares"])
@pytest.mark.parametrize("role", ["d_real", "d_fake", "g"])
def test_adversarial_loss(on, kind, role):
    _check(on, lambda x, be: K.adversarial_loss(x, kind, role, backend=be),
           [_rand(4, 1, 37, 29, scale=3.0, seed=8)])


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("clamp", [None, 0.6])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bias_act(on, act, clamp, layout):
    x = _rand(3, 5, 7, 9, scale=2.0, seed=9)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    up = _rand(3, 5, 7, 9, seed=10)
    if layout == "channels_last":  # the upstream gradient too, as a channels_last network gives
        up = up.contiguous(memory_format=torch.channels_last)
    _check(on, lambda z, b, be: (K.bias_act(z, b, 1, act, clamp=clamp, backend=be)
                             * up.to(z.device, z.dtype)).sum(), [x, _rand(5, seed=11)])


@pytest.mark.parametrize("act", ["lrelu", "tanh", "silu"])
@pytest.mark.parametrize("clamp", [None, 0.8])
def test_bias_act_double_backward_r1(on, act, clamp):
    """The R1 penalty's path: the squared input gradient, differentiated again."""
    def r1(backend, device):
        x = _rand(2, 4, 5, 5, dtype=torch.float64, seed=12).to(device, torch.float32)
        w = _rand(4, seed=13).to(device).requires_grad_()
        x.requires_grad_()
        y = K.bias_act(x, w, 1, act, clamp=clamp, backend=backend)
        (gx,) = torch.autograd.grad((y * y.detach().cos()).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), w)[0]
    assert _rel(r1(on[1], on[0]), r1("reference", "cpu")) <= 1e-4


def test_minibatch_stddev(on):
    up = _rand(8, 8, 4, 3, seed=14)  # 6 channels + 2 statistic maps
    _check(on, lambda x, be: (K.minibatch_stddev(x, 4, 2, backend=be)
                              * up.to(x.device, x.dtype)).sum(),
           [_rand(8, 6, 4, 3, seed=15)])


@pytest.mark.parametrize("c", [6, 300])
def test_minibatch_stddev_keeps_channels_last(on, c):
    """With one std channel a channels-last x gives channels-last outputs and input gradients
    (the next convolution copies nothing), the reference's values; the fakes say the same layout
    (opcheck compares them with the real outputs)."""
    device, backend = on
    cl = torch.channels_last
    x = _rand(8, c, 5, 3, seed=50).to(device).contiguous(memory_format=cl)
    up = _rand(8, c + 1, 5, 3, seed=51).to(device).contiguous(memory_format=cl)
    _check(on, lambda t, be: (K.minibatch_stddev(t, 4, 1, backend=be) * up.to(t.dtype)).sum(),
           [x])
    xg = x.detach().requires_grad_()
    y = K.minibatch_stddev(xg, 4, 1, backend=backend)
    (dx,) = torch.autograd.grad(y, xg, up)
    assert y.is_contiguous(memory_format=cl) and dx.is_contiguous(memory_format=cl)
    ops = torch.ops.mtcore
    torch.library.opcheck(ops.mbstd_fwd.default, (x, 4, 1))
    torch.library.opcheck(ops.mbstd_bwd.default, (up, x, 4, 1))


def test_minibatch_stddev_kernels_check_their_inputs(on):
    """Called directly, the C++ and CUDA kernels raise the same types: TypeError for a dtype,
    ValueError for a shape."""
    device, backend = on
    K.minibatch_stddev(_rand(4, 2, 3, 3).to(device), 2, 1, backend=backend)  # registers the ops
    x = _rand(4, 2, 3, 3).to(device)
    with pytest.raises(TypeError, match="grad_out has dtype Double but x has dtype Float"):
        torch.ops.mtcore.mbstd_bwd(_rand(4, 3, 3, 3, dtype=torch.float64).to(device), x, 2, 1)
    with pytest.raises(ValueError, match="N=4 .*divisible by the group size G=min"):
        torch.ops.mtcore.mbstd_fwd(x, 3, 1)


def test_joint_loss(on):
    g = torch.Generator().manual_seed(16)
    seg_t = torch.randint(0, 5, (3, 9, 11), generator=g)
    cls_t = torch.randint(0, 7, (3,), generator=g)
    image = torch.rand(3, 3, 9, 11, generator=g)

    def fn(seg, st, cls, ct, recon, img, mu, logvar, fake, w, be):
        out = K.joint_loss(seg, st, cls, ct, recon, img, mu, logvar, fake, w, "uncertainty",
                           beta=0.4, label_smoothing=0.1, backend=be)
        up = torch.arange(1.0, 5.0, device=w.device, dtype=w.dtype)
        return out.total + (out.terms * up).sum()
    _check(on, fn, [_rand(3, 5, 9, 11, seed=17), seg_t, _rand(3, 7, seed=18), cls_t,
                _rand(3, 3, 9, 11, seed=19), Const(image), _rand(3, 8, seed=20),
                _rand(3, 8, seed=21),
                _rand(3, 1, seed=22), _rand(4, seed=23)])


def test_mixed_precision_losses_keep_fp32_where_the_reference_does(on):
    """A bf16 decoder with fp32 mu/logvar keeps its KL (and mu/logvar gradients) in fp32, and the
    joint loss weighs its terms unrounded: both at fp32 accuracy against the reference on the
    same values (a KL or a term rounded to bf16 would be ~1e-3 off)."""
    device, backend = on
    g = torch.Generator().manual_seed(30)
    recon = _rand(3, 3, 9, 11, seed=31).to(device, torch.bfloat16)
    image = torch.rand(3, 3, 9, 11, generator=g).to(device, torch.bfloat16)
    mu, logvar = (_rand(3, 8, seed=s, scale=3.0).to(device).requires_grad_() for s in (32, 33))
    got = K.vae_loss(recon, image, mu, logvar, 0.7, "bernoulli", backend=backend)
    ref_in = [mu.detach().cpu().requires_grad_(), logvar.detach().cpu().requires_grad_()]
    want = K.vae_loss(recon.cpu(), image.cpu(), *ref_in, 0.7, "bernoulli", backend="reference")
    assert _rel(got.kl, want.kl) <= 1e-5
    g_got = torch.autograd.grad(got.kl.float(), (mu, logvar))
    for a, b in zip(g_got, torch.autograd.grad(want.kl.float(), ref_in), strict=True):
        assert a.dtype == torch.float32 and _rel(a, b) <= 1e-6

    seg = _rand(3, 5, 9, 11, seed=34, scale=2.0).to(device, torch.bfloat16)
    seg_t = torch.randint(0, 5, (3, 9, 11), generator=g).to(device)
    cls = _rand(3, 7, seed=35).to(device, torch.bfloat16)
    cls_t = torch.randint(0, 7, (3,), generator=g).to(device)
    fake = _rand(3, 1, seed=36).to(device, torch.bfloat16)
    w = _rand(4, seed=37).to(device)
    args = (seg, seg_t, cls, cls_t, recon, image, mu.detach(), logvar.detach(), fake, w)
    got = K.joint_loss(*args, "fixed", beta=0.7, backend=backend)
    # the math on the same (bf16-representable) values in fp32: the reference composes the
    # single losses, each of which returns in its input's dtype (rounding the terms to bf16)
    exact = [a.cpu().float() if a.is_floating_point() else a.cpu() for a in args]
    want = K.joint_loss(*exact, "fixed", beta=0.7, backend="reference")
    assert got.terms.dtype == torch.float32
    assert _rel(got.terms, want.terms) <= 1e-5
    assert _rel(got.total, want.total) <= 1e-5


def test_bad_input_is_a_clear_error(on):
    device, backend = on
    x = _rand(2, 3, 4, 4).to(device)
    with pytest.raises(ValueError, match="outside"):
        K.seg_cross_entropy(x, torch.full((2, 4, 4), 3, device=device), backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="shape"):
        K.bias_act(x, _rand(5).to(device), 1, "relu", backend=backend)


def test_opcheck(on):
    device, backend = on
    x = _rand(2, 3, 4, 5, seed=24).to(device)
    t = torch.randint(0, 3, (2, 4, 5), generator=torch.Generator().manual_seed(25)).to(device)
    K.seg_cross_entropy(x, t, backend=backend)  # registers the ops' fakes and autograd
    K.bias_act(x, None, 1, "lrelu", backend=backend)
    K.minibatch_stddev(_rand(4, 2, 3, 3).to(device), 2, 1, backend=backend)
    ops = torch.ops.mtcore
    torch.library.opcheck(ops.seg_ce_fwd.default, (x.requires_grad_(), t, None, -100, 0.1, 1, True))
    torch.library.opcheck(ops.bias_act.default, (x, _rand(3).to(device), 1, 3, 0.2, 1.0, 0.5))
    torch.library.opcheck(ops.mbstd_fwd.default, (_rand(4, 2, 3, 3).to(device), 2, 1))


def test_torch_compile_fullgraph_forward_and_backward(on):
    """The C++ autograd formulas (csrc/autograd) under dynamo + AOTAutograd: every first-order op
    in one graph, values and gradients equal to eager's. aot_eager: inductor would only add a build."""
    device, backend = on
    x = _rand(4, 3, 5, 6, seed=40).to(device).requires_grad_()
    b = _rand(3, seed=41).to(device).requires_grad_()
    recon = _rand(4, 3, 5, 6, seed=42).to(device).requires_grad_()
    image = torch.rand(4, 3, 5, 6, generator=torch.Generator().manual_seed(43)).to(device)
    mu, logvar = (_rand(4, 8, seed=s).to(device).requires_grad_() for s in (44, 45))
    t = torch.randint(0, 3, (4, 5, 6), generator=torch.Generator().manual_seed(46)).to(device)

    def f(x, b, recon, mu, logvar):
        h = K.bias_act(x, b, 1, "silu", clamp=2.0, backend=backend)
        d = K.minibatch_stddev(h, 2, 1, backend=backend)
        logits = d.mean((1, 2, 3))
        vae = K.vae_loss(recon, image, mu, logvar, 0.5, "bernoulli", backend=backend)
        return (K.seg_cross_entropy(h, t, label_smoothing=0.1, backend=backend)
                + K.adversarial_loss(logits, "hinge", "d_fake", backend=backend)
                + 0.3 * vae.total + vae.kl)

    leaves = (x, b, recon, mu, logvar)
    want = f(*leaves)
    g_want = torch.autograd.grad(3.0 * want, leaves)  # 3: not the stored-gradient shortcut
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves)
    g_got = torch.autograd.grad(3.0 * got, leaves)
    assert _rel(got, want) <= 1e-6
    for a, c in zip(g_got, g_want, strict=True):
        assert _rel(a, c) <= 1e-6


def test_backward_after_a_forward_without_gradient_is_an_error(on):
    """compute_grad=False stores no gradient: a backward through it must fail loudly, not return
    zeros."""
    device, _ = on
    x = _rand(2, 3, 4, seed=47).to(device).requires_grad_()
    t = torch.zeros(2, 4, dtype=torch.long, device=device)
    K.seg_cross_entropy(x.detach(), t, backend=on[1])  # registers the fakes
    K.adversarial_loss(x.detach(), backend=on[1])
    loss, _ = torch.ops.mtcore.seg_ce_fwd(x, t, None, -100, 0.0, 1, False)
    with pytest.raises(RuntimeError, match="compute_grad=False; cannot backward"):
        loss.backward()
    loss, _ = torch.ops.mtcore.adv_loss_fwd(x, 0, 2, False)
    with pytest.raises(RuntimeError, match="compute_grad=False; cannot backward"):
        loss.backward()

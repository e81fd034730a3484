"""The C++ loss kernels against the reference: values and gradients over shapes, layouts, dtypes
and edge cases; gradcheck in float64; torch.library.opcheck; input errors."""

from __future__ import annotations

import pytest
import torch

from mtcore.kernels import adversarial_loss, joint_loss, seg_cross_entropy, vae_loss
from mtcore.kernels.ops import adversarial as adv_mod
from mtcore.kernels.ops import joint_loss as joint_mod
from mtcore.kernels.ops import native_ready
from mtcore.kernels.ops import seg_cross_entropy as ce_mod
from mtcore.kernels.ops import vae_loss as vae_mod

pytestmark = pytest.mark.usefixtures("cpp_built")

# Expected agreement with the float64 reference: fp32 kernels accumulate in float (with a
# polynomial exp of ~2 ulp), bf16 inputs are read exactly but outputs are rounded to bf16 (8 bits).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest error relative to the expected tensor's largest magnitude. The floor is tiny, not
    1: gradients of mean losses are ~1e-3, and an all-zero one must fail."""
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _ce_case(shape, dtype, seed=0, scale=3.0, ignore_every=4):
    g = _gen(seed)
    x = (scale * torch.randn(shape, dtype=torch.float64, generator=g)).to(dtype)
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    if ignore_every:
        t.view(-1)[::ignore_every] = -100
    return x, t


def _ce_both(x, t, **kw):
    """(loss, grad) from the cpp backend and from the reference evaluated in float64."""
    xa = x.clone().requires_grad_()
    la = seg_cross_entropy(xa, t, backend="cpp", **kw)
    up = torch.randn(la.shape, dtype=torch.float64, generator=_gen(9))
    (ga,) = torch.autograd.grad(la, xa, up.to(la.dtype))
    xb = x.detach().double().requires_grad_()
    w = kw.pop("weight", None)
    lb = seg_cross_entropy(xb, t, None if w is None else w.double(), backend="reference", **kw)
    (gb,) = torch.autograd.grad(lb, xb, up)
    return la, ga, lb, gb


SHAPES = [(1, 1, 1, 1), (3, 7, 13, 17), (5, 19), (2, 4, 3, 5, 6), (2, 3, 130), (2, 21, 9, 70)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_seg_ce_matches_reference(shape, dtype, reduction):
    x, t = _ce_case(shape, dtype)
    la, ga, lb, gb = _ce_both(x, t, reduction=reduction)
    assert la.dtype == dtype and ga.dtype == dtype and la.shape == lb.shape
    assert _rel(la, lb) <= TOL[dtype]
    assert _rel(ga, gb) <= TOL[dtype]


@pytest.mark.parametrize("shape", [(3, 7, 13, 17), (6, 11)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
def test_seg_ce_weights_and_smoothing(shape, reduction, smoothing):
    x, t = _ce_case(shape, torch.float32, seed=1)
    w = torch.rand(shape[1], generator=_gen(2)) + 0.05
    la, ga, lb, gb = _ce_both(x, t, weight=w, label_smoothing=smoothing, reduction=reduction)
    assert _rel(la, lb) <= 2e-5 and _rel(ga, gb) <= 2e-5


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_seg_ce_non_contiguous(layout):
    x, t = _ce_case((2, 5, 8, 12), torch.float32, seed=3)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x, t = x.transpose(2, 3), t.transpose(1, 2)
    else:
        x, t = x[:, :, ::2], t[:, ::2]
    assert not x.is_contiguous()
    la, ga, lb, gb = _ce_both(x, t, label_smoothing=0.1)
    assert _rel(la, lb) <= 2e-5 and _rel(ga, gb) <= 2e-5


@pytest.mark.parametrize("scale", [1e4, 1e-6])
def test_seg_ce_extreme_logits(scale):
    x, t = _ce_case((2, 6, 5, 7), torch.float32, seed=4, scale=scale)
    la, ga, lb, gb = _ce_both(x, t, label_smoothing=0.1)
    assert torch.isfinite(la).all() and torch.isfinite(ga).all()
    assert _rel(la, lb) <= 2e-5 * max(1.0, scale / 1e2) and _rel(ga, gb) <= 2e-5


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_seg_ce_all_ignored_and_empty(reduction):
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    t = torch.full((2, 4, 5), -100, dtype=torch.long)
    loss = seg_cross_entropy(x, t, reduction=reduction, backend="cpp")
    assert torch.equal(loss, torch.zeros_like(loss))
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert torch.equal(g, torch.zeros_like(x))
    e = torch.randn(0, 3, 4, 5, requires_grad=True)
    le = seg_cross_entropy(e, torch.zeros(0, 4, 5, dtype=torch.long), reduction=reduction,
                           backend="cpp")
    assert le.shape == (() if reduction != "none" else (0, 4, 5)) and le.sum().item() == 0.0
    (ge,) = torch.autograd.grad(le.sum(), e)
    assert ge.shape == e.shape


def test_seg_ce_no_grad_path_same_value():
    x, t = _ce_case((2, 5, 6, 7), torch.float32, seed=5)
    with torch.no_grad():
        a = seg_cross_entropy(x, t, backend="cpp")
    b = seg_cross_entropy(x.requires_grad_(), t, backend="cpp")
    assert a.item() == b.item()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_seg_ce_gradcheck(reduction):
    x, t = _ce_case((2, 4, 3, 5), torch.float64, seed=6)
    x.requires_grad_()
    w = torch.rand(4, dtype=torch.float64, generator=_gen(7)) + 0.1
    fn = lambda z: seg_cross_entropy(z, t, w, -100, 0.2, reduction, backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    x2, t2 = _ce_case((5, 7), torch.float64, seed=8)
    fn2 = lambda z: seg_cross_entropy(z, t2, reduction=reduction, backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn2, (x2.requires_grad_(),))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_seg_ce_negative_class_weights(backend):
    """The mean divides by sum(w[y]) as F.cross_entropy does, also when that sum is negative
    (it returned 0: the guard was `denom > 0` instead of `!= 0`)."""
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=_gen(30), requires_grad=True)
    t = torch.tensor([[0, 1, 2, 1, 1], [1, 1, 0, 2, 1], [2, 1, 1, 1, 0], [1, 0, 1, 2, 1]])
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    want = torch.nn.functional.cross_entropy(x, t, weight=w)
    got = seg_cross_entropy(x, t, w, backend=backend)
    assert float((w[t]).sum()) < 0
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


def test_seg_ce_weight_asking_for_a_gradient():
    """The fused op gives class weights no gradient: asking for one is a clear error up front
    (the cpp op raised "compute_grad=False" at the backward, or silently gave none); the
    reference differentiates them (F.cross_entropy cannot)."""
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=_gen(31))
    t = torch.randint(0, 4, (3, 5), generator=_gen(33))
    w = (torch.rand(4, dtype=torch.float64, generator=_gen(32)) + 0.5).requires_grad_()
    with pytest.raises(ValueError, match=r"weight gets no gradient .*weight.detach\(\).*shape \(4,\)"):
        seg_cross_entropy(x, t, w, backend="cpp")
    with pytest.raises(ValueError, match="weight gets no gradient"):
        seg_cross_entropy(x.requires_grad_(), t, w, backend="cpp")
    assert seg_cross_entropy(x, t, w.detach(), backend="cpp").requires_grad
    with torch.no_grad():
        seg_cross_entropy(x, t, w, backend="cpp")  # no gradient asked for
    (g,) = torch.autograd.grad(seg_cross_entropy(x, t, w, backend="reference"), w)
    nll = -torch.log_softmax(x.detach(), 1).gather(1, t.unsqueeze(1)).squeeze(1)  # [N, *]
    (want,) = torch.autograd.grad((w[t] * nll).sum() / w[t].sum(), w)  # F.cross_entropy's mean
    torch.testing.assert_close(g, want)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_ignore_index_must_be_an_int(backend):
    """A float was truncated by the cpp wrapper (1.5 -> 1) and ignored nothing on the reference."""
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    for bad in (1.5, True, "1"):
        with pytest.raises(TypeError, match="ignore_index must be an int"):
            seg_cross_entropy(x, t, ignore_index=bad, backend=backend)
    assert seg_cross_entropy(x, t, ignore_index=torch.tensor(1).item(), backend=backend) > 0


# ----------------------------------------------------------------------------- VAE


def _vae_case(dtype, shape=(3, 2, 5, 7), z=6, seed=10):
    g = _gen(seed)
    recon = torch.randn(shape, dtype=torch.float64, generator=g).to(dtype)
    target = torch.rand(shape, dtype=torch.float64, generator=g).to(dtype)
    mu = torch.randn(shape[0], z, dtype=torch.float64, generator=g).to(dtype)
    logvar = torch.randn(shape[0], z, dtype=torch.float64, generator=g).to(dtype)
    return recon, target, mu, logvar


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", ["mse", "bernoulli"])
def test_vae_matches_reference(dtype, kind):
    r, t, m, lv = _vae_case(dtype, shape=(3, 2, 33, 35))
    ins = [a.clone().requires_grad_() for a in (r, m, lv)]
    out = vae_loss(ins[0], t, ins[1], ins[2], beta=0.7, recon_kind=kind, backend="cpp")
    refs = [a.double().requires_grad_() for a in (r, m, lv)]
    want = vae_loss(refs[0], t.double(), refs[1], refs[2], 0.7, kind, backend="reference")
    for a, b in zip(out, want, strict=True):
        assert a.dtype == dtype and _rel(a, b) <= TOL[dtype]
    ups = (0.3, -1.2, 0.8)  # weights on rec, kl, total: checks every incoming gradient is used
    ga = torch.autograd.grad(sum(u * o for u, o in zip(ups, out, strict=True)), ins)
    gb = torch.autograd.grad(sum(u * o for u, o in zip(ups, want, strict=True)), refs)
    for a, b in zip(ga, gb, strict=True):
        assert _rel(a, b) <= TOL[dtype]


@pytest.mark.parametrize("kind", ["mse", "bernoulli"])
def test_vae_gradcheck(kind):
    r, t, m, lv = _vae_case(torch.float64, shape=(2, 3, 4))
    ins = tuple(a.requires_grad_() for a in (r, m, lv))

    def fn(a, b, c):
        return tuple(vae_loss(a, t, b, c, 0.5, kind, backend="cpp"))

    assert torch.autograd.gradcheck(fn, ins)


def test_vae_empty_batch_is_zero():
    out = vae_loss(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 2), torch.zeros(0, 2),
                   backend="cpp")
    assert all(v.item() == 0.0 for v in out)


# ----------------------------------------------------------------------------- adversarial

KINDS = ["non_saturating", "hinge", "least_squares"]
ROLES = ["d_real", "d_fake", "g"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adversarial_matches_reference(kind, role, dtype):
    x = (3 * torch.randn(4, 1, 37, 29, dtype=torch.float64, generator=_gen(11))).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.double().requires_grad_()
    la = adversarial_loss(xa, kind, role, backend="cpp")
    lb = adversarial_loss(xb, kind, role, backend="reference")
    assert la.dtype == dtype and _rel(la, lb) <= TOL[dtype]
    (ga,) = torch.autograd.grad(la, xa)
    (gb,) = torch.autograd.grad(lb, xb)
    assert _rel(ga * x.numel(), gb * x.numel()) <= TOL[dtype]  # per-element gradients


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("role", ROLES)
def test_adversarial_gradcheck(kind, role):
    x = torch.tensor([-2.3, -0.4, 0.3, 0.7, 1.6, 2.9], dtype=torch.float64)  # away from hinge kinks
    fn = lambda z: adversarial_loss(z, kind, role, backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(),))


def test_adversarial_large_logits_finite():
    x = torch.tensor([-1e4, 1e4, 0.0], requires_grad=True)
    loss = adversarial_loss(x, "non_saturating", "d_real", backend="cpp")
    assert loss.item() == pytest.approx((1e4 + 0.0 + torch.log(torch.tensor(2.0)).item()) / 3)
    (g,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g, torch.tensor([-1.0, 0.0, -0.5]) / 3)


# ----------------------------------------------------------------------------- joint loss


def _joint_inputs(dtype=torch.float32, seed=12, n=3):
    g = _gen(seed)

    def r(*s):
        return torch.randn(*s, dtype=torch.float64, generator=g).to(dtype)

    a = {
        "seg_logits": 2 * r(n, 5, 9, 11),
        "seg_target": torch.randint(0, 5, (n, 9, 11), generator=g),
        "cls_logits": r(n, 7),
        "cls_target": torch.randint(0, 7, (n,), generator=g),
        "recon": r(n, 3, 9, 11),
        "image": torch.rand(n, 3, 9, 11, dtype=torch.float64, generator=g).to(dtype),
        "mu": r(n, 8),
        "logvar": r(n, 8),
        "fake_logits": r(n, 1),
        "weights": torch.rand(4, dtype=torch.float64, generator=g).to(dtype) + 0.2,
    }
    a["seg_target"][0, :3] = -100
    return a


GRAD_KEYS = ["seg_logits", "cls_logits", "recon", "mu", "logvar", "fake_logits", "weights"]


@pytest.mark.parametrize("mode", ["fixed", "uncertainty"])
@pytest.mark.parametrize("recon_kind,adv_kind", [("mse", "non_saturating"), ("bernoulli", "hinge"),
                                                 ("mse", "least_squares")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_joint_matches_reference(mode, recon_kind, adv_kind, dtype):
    a = _joint_inputs(dtype)
    kw = dict(beta=0.4, label_smoothing=0.1, recon_kind=recon_kind, adv_kind=adv_kind)
    ins_a = {k: (v.clone().requires_grad_() if k in GRAD_KEYS else v) for k, v in a.items()}
    ins_b = {k: (v.double().requires_grad_() if k in GRAD_KEYS else v) for k, v in a.items()}
    ins_b["image"] = a["image"].double()
    oa = joint_loss(*ins_a.values(), mode, backend="cpp", **kw)
    ob = joint_loss(*ins_b.values(), mode, backend="reference", **kw)
    assert _rel(oa.terms, ob.terms) <= TOL[dtype] and _rel(oa.total, ob.total) <= TOL[dtype]
    # gradients of the total plus a gradient reaching the terms directly
    up = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    ga = torch.autograd.grad(oa.total + (oa.terms * up.to(dtype)).sum(),
                             [ins_a[k] for k in GRAD_KEYS])
    gb = torch.autograd.grad(ob.total + (ob.terms * up).sum(), [ins_b[k] for k in GRAD_KEYS])
    for k, x, y in zip(GRAD_KEYS, ga, gb, strict=True):
        assert _rel(x, y) <= TOL[dtype], k


@pytest.mark.parametrize("mode", ["fixed", "uncertainty"])
def test_joint_gradcheck(mode):
    a = _joint_inputs(torch.float64, n=2)
    a["seg_logits"] = a["seg_logits"][:, :, :3, :4]
    a["seg_target"] = a["seg_target"][:, :3, :4]
    a["recon"], a["image"] = a["recon"][:, :, :2, :2], a["image"][:, :, :2, :2]
    keys = list(a)

    def fn(*grads):
        kwargs = dict(a)
        kwargs.update(zip(GRAD_KEYS, grads, strict=True))
        out = joint_loss(*(kwargs[k] for k in keys), mode, label_smoothing=0.1, backend="cpp")
        return out.terms, out.total

    ins = tuple(a[k].clone().requires_grad_() for k in GRAD_KEYS)
    assert torch.autograd.gradcheck(fn, ins)


# ----------------------------------------------------------------------------- opcheck


def _ready_all():
    for key, mod in (("seg_ce_fwd", ce_mod), ("vae_loss_fwd", vae_mod), ("adv_loss_fwd", adv_mod),
                     ("joint_loss_fwd", joint_mod)):
        native_ready(key, mod._register)
    return torch.ops.mtcore


@pytest.mark.parametrize("reduction,weighted,grad", [(0, True, True), (1, False, True),
                                                     (2, True, False)])
def test_opcheck_seg_ce(reduction, weighted, grad):
    ops = _ready_all()
    x, t = _ce_case((2, 3, 4, 5), torch.float32, seed=13)
    w = torch.rand(3) if weighted else None
    torch.library.opcheck(ops.seg_ce_fwd, (x.requires_grad_(grad), t, w, -100, 0.1, reduction, grad))


def test_opcheck_vae_adv_joint():
    ops = _ready_all()
    r, tg, m, lv = _vae_case(torch.float32)
    torch.library.opcheck(ops.vae_loss_fwd, (r.requires_grad_(), tg, m.requires_grad_(),
                                             lv.requires_grad_(), 0.5, 1, True))
    torch.library.opcheck(ops.adv_loss_fwd, (torch.randn(4, 3, requires_grad=True), 1, 2, True))
    a = _joint_inputs()
    args = [v.requires_grad_() if k in GRAD_KEYS else v for k, v in a.items()]
    torch.library.opcheck(ops.joint_loss_fwd, (*args, 1, 0.5, 0.1, -100, 0, 0, True))


# ----------------------------------------------------------------------------- errors


def test_kernel_target_out_of_range_raises_value_error():
    x = torch.randn(2, 3, 4)
    t = torch.tensor([[0, 1, 2, 5], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"class index 5, outside \[0, 3\)"):
        seg_cross_entropy(x, t, backend="cpp")
    with pytest.raises(ValueError, match="class index -1"):
        seg_cross_entropy(x, t.clamp(max=2) - 1, backend="cpp")
    native_ready("seg_ce_fwd", ce_mod._register)
    with pytest.raises(ValueError, match="class index 5"):  # the raw op checks too
        torch.ops.mtcore.seg_ce_fwd(x, t, None, -100, 0.0, 1, False)


def test_kernel_raw_op_checks_metadata():
    native_ready("seg_ce_fwd", ce_mod._register)
    native_ready("adv_loss_fwd", adv_mod._register)
    ops = torch.ops.mtcore
    with pytest.raises(TypeError, match="target must be int64"):
        ops.seg_ce_fwd(torch.randn(2, 3), torch.zeros(2), None, -100, 0.0, 1, False)
    with pytest.raises(ValueError, match="does not match logits shape"):
        ops.seg_ce_fwd(torch.randn(2, 3, 4), torch.zeros(2, 5).long(), None, -100, 0.0, 1, False)
    with pytest.raises(ValueError, match="reduction must be"):
        ops.seg_ce_fwd(torch.randn(2, 3), torch.zeros(2).long(), None, -100, 0.0, 7, False)
    with pytest.raises(TypeError, match="logits must be float32"):
        ops.adv_loss_fwd(torch.zeros(3, dtype=torch.long), 0, 2, False)
    with pytest.raises(ValueError, match="role must be"):
        ops.adv_loss_fwd(torch.zeros(3), 0, 5, False)


# ----------------------------------------------------------------------------- unused outputs


@pytest.mark.parametrize("which", ["total", "terms"])
def test_joint_gradient_through_one_output_only(which):
    """Autograd passes None for an unused output (no zero fill); both ways must stay exact."""
    a = _joint_inputs(torch.float64)
    outs = []
    for backend in ("cpp", "reference"):
        ins = {k: (v.clone().requires_grad_() if k in GRAD_KEYS else v) for k, v in a.items()}
        o = joint_loss(*ins.values(), "uncertainty", backend=backend, beta=0.4)
        y = o.total if which == "total" else o.terms[2]
        outs.append(torch.autograd.grad(y, [ins[k] for k in GRAD_KEYS], allow_unused=True,
                                        materialize_grads=True))
    for k, x, y in zip(GRAD_KEYS, *outs, strict=True):
        assert _rel(x, y) <= 1e-10, k


def test_vae_gradient_through_one_term_only():
    g = _gen(4)
    recon, image = torch.randn(2, 3, 4, 4, generator=g), torch.rand(2, 3, 4, 4, generator=g)
    mu, logvar = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    grads = []
    for backend in ("cpp", "reference"):
        ins = [t.clone().requires_grad_() for t in (recon, mu, logvar)]
        out = vae_loss(ins[0], image, ins[1], ins[2], beta=0.3, recon_kind="bernoulli",
                       backend=backend)
        grads.append(torch.autograd.grad(out.kl, ins, allow_unused=True, materialize_grads=True))
    for x, y in zip(*grads, strict=True):
        torch.testing.assert_close(x, y)


def _big_allocations(fn, nbytes: int) -> list[int]:
    """Sizes of the CPU allocations of at least ``nbytes`` that ``fn()`` makes (profiler)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.alloc_size >= nbytes:
            sizes.append(e.extra_fields.alloc_size)
    return sizes


def test_seg_ce_fwd_bwd_allocates_the_logits_gradient_once():
    """The fused op writes d(loss)/d(logits) in the forward and hands that buffer back: one
    logits-sized allocation in all (eager keeps log-softmax and makes the gradient: two)."""
    x = torch.randn(4, 6, 32, 32, requires_grad=True)
    t = torch.randint(0, 6, (4, 32, 32))

    def run(backend):
        return lambda: torch.autograd.grad(seg_cross_entropy(x, t, backend=backend), x)

    assert _big_allocations(run("cpp"), x.numel() * 4) == [x.numel() * 4]
    assert len(_big_allocations(run("reference"), x.numel() * 4)) >= 2


@pytest.mark.parametrize("op", ["seg_ce", "adversarial", "joint"])
def test_fp16_gradients_keep_their_precision(op):
    """The fused gradient is stored pre-scaled by 1/#elements; in fp16 that scale would push it into
    the subnormals (or to 0) before a loss-scaling factor lifts it. fp16 inputs run in fp32."""
    g = _gen(31)
    if op == "seg_ce":
        x = 2 * torch.randn(2, 3, 128, 128, generator=g)  # 32768 targets: grads ~ p / 32768
        t = torch.randint(0, 3, (2, 128, 128), generator=g)
        fn = lambda z, be: seg_cross_entropy(z, t, backend=be)  # noqa: E731
    elif op == "adversarial":
        x = 2 * torch.randn(40000, generator=g)
        fn = lambda z, be: adversarial_loss(z, "non_saturating", "d_real", backend=be)  # noqa: E731
    else:  # the segmentation logits of the joint loss, the other inputs fp32
        x = 2 * torch.randn(2, 3, 128, 128, generator=g)
        a = _joint_inputs(torch.float32, n=2)
        t = torch.randint(0, 3, (2, 128, 128), generator=g)

        def fn(z, be):
            rest = {k: (v.to(z.dtype) if v.is_floating_point() else v) for k, v in a.items()
                    if k not in ("seg_logits", "seg_target", "weights")}
            out = joint_loss(z, t, rest["cls_logits"], rest["cls_target"], rest["recon"],
                             rest["image"], rest["mu"], rest["logvar"], rest["fake_logits"],
                             a["weights"].to(z.dtype),
                             backend=be)
            return out.total
    xh = x.half().requires_grad_()
    loss = fn(xh, "cpp")
    assert loss.dtype == torch.float16
    (gh,) = torch.autograd.grad(loss, xh, torch.tensor(1024.0, dtype=torch.float16))  # a GradScaler
    xd = x.half().double().requires_grad_()
    (gd,) = torch.autograd.grad(fn(xd, "reference") * 1024, xd)
    assert gh.dtype == torch.float16
    normal = gd.abs() > 1e-4  # fp16 normals (>= 6.1e-5): rounding alone costs <= 2^-11
    rel = ((gh.double() - gd).abs() / gd.abs())[normal]
    assert normal.float().mean() > 0.5 and float(rel.max()) < 1e-3
    assert not bool(((gh == 0) & (gd.abs() > 1e-6)).any())


def test_integer_targets_of_any_width():
    """int32 / uint8 masks (as image loaders give) work as on the reference, not only int64."""
    x, t = _ce_case((2, 5, 6, 7), torch.float32, seed=40, ignore_every=0)
    t[0, 0, :3] = 255
    want = seg_cross_entropy(x, t, ignore_index=255, backend="reference")
    for dtype in (torch.int32, torch.uint8):
        got = seg_cross_entropy(x, t.to(dtype), ignore_index=255, backend="cpp")
        assert _rel(got, want) <= 2e-5, dtype
    a = _joint_inputs()
    ref_out = joint_loss(*a.values(), backend="reference")
    a["seg_target"], a["cls_target"] = a["seg_target"].int(), a["cls_target"].to(torch.uint8)
    got = joint_loss(*a.values(), backend="cpp")
    assert _rel(got.terms, ref_out.terms) <= 2e-5

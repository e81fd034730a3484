"""The reference loss ops against independent oracles: torch.nn.functional, torch.distributions
and hand-computed values. The other backends are then tested against this reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from mtcore.kernels.reference import losses as ref

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(4, 5, 7, 9), (6, 10), (2, 3, 4, 5, 6), (3, 1, 4)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted,smoothing", [(False, 0.0), (True, 0.0), (False, 0.2), (True, 0.1)])
def test_seg_ce_matches_torch(shape, reduction, weighted, smoothing):
    g = _gen(0)
    x = (3 * torch.randn(shape, dtype=DT, generator=g)).requires_grad_()
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    t.view(-1)[::3] = -100  # some ignored targets
    w = torch.rand(shape[1], dtype=DT, generator=g) + 0.1 if weighted else None
    ours = ref.seg_cross_entropy(x, t, w, -100, smoothing, reduction)
    theirs = F.cross_entropy(x, t, w, ignore_index=-100, reduction=reduction,
                             label_smoothing=smoothing)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    up = torch.randn(ours.shape, dtype=DT, generator=g)
    (ga,) = torch.autograd.grad(ours, x, up)
    (gb,) = torch.autograd.grad(theirs, x, up)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)


def test_seg_ce_hand_value():
    # two classes, logits (0, log 3): p = (1/4, 3/4); target 1 -> -log(3/4)
    x = torch.tensor([[0.0, math.log(3.0)]], dtype=DT)
    assert ref.seg_cross_entropy(x, torch.tensor([1])).item() == pytest.approx(-math.log(0.75))
    # label smoothing 0.5 over C = 2: 0.5 * -log(3/4) + 0.25 * (-log(1/4) - log(3/4))
    want = 0.5 * -math.log(0.75) + 0.25 * (-math.log(0.25) - math.log(0.75))
    got = ref.seg_cross_entropy(x, torch.tensor([1]), label_smoothing=0.5).item()
    assert got == pytest.approx(want)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_seg_ce_all_ignored_is_zero_not_nan(reduction):
    x = torch.randn(2, 3, 4, 4, dtype=DT, requires_grad=True)
    t = torch.full((2, 4, 4), 7, dtype=torch.long)
    loss = ref.seg_cross_entropy(x, t, ignore_index=7, reduction=reduction)
    assert loss.item() == 0.0
    (gx,) = torch.autograd.grad(loss, x)
    assert torch.equal(gx, torch.zeros_like(x))
    if reduction == "mean":  # the documented difference from torch
        assert torch.isnan(F.cross_entropy(x, t, ignore_index=7))


def test_seg_ce_empty_batch():
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    t = torch.zeros(0, 3, 3, dtype=torch.long)
    assert ref.seg_cross_entropy(x, t).item() == 0.0
    assert ref.seg_cross_entropy(x, t, reduction="none").shape == (0, 3, 3)


def test_seg_ce_bf16_is_computed_in_float32():
    x = torch.randn(2, 6, 5, 5, generator=_gen(1)).bfloat16()
    t = torch.randint(0, 6, (2, 5, 5), generator=_gen(2))
    out = ref.seg_cross_entropy(x, t)
    assert out.dtype == torch.bfloat16
    want = F.cross_entropy(x.float(), t)
    assert abs(out.float().item() - want.item()) <= 2 ** -8 * abs(want.item())


@pytest.mark.parametrize("kind", ["mse", "bernoulli"])
def test_vae_matches_torch(kind):
    g = _gen(3)
    recon = torch.randn(5, 3, 4, 4, dtype=DT, generator=g)
    target = torch.rand(5, 3, 4, 4, dtype=DT, generator=g)
    mu = torch.randn(5, 8, dtype=DT, generator=g)
    logvar = torch.randn(5, 8, dtype=DT, generator=g)
    out = ref.vae_loss(recon, target, mu, logvar, beta=0.3, recon_kind=kind)
    if kind == "mse":
        rec = F.mse_loss(recon, target, reduction="sum") / 5
    else:
        rec = F.binary_cross_entropy_with_logits(recon, target, reduction="sum") / 5
    kl = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum() / 5
    torch.testing.assert_close(out.rec, rec)
    torch.testing.assert_close(out.kl, kl)
    torch.testing.assert_close(out.total, rec + 0.3 * kl)


def test_vae_bernoulli_is_stable_for_large_logits():
    recon = torch.tensor([[1e4, -1e4]], dtype=torch.float32)
    target = torch.tensor([[1.0, 0.0]])
    out = ref.vae_loss(recon, target, torch.zeros(1, 2), torch.zeros(1, 2), recon_kind="bernoulli")
    assert out.rec.item() == 0.0 and out.kl.item() == 0.0


@pytest.mark.parametrize(
    "kind,role,oracle",
    [
        ("non_saturating", "d_real", lambda x: F.binary_cross_entropy_with_logits(x, torch.ones_like(x))),
        ("non_saturating", "d_fake", lambda x: F.binary_cross_entropy_with_logits(x, torch.zeros_like(x))),
        ("non_saturating", "g", lambda x: F.binary_cross_entropy_with_logits(x, torch.ones_like(x))),
        ("hinge", "d_real", lambda x: torch.clamp(1 - x, min=0).mean()),
        ("hinge", "d_fake", lambda x: torch.clamp(1 + x, min=0).mean()),
        ("hinge", "g", lambda x: -x.mean()),
        ("least_squares", "d_real", lambda x: F.mse_loss(x, torch.ones_like(x))),
        ("least_squares", "d_fake", lambda x: F.mse_loss(x, torch.zeros_like(x))),
        ("least_squares", "g", lambda x: F.mse_loss(x, torch.ones_like(x))),
    ],
)
def test_adversarial_matches_torch(kind, role, oracle):
    x = 2 * torch.randn(7, 1, 3, 3, dtype=DT, generator=_gen(4))
    torch.testing.assert_close(ref.adversarial_loss(x, kind, role), oracle(x))


def test_adversarial_hand_values():
    x = torch.tensor([-2.0, 0.5, 3.0])
    assert ref.adversarial_loss(x, "hinge", "d_real").item() == pytest.approx((3.0 + 0.5 + 0.0) / 3)
    assert ref.adversarial_loss(x, "least_squares", "d_fake").item() == pytest.approx(
        (4 + 0.25 + 9) / 3
    )


def _joint_inputs(seed: int = 5):
    g = _gen(seed)
    t = {
        "seg_logits": torch.randn(2, 4, 5, 6, dtype=DT, generator=g),
        "seg_target": torch.randint(0, 4, (2, 5, 6), generator=g),
        "cls_logits": torch.randn(2, 3, dtype=DT, generator=g),
        "cls_target": torch.randint(0, 3, (2,), generator=g),
        "recon": torch.randn(2, 3, 5, 6, dtype=DT, generator=g),
        "image": torch.rand(2, 3, 5, 6, dtype=DT, generator=g),
        "mu": torch.randn(2, 7, dtype=DT, generator=g),
        "logvar": torch.randn(2, 7, dtype=DT, generator=g),
        "fake_logits": torch.randn(2, 1, dtype=DT, generator=g),
        "weights": torch.rand(4, dtype=DT, generator=g),
    }
    t["seg_target"][0, 0] = -100
    return t


@pytest.mark.parametrize("mode", ["fixed", "uncertainty"])
def test_joint_matches_composition(mode):
    a = _joint_inputs()
    w = a["weights"].clone().requires_grad_()
    out = ref.joint_loss(*a.values(), mode, beta=0.5, label_smoothing=0.1)
    seg = F.cross_entropy(a["seg_logits"], a["seg_target"])
    cls = F.cross_entropy(a["cls_logits"], a["cls_target"], label_smoothing=0.1)
    rec = F.mse_loss(a["recon"], a["image"], reduction="sum") / 2
    kl = -0.5 * (1 + a["logvar"] - a["mu"] ** 2 - a["logvar"].exp()).sum() / 2
    gan = F.softplus(-a["fake_logits"]).mean()
    terms = torch.stack([seg, cls, rec + 0.5 * kl, gan])
    torch.testing.assert_close(out.terms, terms)
    out = ref.joint_loss(*list(a.values())[:-1], w, mode, beta=0.5, label_smoothing=0.1)
    (gw,) = torch.autograd.grad(out.total, w)
    if mode == "fixed":
        torch.testing.assert_close(out.total, (a["weights"] * terms).sum())
        torch.testing.assert_close(gw, terms)  # d total / d w_k = L_k
    else:
        s = a["weights"]
        torch.testing.assert_close(out.total, (torch.exp(-s) * terms + s).sum())
        torch.testing.assert_close(gw, 1 - torch.exp(-s) * terms)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: ref.seg_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, 4)), TypeError, "target"),
        (lambda: ref.seg_cross_entropy(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2).long()),
         TypeError, "logits"),
        (lambda: ref.seg_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, 5).long()), ValueError,
         r"target must have shape \(2, 4\)"),
        (lambda: ref.seg_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 3])), ValueError,
         "class index 3"),
        (lambda: ref.seg_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), reduction="avg"),
         ValueError, "reduction"),
        (lambda: ref.vae_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 1),
                              torch.zeros(2, 1)), ValueError, "recon and target"),
        (lambda: ref.adversarial_loss(torch.zeros(3), "wasserstein"), ValueError, "kind"),
    ],
)
def test_reference_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()

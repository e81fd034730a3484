"""Tests of the task loss components against hand computations, torch.nn.functional and the papers."""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F


def _kernel_shim() -> None:
    """Until mtcore.kernels imports, stand in its reference loss ops (loaded by file path)."""
    try:
        import mtcore.kernels  # noqa: F401
    except ImportError:
        ref = Path(__file__).resolve().parents[2] / "mtcore" / "kernels" / "reference" / "losses.py"
        spec = importlib.util.spec_from_file_location("_mtcore_reference_losses", ref)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        shim = types.ModuleType("mtcore.kernels")
        for name in ("seg_cross_entropy", "vae_loss", "adversarial_loss", "VAELossTerms"):
            setattr(shim, name, getattr(mod, name))
        sys.modules["mtcore.kernels"] = shim


_kernel_shim()

from mtcore_tasks import losses  # noqa: E402
from mtcore_tasks.losses import (  # noqa: E402
    AdversarialLoss,
    ClsCrossEntropy,
    DiceLoss,
    FocalLoss,
    SegCrossEntropy,
    VAELoss,
    VAELossOutput,
    r1_penalty,
)

LN2 = math.log(2.0)


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    """Run the kernel ops on their reference backend: these tests check the loss components, the
    kernel tests check every backend against the reference (and the C++ build can take minutes)."""
    monkeypatch.setenv("MTCORE_KERNELS", "reference")


def _seg_batch(n=2, c=4, h=5, w=6, seed=0, ignore=255):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    mask = torch.randint(0, c, (n, h, w), generator=g)
    mask[0, 0, :3] = ignore
    return logits, mask


# ----------------------------------------------------------------------------- SegCrossEntropy


def test_seg_ce_hand_computed():
    # one image, 1x2 pixels, 2 classes. pixel 0 logits [0, ln 3] -> p = [1/4, 3/4], target 1
    # -> -ln(3/4); pixel 1 logits [0, 0] -> p = [1/2, 1/2], target 0 -> ln 2. Mean of the two.
    logits = torch.tensor([[[[0.0, 0.0]], [[math.log(3.0), 0.0]]]], dtype=torch.float64)
    mask = torch.tensor([[[1, 0]]])
    loss = SegCrossEntropy()(logits, mask)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx((math.log(4 / 3) + LN2) / 2, rel=1e-12)
    # the second pixel ignored: only -ln(3/4) is left
    mask_ign = torch.tensor([[[1, 255]]])
    assert SegCrossEntropy()(logits, mask_ign).item() == pytest.approx(math.log(4 / 3), rel=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5, 3.0]])
def test_seg_ce_matches_torch(smoothing, weights):
    logits, mask = _seg_batch()
    loss_fn = SegCrossEntropy(ignore_index=255, class_weights=weights, label_smoothing=smoothing)
    x = logits.clone().requires_grad_()
    got = loss_fn(x, mask)
    got.backward()
    xr = logits.clone().requires_grad_()
    w = None if weights is None else torch.tensor(weights, dtype=torch.float64)
    ref = F.cross_entropy(xr, mask, weight=w, ignore_index=255, label_smoothing=smoothing)
    ref.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(x.grad, xr.grad)


def test_seg_ce_all_ignored_is_zero_not_nan():
    logits, mask = _seg_batch()
    x = logits.requires_grad_()
    loss = SegCrossEntropy()(x, torch.full_like(mask, 255))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_seg_ce_goes_through_the_kernel(monkeypatch):
    calls = []
    real = losses.kernels.seg_cross_entropy

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(losses.kernels, "seg_cross_entropy", spy)
    logits, mask = _seg_batch()
    SegCrossEntropy(label_smoothing=0.1)(logits, mask)
    ClsCrossEntropy()(logits[:, :, 1, 1], mask[:, 1, 1])
    assert len(calls) == 2


def test_seg_ce_errors():
    logits, mask = _seg_batch(c=4)
    with pytest.raises(ValueError, match=r"class_weights has 3 entries but logits has 4 classes"):
        SegCrossEntropy(class_weights=[1.0, 1.0, 1.0])(logits, mask)
    with pytest.raises(ValueError, match=r"class_weights must be finite and >= 0"):
        SegCrossEntropy(class_weights=[1.0, -1.0])
    with pytest.raises(
        ValueError, match=r"mask must be \[N, H, W\] = \(2, 5, 6\).*shape \(2, 5, 7\)"
    ):
        SegCrossEntropy()(logits, torch.zeros(2, 5, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits must be \[N, C, H, W\], got shape \(2, 4, 5\)"):
        SegCrossEntropy()(logits[..., 0], mask[..., 0])
    with pytest.raises(TypeError, match=r"mask must hold integer class indices.*torch.float32"):
        SegCrossEntropy()(logits, mask.float())
    with pytest.raises(TypeError, match=r"logits must be a floating-point tensor"):
        SegCrossEntropy()(mask.unsqueeze(1), mask)
    bad = mask.clone()
    bad[1, 2, 2] = 7
    with pytest.raises(ValueError, match=r"mask holds class index 7, outside \[0, 4\)"):
        SegCrossEntropy()(logits, bad)
    with pytest.raises(ValueError, match=r"label_smoothing"):
        SegCrossEntropy(label_smoothing=1.5)


# ----------------------------------------------------------------------------- DiceLoss


def _dice_case():
    # 1 image, 1x2 pixels, 2 classes. pixel 0 logits [ln 3, 0] -> p = [3/4, 1/4];
    # pixel 1 logits [0, 0] -> p = [1/2, 1/2]; mask [0, 1].
    logits = torch.tensor([[[[math.log(3.0), 0.0]], [[0.0, 0.0]]]], dtype=torch.float64)
    return logits, torch.tensor([[[0, 1]]])


def test_dice_hand_computed():
    logits, mask = _dice_case()
    # smooth 0. class 0: inter = 3/4, denom = (3/4 + 1/2) + 1 = 9/4 -> dice = 1.5 / 2.25 = 2/3
    #           class 1: inter = 1/2, denom = (1/4 + 1/2) + 1 = 7/4 -> dice = 1 / 1.75 = 4/7
    # loss = 1 - (2/3 + 4/7) / 2 = 8/21; without background: 1 - 4/7 = 3/7
    assert DiceLoss(smooth=0.0)(logits, mask).item() == pytest.approx(8 / 21, rel=1e-12)
    got = DiceLoss(smooth=0.0, exclude_background=True)(logits, mask).item()
    assert got == pytest.approx(3 / 7, rel=1e-12)
    # smooth 1: class 0 (1.5 + 1) / (2.25 + 1) = 10/13, class 1 (1 + 1) / (1.75 + 1) = 8/11
    expected = 1 - (10 / 13 + 8 / 11) / 2
    assert DiceLoss(smooth=1.0)(logits, mask).item() == pytest.approx(expected, rel=1e-12)
    # pixel 1 ignored: only class 0 present; inter 3/4, denom 3/4 + 1 -> dice 1.5 / 1.75 = 6/7
    ign = torch.tensor([[[0, 255]]])
    assert DiceLoss(smooth=0.0)(logits, ign).item() == pytest.approx(1 / 7, rel=1e-12)


def test_dice_perfect_prediction_is_zero_and_wrong_is_large():
    _, mask = _seg_batch(c=3)
    valid = mask != 255
    onehot = F.one_hot(torch.where(valid, mask, 0), 3).permute(0, 3, 1, 2).double()
    perfect = DiceLoss()(50.0 * onehot, mask)
    assert perfect.item() == pytest.approx(0.0, abs=1e-12)
    wrong = DiceLoss()(-50.0 * onehot, mask)
    assert wrong.item() > 0.9


def test_dice_gradient_and_all_ignored():
    logits, mask = _seg_batch()
    x = logits.clone().requires_grad_()
    loss = DiceLoss()(x, mask)
    loss.backward()
    assert 0.0 < loss.item() < 1.0
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # ignored pixels get no gradient
    assert torch.equal(x.grad[0, :, 0, :3], torch.zeros_like(x.grad[0, :, 0, :3]))
    x2 = logits.clone().requires_grad_()
    zero = DiceLoss()(x2, torch.full_like(mask, 255))
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(x2.grad, torch.zeros_like(x2))


def test_dice_errors():
    logits, mask = _seg_batch(c=4)
    bad = mask.clone()
    bad[0, 1, 1] = 9
    with pytest.raises(ValueError, match=r"mask holds class index 9, outside \[0, 4\)"):
        DiceLoss()(logits, bad)
    with pytest.raises(ValueError, match=r"smooth must be >= 0"):
        DiceLoss(smooth=-1.0)


# ----------------------------------------------------------------------------- FocalLoss


def test_focal_gamma_zero_equals_cross_entropy():
    logits, mask = _seg_batch()
    x = logits.clone().requires_grad_()
    got = FocalLoss(gamma=0.0)(x, mask)
    got.backward()
    xr = logits.clone().requires_grad_()
    ref = F.cross_entropy(xr, mask, ignore_index=255)
    ref.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(x.grad, xr.grad)


def test_focal_hand_computed():
    # pixel 0: p_t = 3/4 (target 1) -> (1/4)^2 * ln(4/3); pixel 1: p_t = 1/2 -> (1/2)^2 * ln 2
    logits = torch.tensor([[[[0.0, 0.0]], [[math.log(3.0), 0.0]]]], dtype=torch.float64)
    mask = torch.tensor([[[1, 0]]])
    a = (1 / 16) * math.log(4 / 3)
    b = (1 / 4) * LN2
    assert FocalLoss(gamma=2.0)(logits, mask).item() == pytest.approx((a + b) / 2, rel=1e-12)
    # per-class alpha [0.25, 0.75]: pixel 0 (class 1) * 0.75, pixel 1 (class 0) * 0.25
    got = FocalLoss(gamma=2.0, alpha=[0.25, 0.75])(logits, mask).item()
    assert got == pytest.approx((0.75 * a + 0.25 * b) / 2, rel=1e-12)
    # one float alpha scales every pixel
    got = FocalLoss(gamma=2.0, alpha=0.5)(logits, mask).item()
    assert got == pytest.approx(0.5 * (a + b) / 2, rel=1e-12)
    # ignored pixel 1 leaves only pixel 0
    got = FocalLoss(gamma=2.0)(logits, torch.tensor([[[1, 255]]])).item()
    assert got == pytest.approx(a, rel=1e-12)


def test_focal_matches_formula_on_random_batch():
    logits, mask = _seg_batch(seed=3)
    gamma = 1.5
    got = FocalLoss(gamma=gamma)(logits, mask)
    p = logits.softmax(1)
    valid = mask != 255
    pt = p.gather(1, torch.where(valid, mask, 0).unsqueeze(1)).squeeze(1)
    ref = (-((1 - pt) ** gamma) * pt.log())[valid].mean()
    torch.testing.assert_close(got, ref)


def test_focal_confident_prediction_has_finite_gradient():
    logits = torch.zeros(1, 2, 1, 1, dtype=torch.float32)
    logits[0, 0] = 200.0  # p_t == 1 in float32
    x = logits.requires_grad_()
    loss = FocalLoss(gamma=0.5)(x, torch.zeros(1, 1, 1, dtype=torch.long))
    loss.backward()
    assert torch.isfinite(x.grad).all() and loss.item() == pytest.approx(0.0, abs=1e-6)


def test_focal_errors():
    logits, mask = _seg_batch(c=4)
    with pytest.raises(ValueError, match=r"alpha has 2 entries but logits has 4 classes"):
        FocalLoss(alpha=[0.5, 0.5])(logits, mask)
    with pytest.raises(ValueError, match=r"gamma must be >= 0"):
        FocalLoss(gamma=-1.0)


# ----------------------------------------------------------------------------- ClsCrossEntropy


def test_cls_ce_matches_torch_with_smoothing():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (8,), generator=g)
    x = logits.clone().requires_grad_()
    got = ClsCrossEntropy()(x, labels)  # default label_smoothing 0.1
    got.backward()
    xr = logits.clone().requires_grad_()
    ref = F.cross_entropy(xr, labels, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(x.grad, xr.grad)
    # hand: K = 2, logits [0, 0], eps = 0 -> ln 2
    got0 = ClsCrossEntropy(label_smoothing=0.0)(torch.zeros(1, 2), torch.tensor([1]))
    assert got0.item() == pytest.approx(LN2, rel=1e-6)


def test_cls_ce_errors():
    logits = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"labels must be \[N\] = \(4,\).*shape \(4, 1\)"):
        ClsCrossEntropy()(logits, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits must be \[N, K\].*shape \(4, 3, 1\)"):
        ClsCrossEntropy()(logits.unsqueeze(-1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"labels must hold integer"):
        ClsCrossEntropy()(logits, torch.zeros(4))
    # no label value is set aside as "ignore": -100 (F.cross_entropy's) is out of range too
    for value in (-100, 3):
        with pytest.raises(ValueError, match=rf"labels holds class index {value}, outside "
                                             r"\[0, 3\)$"):
            ClsCrossEntropy()(logits, torch.tensor([0, 1, value, 2]))


# ----------------------------------------------------------------------------- VAELoss


def _vae_batch(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 1, 4, 4, generator=g, dtype=torch.float64)
    recon = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    mu = torch.randn(n, 2, generator=g, dtype=torch.float64)
    logvar = 0.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return recon, image, mu, logvar


def test_vae_hand_computed():
    # N = 2 images of 2 pixels. recon - image = [[1, 0], [0, 2]] -> rec = (1 + 4) / 2 = 2.5
    # mu = [[1], [0]], logvar = 0 -> kl per sample 0.5 * mu^2 -> (0.5 + 0) / 2 = 0.25
    recon = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    image = torch.zeros(2, 2, dtype=torch.float64)
    mu = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    logvar = torch.zeros(2, 1, dtype=torch.float64)
    out = VAELoss(beta=2.0, normalize=False)(recon, image, mu, logvar)
    assert isinstance(out, VAELossOutput)
    assert out.rec.item() == pytest.approx(2.5)
    assert out.kl.item() == pytest.approx(0.25)
    assert out.total.item() == pytest.approx(2.5 + 2.0 * 0.25)
    # normalised by D = 2 elements per image
    norm = VAELoss(beta=2.0)(recon, image, mu, logvar)
    assert (norm.total.item(), norm.rec.item(), norm.kl.item()) == pytest.approx((1.5, 1.25, 0.125))


@pytest.mark.parametrize("kind", ["mse", "bernoulli"])
@pytest.mark.parametrize("normalize", [False, True])
def test_vae_matches_torch(kind, normalize):
    recon, image, mu, logvar = _vae_batch()
    n, d = recon.shape[0], recon[0].numel()
    beta = 0.7
    out = VAELoss(recon=kind, beta=beta, normalize=normalize)(recon, image, mu, logvar)
    if kind == "mse":
        rec = F.mse_loss(recon, image, reduction="sum") / n
    else:
        rec = F.binary_cross_entropy_with_logits(recon, image, reduction="sum") / n
    # KL(N(mu, s^2) || N(0, 1)) per dim = 0.5 * (s^2 + mu^2 - 1 - ln s^2), Kingma & Welling App. B
    kl = 0.5 * (logvar.exp() + mu**2 - 1 - logvar).sum() / n
    scale = d if normalize else 1
    torch.testing.assert_close(out.rec, rec / scale)
    torch.testing.assert_close(out.kl, kl / scale)
    torch.testing.assert_close(out.total, (rec + beta * kl) / scale)


def test_vae_gradients_flow():
    recon, image, mu, logvar = _vae_batch()
    params = [t.clone().requires_grad_() for t in (recon, mu, logvar)]
    VAELoss()(params[0], image, params[1], params[2]).total.backward()
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_vae_errors():
    recon, image, mu, logvar = _vae_batch()
    with pytest.raises(
        ValueError, match=r"recon and image must have the same shape.*\(3, 1, 4, 3\)"
    ):
        VAELoss()(recon, image[..., :3], mu, logvar)
    with pytest.raises(ValueError, match=r"mu and logvar must both be \[N, Z\].*shape \(3, 3\)"):
        VAELoss()(recon, image, mu, torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"mu and logvar must both be \[N, Z\] with N = 3"):
        VAELoss()(recon, image, mu[:2], logvar[:2])
    with pytest.raises(ValueError, match=r"image must hold values in \[0, 1\].*bernoulli"):
        VAELoss(recon="bernoulli")(recon, image * 2 - 1, mu, logvar)
    with pytest.raises(ValueError, match=r"recon must be one of"):
        VAELoss(recon="l1")
    with pytest.raises(TypeError, match=r"mu must be a floating-point tensor"):
        VAELoss()(recon, image, mu.long(), logvar)


# ----------------------------------------------------------------------------- adversarial


def _softplus(x):
    return torch.log1p(torch.exp(x))


_FORMULAS = {
    # (d_real, d_fake, g) per element, written from the papers' definitions
    "non_saturating": (lambda r: _softplus(-r), lambda f: _softplus(f), lambda f: _softplus(-f)),
    "hinge": (lambda r: (1 - r).clamp_min(0), lambda f: (1 + f).clamp_min(0), lambda f: -f),
    "least_squares": (lambda r: (r - 1) ** 2, lambda f: f**2, lambda f: (f - 1) ** 2),
}


@pytest.mark.parametrize("kind", list(_FORMULAS))
def test_adversarial_matches_formula(kind):
    g = torch.Generator().manual_seed(2)
    real = 2 * torch.randn(6, 1, generator=g, dtype=torch.float64)
    fake = 2 * torch.randn(6, 1, generator=g, dtype=torch.float64)
    fr, ff, fg = _FORMULAS[kind]
    loss = AdversarialLoss(kind)
    torch.testing.assert_close(loss.d_loss(real, fake), fr(real).mean() + ff(fake).mean())
    torch.testing.assert_close(loss.g_loss(fake), fg(fake).mean())
    torch.testing.assert_close(loss(fake), fg(fake).mean())
    # gradients of d_loss match those of the formula
    r1, f1 = real.clone().requires_grad_(), fake.clone().requires_grad_()
    loss.d_loss(r1, f1).backward()
    r2, f2 = real.clone().requires_grad_(), fake.clone().requires_grad_()
    (fr(r2).mean() + ff(f2).mean()).backward()
    torch.testing.assert_close(r1.grad, r2.grad)
    torch.testing.assert_close(f1.grad, f2.grad)


def test_adversarial_hand_values_at_zero():
    z = torch.zeros(4, dtype=torch.float64)
    assert AdversarialLoss("non_saturating").d_loss(z, z).item() == pytest.approx(2 * LN2)
    assert AdversarialLoss("non_saturating").g_loss(z).item() == pytest.approx(LN2)
    assert AdversarialLoss("hinge").d_loss(z, z).item() == pytest.approx(2.0)
    assert AdversarialLoss("hinge").g_loss(z + 3).item() == pytest.approx(-3.0)
    assert AdversarialLoss("least_squares").d_loss(z, z).item() == pytest.approx(1.0)
    assert AdversarialLoss("least_squares").g_loss(z).item() == pytest.approx(1.0)


def test_adversarial_errors():
    with pytest.raises(ValueError, match=r"kind must be one of .*'wasserstein'"):
        AdversarialLoss("wasserstein")
    with pytest.raises(TypeError, match=r"fake_logits must be a floating-point tensor"):
        AdversarialLoss().g_loss(torch.zeros(3, dtype=torch.long))


# ----------------------------------------------------------------------------- R1


def test_r1_penalty_of_linear_discriminator_is_exact():
    # D(x) = sum(w * x) -> grad_x D = w for every sample -> gamma/2 * ||w||^2 exactly
    g = torch.Generator().manual_seed(4)
    w = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    logits = (w * x).sum(dim=(1, 2, 3))
    gamma = 10.0
    pen = r1_penalty(x, logits, gamma)
    expected = gamma / 2 * (w.detach() ** 2).sum()
    torch.testing.assert_close(pen, expected, rtol=0, atol=1e-12)
    # create_graph: the penalty backpropagates into D's parameters, d/dw = gamma * w
    pen.backward()
    torch.testing.assert_close(w.grad, gamma * w.detach())


def test_r1_penalty_nonlinear_matches_closed_form():
    # D(x) = sum(x^2) per sample -> grad = 2x -> gamma/2 * mean_n 4 ||x_n||^2
    x = torch.tensor([[1.0, 2.0], [0.0, 3.0]], dtype=torch.float64, requires_grad=True)
    pen = r1_penalty(x, (x**2).sum(1, keepdim=True), gamma=1.0)
    assert pen.item() == pytest.approx(0.5 * (4 * 5 + 4 * 9) / 2)


def test_r1_penalty_errors():
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"real_images must require grad"):
        r1_penalty(x, x.sum(1), 1.0)
    xg = x.clone().requires_grad_()
    other = torch.randn(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"does not depend on real_images"):
        r1_penalty(xg, other.sum(1), 1.0)
    with pytest.raises(ValueError, match=r"one row per image.*shape \(2,\)"):
        r1_penalty(xg, xg.sum(1)[:2], 1.0)
    with pytest.raises(ValueError, match=r"one row per image.*shape \(3, 2\)"):
        r1_penalty(xg, xg * 2, 1.0)  # two logits per image
    with pytest.raises(ValueError, match=r"gamma must be >= 0"):
        r1_penalty(xg, xg.sum(1), -1.0)


@pytest.mark.parametrize("loss", [SegCrossEntropy, DiceLoss, FocalLoss])
def test_a_narrow_mask_dtype_is_compared_as_its_values(loss):
    """uint8 255 is not ignore_index -1 (in uint8 arithmetic -1 wraps to 255): every loss
    refuses it alike, and a uint8 mask gives the int64 mask's loss."""
    logits, mask = _seg_batch(c=4)
    wide = mask.clone()
    wide[0, 0, :3] = 0
    want = loss(ignore_index=-1)(logits, wide)
    torch.testing.assert_close(loss(ignore_index=-1)(logits, wide.to(torch.uint8)), want)
    with pytest.raises(ValueError, match=r"mask holds class index 255, outside \[0, 4\) and not "
                                         r"ignore_index=-1"):
        loss(ignore_index=-1)(logits, mask.to(torch.uint8))


def test_vae_loss_of_an_empty_batch_is_zero():
    recon, image, mu, logvar = (t[:0] for t in _vae_batch())
    for normalize in (True, False):
        out = VAELoss(normalize=normalize)(recon, image, mu, logvar)
        assert float(out.total) == 0.0


@pytest.mark.slow
def test_losses_on_default_backend(monkeypatch):
    """The same checks through the automatically selected backend (the C++ one on a CPU)."""
    monkeypatch.delenv("MTCORE_KERNELS", raising=False)
    logits, mask = _seg_batch()
    got = SegCrossEntropy(class_weights=[1.0, 2.0, 0.5, 3.0], label_smoothing=0.1)(logits, mask)
    w = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    ref = F.cross_entropy(logits, mask, weight=w, ignore_index=255, label_smoothing=0.1)
    torch.testing.assert_close(got, ref)
    recon, image, mu, logvar = _vae_batch()
    out = VAELoss(normalize=False)(recon, image, mu, logvar)
    kl = 0.5 * (logvar.exp() + mu**2 - 1 - logvar).sum() / 3
    torch.testing.assert_close(out.total, F.mse_loss(recon, image, reduction="sum") / 3 + kl)
    fake = torch.linspace(-3, 3, 7, dtype=torch.float64)
    torch.testing.assert_close(
        AdversarialLoss("hinge").d_loss(fake, fake),
        (1 - fake).clamp_min(0).mean() + (1 + fake).clamp_min(0).mean(),
    )

"""Pure-PyTorch reference of the four loss ops: the oracle that every backend is tested against.

Written for clarity, not speed. Low-precision inputs (bfloat16/float16) are computed in float32 and
the result is cast back to the input dtype. The argument checks here are shared with the fused ops
(:mod:`mtcore.kernels.ops`) so every backend rejects bad input with the same message.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "ADV_KINDS",
    "ADV_ROLES",
    "JOINT_MODES",
    "RECON_KINDS",
    "REDUCTIONS",
    "JointLoss",
    "VAELossTerms",
    "adversarial_loss",
    "joint_loss",
    "seg_cross_entropy",
    "vae_loss",
]

REDUCTIONS = ("none", "mean", "sum")
RECON_KINDS = ("mse", "bernoulli")
ADV_KINDS = ("non_saturating", "hinge", "least_squares")
ADV_ROLES = ("d_real", "d_fake", "g")
JOINT_MODES = ("fixed", "uncertainty")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class VAELossTerms(NamedTuple):
    """The VAE objective (Kingma & Welling 2014) split into its terms; each a 0-d tensor."""

    rec: torch.Tensor
    kl: torch.Tensor
    total: torch.Tensor


class JointLoss(NamedTuple):
    """Per-task losses ``terms`` [4] (seg, cls, vae, gan) and their weighted ``total`` (0-d)."""

    terms: torch.Tensor
    total: torch.Tensor


# ----------------------------------------------------------------------------- argument checks


def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t: object, float_only: bool = True) -> torch.Tensor:
    """Raise TypeError unless ``t`` is a tensor (of a floating dtype if ``float_only``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if float_only and t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype} ({_desc(t)})"
        )
    return t


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError if the given tensors are not all on one device."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dev = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev:
            raise ValueError(
                f"{k} is on {v.device} but {items[0][0]} is on {dev}; move them to one device"
            )


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> int:
    """Index of ``value`` in ``choices`` (the C++ enum), or ValueError naming the argument."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return choices.index(value)  # type: ignore[arg-type]


def check_seg_ce_args(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    label_smoothing: float,
    reduction: str,
    ignore_index: int = -100,
) -> None:
    """Metadata checks of seg_cross_entropy (no data-dependent checks; those need the values)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int (a class index), got {ignore_index!r}")
    check_tensor("logits", logits)
    check_tensor("target", target, float_only=False)
    if logits.dim() < 2:
        raise ValueError(f"logits must be [N, C, *spatial] (at least 2-d), got {_desc(logits)}")
    if target.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8):
        raise TypeError(f"target must hold integer class indices (int64), got {_desc(target)}")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target must have shape {expected} to match logits {tuple(logits.shape)} "
            f"(logits [N, C, *spatial] -> target [N, *spatial]), got {_desc(target)}"
        )
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one class (dim 1), got {_desc(logits)}")
    if weight is not None:
        check_tensor("weight", weight)
        if weight.dim() != 1 or weight.shape[0] != logits.shape[1]:
            raise ValueError(
                f"weight must be 1-d with one entry per class ({logits.shape[1]}), got {_desc(weight)}"
            )
    check_same_device(logits=logits, target=target, weight=weight)
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    check_choice("reduction", reduction, REDUCTIONS)


def check_constant_weight(weight: torch.Tensor | None) -> None:
    """The fused backends give class weights no gradient: one that asks for it is an error (the
    C++ op failed at the backward with "compute_grad=False", or dropped it silently)."""
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "weight gets no gradient from the fused seg_cross_entropy; pass weight.detach() (or "
            f"backend='reference' to learn class weights); weight is {_desc(weight)}")


def check_target_values(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """ValueError naming the first target value outside [0, num_classes) that is not ignore_index."""
    if target.numel() == 0:
        return
    target = target.long()  # in a narrow dtype, ignore_index -1 would compare as 255
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        value = int(target[bad].flatten()[0])
        raise ValueError(
            f"target holds class index {value}, outside [0, {num_classes}) "
            f"and not ignore_index={ignore_index}"
        )


def check_vae_args(
    recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> None:
    """Metadata checks of vae_loss."""
    for name, t in (("recon", recon), ("target", target), ("mu", mu), ("logvar", logvar)):
        check_tensor(name, t)
    if recon.dim() < 1 or recon.shape != target.shape:
        raise ValueError(
            f"recon and target must have the same shape [N, *], got recon {_desc(recon)} "
            f"and target {_desc(target)}"
        )
    if mu.dim() != 2 or mu.shape != logvar.shape:
        raise ValueError(
            f"mu and logvar must both be [N, Z], got mu {_desc(mu)} and logvar {_desc(logvar)}"
        )
    if mu.shape[0] != recon.shape[0]:
        raise ValueError(
            f"mu has batch size {mu.shape[0]} but recon has {recon.shape[0]} ({_desc(recon)})"
        )
    if target.requires_grad:
        raise ValueError(
            f"target must not require grad (vae_loss gives it no gradient); pass target.detach() "
            f"({_desc(target)})"
        )
    check_same_device(recon=recon, target=target, mu=mu, logvar=logvar)


# ----------------------------------------------------------------------------- helpers


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _ce_per_element(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element CE (0 where ignored) and the per-element target weight w[y] (0 where ignored).

    loss_i = (1-eps) * w[y_i] * (-log p_{y_i}) + eps/C * sum_c w_c * (-log p_c)   (Szegedy et al. 2016)
    """
    c = logits.shape[1]
    x = logits.to(_compute_dtype(logits))
    logp = x.log_softmax(dim=1)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    w = weight.to(x.dtype) if weight is not None else torch.ones(c, dtype=x.dtype, device=x.device)
    nll = -logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    wy = w[safe] * valid
    per = (1.0 - label_smoothing) * wy * nll
    if label_smoothing > 0:
        shape = [1, c] + [1] * (logits.dim() - 2)
        smooth = -(logp * w.view(shape)).sum(dim=1)
        per = per + (label_smoothing / c) * smooth * valid
    return per, wy


def _safe_mean(total: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """total / denom, but 0 (with zero gradient) when denom == 0."""
    ok = denom != 0  # class weights may be negative, as in F.cross_entropy
    return torch.where(ok, total / torch.where(ok, denom, torch.ones_like(denom)), 0.0)


# ----------------------------------------------------------------------------- the four ops


def seg_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross entropy over dim 1 of ``logits`` [N, C, *spatial] against class indices [N, *spatial].

    Same values as ``F.cross_entropy`` (weights, ignore_index, label smoothing), except that the
    mean over zero (weighted) non-ignored targets is 0 with zero gradient instead of NaN.
    """
    check_seg_ce_args(logits, target, weight, label_smoothing, reduction, ignore_index)
    if not torch.compiler.is_compiling():
        check_target_values(target, logits.shape[1], ignore_index)
    per, wy = _ce_per_element(logits, target.long(), weight, ignore_index, float(label_smoothing))
    if reduction == "none":
        out = per
    elif reduction == "sum":
        out = per.sum()
    else:
        out = _safe_mean(per.sum(), wy.sum())
    return out.to(logits.dtype)


def vae_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: float = 1.0,
    recon_kind: str = "mse",
) -> VAELossTerms:
    """Negative ELBO of a Gaussian-latent VAE (beta-VAE, Higgins et al. 2017), per-sample mean over N.

    rec: sum of squared errors ("mse") or of BCE-with-logits ("bernoulli", ``recon`` are logits)
    over all elements, divided by N; kl = -0.5 * sum(1 + logvar - mu^2 - exp(logvar)) / N;
    total = rec + beta * kl. An empty batch (N = 0) gives zeros.
    """
    check_vae_args(recon, target, mu, logvar)
    kind = check_choice("recon", recon_kind, RECON_KINDS)
    n = max(recon.shape[0], 1)
    cd = _compute_dtype(recon)
    x, t = recon.to(cd), target.to(cd)
    if kind == 0:
        rec = (x - t).square().sum() / n
    else:
        rec = (x.clamp_min(0) - x * t + torch.log1p(torch.exp(-x.abs()))).sum() / n
    m, lv = mu.to(cd), logvar.to(cd)
    kl = -0.5 * (1.0 + lv - m.square() - lv.exp()).sum() / n
    total = rec + beta * kl
    dt = recon.dtype
    return VAELossTerms(rec.to(dt), kl.to(dt), total.to(dt))


def adversarial_loss(
    logits: torch.Tensor, kind: str = "non_saturating", role: str = "g"
) -> torch.Tensor:
    """GAN loss of discriminator ``logits``, mean over all elements (0 for an empty tensor).

    non_saturating (Goodfellow et al. 2014): d_real softplus(-x), d_fake softplus(x), g softplus(-x);
    hinge (Lim & Ye 2017): d_real relu(1-x), d_fake relu(1+x), g -x;
    least_squares (Mao et al. 2017): d_real (x-1)^2, d_fake x^2, g (x-1)^2.
    """
    check_tensor("logits", logits)
    k = check_choice("kind", kind, ADV_KINDS)
    r = check_choice("role", role, ADV_ROLES)
    x = logits.to(_compute_dtype(logits))
    if k == 0:
        per = F.softplus(x) if r == 1 else F.softplus(-x)
    elif k == 1:
        per = (-x) if r == 2 else F.relu(1.0 + x) if r == 1 else F.relu(1.0 - x)
    else:
        per = x.square() if r == 1 else (x - 1.0).square()
    out = per.sum() / max(x.numel(), 1)
    return out.to(logits.dtype)


def joint_loss(
    seg_logits: torch.Tensor,
    seg_target: torch.Tensor,
    cls_logits: torch.Tensor,
    cls_target: torch.Tensor,
    recon: torch.Tensor,
    image: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    fake_logits: torch.Tensor,
    weights: torch.Tensor,
    mode: str = "fixed",
    *,
    beta: float = 1.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    recon_kind: str = "mse",
    adv_kind: str = "non_saturating",
) -> JointLoss:
    """The default four-task objective: terms = [seg CE, cls CE, VAE total, GAN g loss], weighted.

    mode "fixed": total = sum_k w_k L_k. mode "uncertainty" (Kendall et al. 2018, log-variance form):
    weights are s_k = log sigma_k^2 and total = sum_k exp(-s_k) L_k + s_k. ``label_smoothing``
    applies to the classification term only; ``ignore_index`` to both CE terms. ``terms`` and
    ``total`` have the dtype of ``weights``. Each term is the single loss's reference, returned
    in its input's dtype: with bf16/fp16 inputs a term is rounded to it before weighting (the
    fused backends weigh it unrounded; compare them on fp32 copies of the inputs).
    """
    check_joint_args(weights, mode)
    seg = seg_cross_entropy(seg_logits, seg_target, None, ignore_index, 0.0, "mean")
    cls = seg_cross_entropy(cls_logits, cls_target, None, ignore_index, label_smoothing, "mean")
    vae = vae_loss(recon, image, mu, logvar, beta, recon_kind).total
    gan = adversarial_loss(fake_logits, adv_kind, "g")
    terms = torch.stack([t.to(weights.dtype) for t in (seg, cls, vae, gan)])
    if mode == "fixed":
        total = (weights * terms).sum()
    else:
        total = (torch.exp(-weights) * terms + weights).sum()
    return JointLoss(terms, total)


def check_joint_args(weights: torch.Tensor, mode: str) -> int:
    """Checks of joint_loss's own arguments (each task's inputs are checked by its op)."""
    check_tensor("weights", weights)
    if weights.shape != (4,):
        raise ValueError(
            f"weights must have shape (4,) (one per task: seg, cls, vae, gan), got {_desc(weights)}"
        )
    return check_choice("mode", mode, JOINT_MODES)

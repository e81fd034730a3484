"""Loss components of the built-in tasks: segmentation, classification, VAE and GAN.

Each component is a small ``nn.Module`` whose constructor kwargs are its config params. The cross
entropy, VAE and adversarial losses call the fused ops of :mod:`mtcore.kernels`, so the kernel
backend selected in the config is the one used in training; Dice, focal and R1 are plain PyTorch.
Inputs are checked up front and bad ones raise ValueError/TypeError naming the tensor and its shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtcore import kernels

__all__ = [
    "AdversarialLoss",
    "ClsCrossEntropy",
    "DiceLoss",
    "FocalLoss",
    "SegCrossEntropy",
    "VAELoss",
    "VAELossOutput",
    "r1_penalty",
]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
RECON_KINDS = ("mse", "bernoulli")
ADV_KINDS = ("non_saturating", "hinge", "least_squares")


# ----------------------------------------------------------------------------- input checks


def _desc(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}"


def _check_float(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {_desc(t)}")
    return t


def _check_int(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must hold integer class indices (int64), got {_desc(t)}")
    return t


def _check_seg_inputs(logits: Tensor, mask: Tensor) -> None:
    """logits [N, C, H, W] float and mask [N, H, W] integer with matching N, H, W."""
    _check_float("logits", logits)
    _check_int("mask", mask)
    if logits.dim() != 4:
        raise ValueError(f"logits must be [N, C, H, W], got {_desc(logits)}")
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one class channel, got {_desc(logits)}")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"mask must be [N, H, W] = {expected} to match logits {tuple(logits.shape)}, "
            f"got {_desc(mask)}"
        )


def _check_mask_values(mask: Tensor, num_classes: int, ignore_index: int | None,
                       name: str = "mask") -> None:
    """ValueError naming the first value of ``mask`` (int64) outside [0, C) that is not
    ignore_index (None: every value must be a class)."""
    bad = (mask < 0) | (mask >= num_classes)
    if ignore_index is not None:
        bad &= mask != ignore_index
    if bool(bad.any()):
        value = int(mask[bad].flatten()[0])
        raise ValueError(
            f"{name} holds class index {value}, outside [0, {num_classes})"
            + ("" if ignore_index is None else f" and not ignore_index={ignore_index}")
        )


def _class_vector(name: str, values: Sequence[float] | Tensor | None) -> Tensor | None:
    """A float64 1-d tensor of non-negative per-class values (or None)."""
    if values is None:
        return None
    t = torch.as_tensor(values, dtype=torch.float64).detach().clone()
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a 1-d sequence with one value per class, got {_desc(t)}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0, got {t.tolist()}")
    return t


def _check_class_vector_len(name: str, t: Tensor | None, logits: Tensor) -> None:
    if t is not None and t.numel() != logits.shape[1]:
        raise ValueError(
            f"{name} has {t.numel()} entries but logits has {logits.shape[1]} classes "
            f"({_desc(logits)})"
        )


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- segmentation


class SegCrossEntropy(nn.Module):
    """Pixel-wise cross entropy through the fused kernel ``mtcore.kernels.seg_cross_entropy``.

    Mean over non-ignored pixels weighted as in ``F.cross_entropy``; a batch with every pixel
    ignored gives 0 (not NaN). Label smoothing follows Szegedy et al. 2016.
    """

    def __init__(
        self,
        ignore_index: int = 255,
        class_weights: Sequence[float] | Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)
        self.class_weights: Tensor | None
        self.register_buffer("class_weights", _class_vector("class_weights", class_weights))

    def forward(self, logits: Tensor, mask: Tensor) -> Tensor:
        _check_seg_inputs(logits, mask)
        mask = mask.long()  # a uint8 mask compared with ignore_index -1 would wrap to 255
        _check_mask_values(mask, logits.shape[1], self.ignore_index)
        _check_class_vector_len("class_weights", self.class_weights, logits)
        w = None if self.class_weights is None else self.class_weights.to(logits.dtype)
        return kernels.seg_cross_entropy(
            logits, mask, w, self.ignore_index, self.label_smoothing, "mean"
        )


class DiceLoss(nn.Module):
    """Soft multi-class Dice loss (Milletari et al. 2016, "V-Net") on softmax probabilities.

    With p = softmax(logits), g = one-hot(mask) and v = 1 on non-ignored pixels, summed over the
    whole batch (all images and pixels): dice_c = (2 sum v p_c g_c + smooth) / (sum v (p_c + g_c)
    + smooth), and loss = 1 - mean of dice_c over the classes present, i.e. classes with at least
    one non-ignored target pixel in the batch (class 0 dropped if ``exclude_background``). Classes
    absent from the target are left out because their Dice is set by ``smooth`` alone; predicting
    them is still penalised through the lost probability of the true class. No valid pixel (or no
    present class) gives 0 with zero gradient.
    """

    def __init__(
        self, ignore_index: int = 255, smooth: float = 1.0, exclude_background: bool = False
    ) -> None:
        super().__init__()
        if not float(smooth) >= 0.0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        self.ignore_index = int(ignore_index)
        self.smooth = float(smooth)
        self.exclude_background = bool(exclude_background)

    def forward(self, logits: Tensor, mask: Tensor) -> Tensor:
        _check_seg_inputs(logits, mask)
        mask = mask.long()  # a uint8 mask compared with ignore_index -1 would wrap to 255
        c = logits.shape[1]
        _check_mask_values(mask, c, self.ignore_index)
        x = logits.to(_compute_dtype(logits))
        prob = x.softmax(dim=1)
        valid = mask != self.ignore_index
        safe = torch.where(valid, mask.long(), torch.zeros_like(mask, dtype=torch.long))
        onehot = F.one_hot(safe, c).permute(0, 3, 1, 2).to(x.dtype)  # [N, C, H, W]
        v = valid.unsqueeze(1).to(x.dtype)
        onehot = onehot * v
        p = prob * v
        inter = (p * onehot).sum(dim=(0, 2, 3))
        denom = p.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
        present = onehot.sum(dim=(0, 2, 3)) > 0
        if self.exclude_background:
            present[0] = False
        dice = (2.0 * inter + self.smooth) / (denom + self.smooth).clamp_min(1e-12)
        n_present = present.sum()
        if int(n_present) == 0:
            return (x.sum() * 0.0).to(logits.dtype)
        loss = 1.0 - (dice * present).sum() / n_present
        return loss.to(logits.dtype)


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al. 2017): -alpha_y (1 - p_y)^gamma log p_y per pixel.

    ``alpha`` is None (1 for every class), one float for all classes, or one weight per class.
    The mean is over non-ignored pixels (the count, not the alpha sum, as in the paper's
    normalisation by assigned anchors); gamma=0 with alpha=None equals cross entropy. No valid
    pixel gives 0 with zero gradient.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | Tensor | None = None,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if not float(gamma) >= 0.0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.ignore_index = int(ignore_index)
        self.alpha_scalar: float | None = None
        self.alpha: Tensor | None
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            if not float(alpha) >= 0.0:
                raise ValueError(f"alpha must be >= 0, got {alpha}")
            self.alpha_scalar = float(alpha)
            self.register_buffer("alpha", None)
        else:
            self.register_buffer("alpha", _class_vector("alpha", alpha))

    def forward(self, logits: Tensor, mask: Tensor) -> Tensor:
        _check_seg_inputs(logits, mask)
        _check_class_vector_len("alpha", self.alpha, logits)
        mask = mask.long()  # a uint8 mask compared with ignore_index -1 would wrap to 255
        c = logits.shape[1]
        _check_mask_values(mask, c, self.ignore_index)
        x = logits.to(_compute_dtype(logits))
        valid = mask != self.ignore_index
        safe = torch.where(valid, mask.long(), torch.zeros_like(mask, dtype=torch.long))
        logp_t = x.log_softmax(dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)  # [N, H, W]
        per = -logp_t
        if self.gamma != 0.0:
            # 1 - p_t, accurate near p_t = 1; the floor keeps the gradient finite for gamma < 1
            one_minus_p = (-torch.expm1(logp_t)).clamp_min(1e-30)
            per = per * one_minus_p.pow(self.gamma)
        if self.alpha is not None:
            per = per * self.alpha.to(x.dtype)[safe]
        elif self.alpha_scalar is not None:
            per = per * self.alpha_scalar
        per = per * valid
        count = valid.sum()
        if int(count) == 0:
            return (x.sum() * 0.0).to(logits.dtype)
        return (per.sum() / count).to(logits.dtype)


# ----------------------------------------------------------------------------- classification


class ClsCrossEntropy(nn.Module):
    """Image-level cross entropy with label smoothing (Szegedy et al. 2016), via the fused kernel."""

    def __init__(self, label_smoothing: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        _check_float("logits", logits)
        _check_int("labels", labels)
        if logits.dim() != 2 or logits.shape[1] < 1:
            raise ValueError(f"logits must be [N, K] with K >= 1, got {_desc(logits)}")
        if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
            raise ValueError(
                f"labels must be [N] = ({logits.shape[0]},) to match logits "
                f"{tuple(logits.shape)}, got {_desc(labels)}"
            )
        labels = labels.long()
        # every label counts: no value is set aside as "ignore" (the metrics take none either)
        _check_mask_values(labels, logits.shape[1], None, name="labels")
        return kernels.seg_cross_entropy(logits, labels, None, logits.shape[1],
                                         self.label_smoothing, "mean")


# ----------------------------------------------------------------------------- VAE


class VAELossOutput(NamedTuple):
    """The VAE loss and its terms (0-d tensors); ``total = rec + beta * kl`` on one scale."""

    total: Tensor
    rec: Tensor
    kl: Tensor


class VAELoss(nn.Module):
    """Negative ELBO of a Gaussian-latent VAE (Kingma & Welling 2014; beta-VAE, Higgins et al. 2017).

    Via the fused kernel ``mtcore.kernels.vae_loss``: rec is the per-sample sum of squared errors
    ("mse") or of Bernoulli NLL ("bernoulli": ``recon`` are logits, ``image`` in [0, 1]); kl is the
    per-sample KL(q(z|x) || N(0, I)), summed over every latent element (``mu`` and ``logvar`` are
    ``[N, Z]`` or a latent map ``[N, C, h, w]``); both averaged over the batch. With
    ``normalize=True`` total, rec and kl are all divided by D, the number of elements per image
    (C*H*W), so the loss is on a per-pixel scale comparable with cross entropy (beta keeps its
    meaning: the KL/rec ratio is unchanged); with ``normalize=False`` they are on the per-sample
    ELBO scale. With "mse", beta is ``2 sigma^2`` of the Gaussian pixel likelihood it amounts to.
    """

    def __init__(self, recon: str = "mse", beta: float = 1.0, normalize: bool = True) -> None:
        super().__init__()
        if recon not in RECON_KINDS:
            raise ValueError(f"recon must be one of {RECON_KINDS}, got {recon!r}")
        if not float(beta) >= 0.0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.recon = recon
        self.beta = float(beta)
        self.normalize = bool(normalize)

    def forward(self, recon: Tensor, image: Tensor, mu: Tensor, logvar: Tensor) -> VAELossOutput:
        for name, t in (("recon", recon), ("image", image), ("mu", mu), ("logvar", logvar)):
            _check_float(name, t)
        if recon.dim() < 2 or recon.shape != image.shape:
            raise ValueError(
                f"recon and image must have the same shape [N, C, H, W], got recon "
                f"{_desc(recon)} and image {_desc(image)}"
            )
        if mu.dim() < 2 or mu.shape != logvar.shape or mu.shape[0] != recon.shape[0]:
            raise ValueError(
                f"mu and logvar must both be [N, Z] with N = {recon.shape[0]} (recon "
                f"{tuple(recon.shape)}; or both [N, *], a latent map), got mu {_desc(mu)} and "
                f"logvar {_desc(logvar)}"
            )
        mu, logvar = mu.flatten(1), logvar.flatten(1)  # a latent map: every element is a latent
        if self.recon == "bernoulli" and image.numel():
            lo, hi = float(image.min()), float(image.max())
            if not (lo >= 0.0 and hi <= 1.0):
                raise ValueError(
                    f"image must hold values in [0, 1] for recon='bernoulli', got min {lo:.4g} "
                    f"max {hi:.4g} ({_desc(image)})"
                )
        terms = kernels.vae_loss(recon, image, mu, logvar, self.beta, self.recon)
        rec, kl, total = terms.rec, terms.kl, terms.total
        if self.normalize:
            d = max(math.prod(recon.shape[1:]), 1)  # an empty batch has no recon[0]
            rec, kl, total = rec / d, kl / d, total / d
        return VAELossOutput(total, rec, kl)


# ----------------------------------------------------------------------------- GAN


class AdversarialLoss(nn.Module):
    """GAN losses via the fused kernel ``mtcore.kernels.adversarial_loss``, means over logits.

    non_saturating (Goodfellow et al. 2014): D softplus(-r) + softplus(f), G softplus(-f);
    hinge (Lim & Ye 2017): D relu(1-r) + relu(1+f), G -f;
    least_squares (Mao et al. 2017): D (r-1)^2 + f^2, G (f-1)^2.
    """

    def __init__(self, kind: str = "non_saturating") -> None:
        super().__init__()
        if kind not in ADV_KINDS:
            raise ValueError(f"kind must be one of {ADV_KINDS}, got {kind!r}")
        self.kind = kind

    def d_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        """Discriminator loss: mean real term + mean fake term."""
        _check_float("real_logits", real_logits)
        _check_float("fake_logits", fake_logits)
        real = kernels.adversarial_loss(real_logits, self.kind, "d_real")
        fake = kernels.adversarial_loss(fake_logits, self.kind, "d_fake")
        return real + fake

    def g_loss(self, fake_logits: Tensor) -> Tensor:
        """Generator loss on the discriminator's logits for generated images."""
        _check_float("fake_logits", fake_logits)
        return kernels.adversarial_loss(fake_logits, self.kind, "g")

    def forward(self, fake_logits: Tensor) -> Tensor:
        """The generator loss (what a task's loss call needs); same as :meth:`g_loss`."""
        return self.g_loss(fake_logits)


def lazy_r1(judge, real: Tensor, gamma: float, every: int, step: int) -> Tensor | None:
    """The R1 penalty of ``judge`` (images -> logits) on ``real`` at every ``every``-th step, else
    None (lazy regularisation, Karras et al. 2020: the caller scales it by ``every``)."""
    if gamma <= 0 or step % every:
        return None
    x = real.detach().requires_grad_(True)
    return r1_penalty(x, judge(x).float(), gamma)


def r1_penalty(real_images: Tensor, real_logits: Tensor, gamma: float) -> Tensor:
    """R1 gradient penalty (Mescheder et al. 2018): gamma/2 * E_x[ ||grad_x D(x)||^2 ].

    ``real_images`` must require grad and ``real_logits`` = D(real_images) [N] or [N, 1]; the
    squared norm is per sample, the mean over the batch. Built with ``create_graph=True`` so the
    penalty can be backpropagated into D's parameters.
    """
    _check_float("real_images", real_images)
    _check_float("real_logits", real_logits)
    if not float(gamma) >= 0.0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if not real_images.requires_grad:
        raise ValueError(
            f"real_images must require grad to compute the R1 penalty; call "
            f"real_images.requires_grad_() before D(real_images) ({_desc(real_images)})"
        )
    if (
        real_images.dim() < 1
        or real_logits.dim() < 1
        or real_logits.shape[0] != real_images.shape[0]
        or real_logits.numel() != real_images.shape[0]
    ):
        raise ValueError(
            f"real_logits must have one row per image ([N] or [N, 1], N = "
            f"{real_images.shape[0] if real_images.dim() else '?'}), got {_desc(real_logits)} "
            f"for real_images {_desc(real_images)}"
        )
    if real_images.shape[0] == 0:
        return real_logits.sum() * 0.0
    if not real_logits.requires_grad:
        raise ValueError(
            f"real_logits must be computed from real_images (it has no graph; {_desc(real_logits)})"
        )
    (grad,) = torch.autograd.grad(
        real_logits.sum(), real_images, create_graph=True, allow_unused=True
    )
    if grad is None:
        raise ValueError(
            f"real_logits ({_desc(real_logits)}) does not depend on real_images "
            f"({_desc(real_images)}); pass real_logits = D(real_images)"
        )
    sq = grad.square().reshape(grad.shape[0], -1).sum(dim=1)
    return 0.5 * float(gamma) * sq.mean()

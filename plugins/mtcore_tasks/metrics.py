"""Streaming metric accumulators of the built-in tasks, exact over a whole split.

Each accumulator takes batches with ``update(...)``, reports with ``compute() -> dict[str, float]``
and starts over with ``reset()``. State lives on the CPU as int64 counts (confusion matrices) or
float64 sums, so the result does not depend on how the split is batched or on the device.
A split with no data gives NaN values.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ClassificationMetrics", "ReconstructionMetrics", "SegmentationMetrics"]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _desc(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}"


def _check_num_classes(num_classes: object) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def _to_labels(name: str, preds: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Class indices from ``preds``: scores with a class dim 1 (argmax) or indices shaped like target."""
    if not isinstance(preds, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(preds).__name__}")
    if preds.dim() == target.dim() + 1 and preds.is_floating_point():
        if preds.shape[1] != num_classes:
            raise ValueError(
                f"{name} scores must have {num_classes} classes in dim 1, got {_desc(preds)}"
            )
        preds = preds.detach().argmax(dim=1)
    elif preds.dtype not in _INT_DTYPES:
        raise TypeError(
            f"{name} must be class indices (integer, shaped like the target {tuple(target.shape)}) "
            f"or float scores with classes in dim 1, got {_desc(preds)}"
        )
    if preds.shape != target.shape:
        raise ValueError(
            f"{name} must match the target shape {tuple(target.shape)}, got {_desc(preds)}"
        )
    preds = preds.detach().to("cpu", torch.int64)
    if preds.numel() and bool(((preds < 0) | (preds >= num_classes)).any()):
        value = int(preds[(preds < 0) | (preds >= num_classes)][0])
        raise ValueError(f"{name} holds class index {value}, outside [0, {num_classes})")
    return preds


def _check_target(name: str, target: object, num_classes: int, ignore_index: int | None) -> Tensor:
    if not isinstance(target, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must hold integer class indices (int64), got {_desc(target)}")
    t = target.detach().to("cpu", torch.int64)
    bad = (t < 0) | (t >= num_classes)
    if ignore_index is not None:
        bad &= t != ignore_index
    if t.numel() and bool(bad.any()):
        value = int(t[bad][0])
        extra = f" and not ignore_index={ignore_index}" if ignore_index is not None else ""
        raise ValueError(f"{name} holds class index {value}, outside [0, {num_classes}){extra}")
    return t


def _confusion(target: Tensor, preds: Tensor, num_classes: int) -> Tensor:
    """[C, C] int64 counts, rows = target class, columns = predicted class."""
    idx = target.reshape(-1) * num_classes + preds.reshape(-1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den as float64, NaN where den == 0."""
    num, den = num.to(torch.float64), den.to(torch.float64)
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, math.nan))


class SegmentationMetrics:
    """Pixel accuracy, per-class IoU and mIoU from a confusion matrix (ignored pixels dropped).

    IoU_c = TP / (TP + FP + FN). mIoU is the mean over classes that appear in the target or the
    prediction (TP + FP + FN > 0); classes absent from both have no defined IoU, are reported as
    NaN in ``iou/<c>`` and are left out of the mean (the convention of sklearn's
    ``jaccard_score(average="macro")``, which averages over labels present in either).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = _check_num_classes(num_classes)
        self.ignore_index = int(ignore_index)
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, preds: Tensor, mask: Tensor) -> None:
        """Add a batch: ``preds`` logits [N, C, H, W] or class indices [N, H, W]; ``mask`` [N, H, W]."""
        mask_cpu = _check_target("mask", mask, self.num_classes, self.ignore_index)
        labels = _to_labels("preds", preds, mask_cpu, self.num_classes)
        valid = mask_cpu != self.ignore_index
        self.confusion += _confusion(mask_cpu[valid], labels[valid], self.num_classes)

    def compute(self) -> dict[str, float]:
        """{"miou", "pixel_acc", "iou/0", ..., "iou/<C-1>"}; NaN where undefined."""
        cm = self.confusion
        tp = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = _safe_ratio(tp, union)
        seen = union > 0
        out = {
            "miou": float(iou[seen].mean()) if bool(seen.any()) else math.nan,
            "pixel_acc": float(_safe_ratio(tp.sum(), cm.sum())),
        }
        out.update({f"iou/{c}": float(iou[c]) for c in range(self.num_classes)})
        return out


class ClassificationMetrics:
    """Accuracy and macro-F1 from a confusion matrix.

    F1_c = 2 TP / (2 TP + FP + FN); macro-F1 is the mean over classes with support or at least one
    prediction (TP + FP + FN > 0). Classes absent from both labels and predictions are left out
    (sklearn's ``f1_score(average="macro")`` convention with its default labels).
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = _check_num_classes(num_classes)
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, preds: Tensor, labels: Tensor) -> None:
        """Add a batch: ``preds`` logits [N, K] or class indices [N]; ``labels`` [N]."""
        if isinstance(labels, Tensor) and labels.dim() != 1:
            raise ValueError(f"labels must be [N], got {_desc(labels)}")
        labels_cpu = _check_target("labels", labels, self.num_classes, None)
        pred_labels = _to_labels("preds", preds, labels_cpu, self.num_classes)
        self.confusion += _confusion(labels_cpu, pred_labels, self.num_classes)

    def compute(self) -> dict[str, float]:
        """{"accuracy", "macro_f1"}; NaN with no data."""
        cm = self.confusion
        tp = cm.diagonal()
        err = cm.sum(0) + cm.sum(1) - 2 * tp  # FP + FN
        seen = (tp + err) > 0
        f1 = _safe_ratio(2 * tp, 2 * tp + err)
        return {
            "accuracy": float(_safe_ratio(tp.sum(), cm.sum())),
            "macro_f1": float(f1[seen].mean()) if bool(seen.any()) else math.nan,
        }


class ReconstructionMetrics:
    """Reconstruction MSE, PSNR and ELBO of a VAE over a split.

    mse: mean squared error per element over the whole split. psnr: 10 log10(data_range^2 / mse)
    from that split-level MSE (not the mean of per-image PSNRs, which over-weights easy images and
    is infinite for any perfect image); +inf when mse == 0. elbo: mean over samples of
    -(rec + kl), from the per-sample terms passed to ``update`` (rec = summed squared error for the
    "mse" recon, a Gaussian log-likelihood up to constants, or summed Bernoulli NLL), so it is the
    negative of the per-sample training objective with beta = 1.
    """

    def __init__(self, data_range: float = 1.0) -> None:
        if not float(data_range) > 0.0:
            raise ValueError(f"data_range must be > 0, got {data_range}")
        self.data_range = float(data_range)
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self.sse = 0.0
        self.num_elements = 0
        self.elbo_sum = 0.0
        self.num_samples = 0

    @torch.no_grad()
    def update(self, recon: Tensor, image: Tensor, rec: Tensor, kl: Tensor) -> None:
        """Add a batch: ``recon`` and ``image`` [N, *] in image space; ``rec`` and ``kl`` [N] per sample."""
        for name, t in (("recon", recon), ("image", image), ("rec", rec), ("kl", kl)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {_desc(t)}")
        if recon.dim() < 1 or recon.shape != image.shape:
            raise ValueError(
                f"recon and image must have the same shape [N, *], got recon {_desc(recon)} "
                f"and image {_desc(image)}"
            )
        n = recon.shape[0]
        for name, t in (("rec", rec), ("kl", kl)):
            if t.shape != (n,):
                raise ValueError(
                    f"{name} must be per-sample [N] = ({n},) to match recon {tuple(recon.shape)}, "
                    f"got {_desc(t)}"
                )
        diff = recon.detach().to("cpu", torch.float64) - image.detach().to("cpu", torch.float64)
        self.sse += float(diff.square().sum())
        self.num_elements += diff.numel()
        elbo = -(rec.detach().to("cpu", torch.float64) + kl.detach().to("cpu", torch.float64))
        self.elbo_sum += float(elbo.sum())
        self.num_samples += n

    def compute(self) -> dict[str, float]:
        """{"mse", "psnr", "elbo"}; NaN with no data."""
        mse = self.sse / self.num_elements if self.num_elements else math.nan
        if math.isnan(mse):
            psnr = math.nan
        elif mse == 0.0:
            psnr = math.inf
        else:
            psnr = 10.0 * math.log10(self.data_range**2 / mse)
        elbo = self.elbo_sum / self.num_samples if self.num_samples else math.nan
        return {"mse": mse, "psnr": psnr, "elbo": elbo}

"""A small per-dataset CNN whose features stand in for Inception in offline generation metrics.

One evaluator is trained once per dataset on its train split and cached on disk at
``$MTCORE_CACHE/evaluators/<cache_key>-<hash>.pt`` (default root ``~/.cache/mtcore``), where the
hash covers the architecture version, every training parameter and a fingerprint of the data (16
training items spread over the split), so changed data cannot reuse a stale evaluator.

It learns every target the dataset has (:func:`targets_for`): the segmentation masks (per-pixel
classes, through a small top-down decoder) and the labels, or, with neither, the rotation pretext
task (Gidaris et al. 2018, "Unsupervised Representation Learning by Predicting Image Rotations":
each image turned by 0/90/180/270 degrees, 0/180 when not square, and the net says which). Its
classifier (``Evaluator.predict``) reads a label off the segmentation's pixel shares and a probe
on the deepest block, so on ``shapes`` ("the kind covering the most pixels") it names real
validation images' labels at about 0.95-0.97; class consistency is judged by it.

``Evaluator.features`` (:data:`FEATURE_DIM` values) pool several depths, so FID, precision and
recall see colour and texture as well as shapes: block1's per-channel mean and standard
deviation (full resolution: colour, noise, texture), block2's (edges, fine texture), block3's
mean (parts) and block4's (shapes, layout). Each group is scaled to total variance 1 on the
training images, so every depth weighs alike in distances, and FID is summed over the groups
(``generation_metrics.grouped_frechet_distance``). Version 1 pooled only the deepest block of a
label classifier; on ``shapes`` (500 images, in units of the real-vs-real FID) it put a 3-epoch
GAN's blobs at 13x and blurred real images at 23x, these features at 31x and 51x.
Features from two different evaluators (or datasets) are not comparable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtcore.plugin import DatasetInfo

ARCH_VERSION = 4  # bump on any change to EvaluatorNet or the training recipe: it invalidates caches
_STEM = 16  # channels of the full-resolution first block
_WIDTHS = (32, 64, 128)  # the three blocks after it, each at half the resolution of the one before
# The feature vector, in order: what each part of it is pooled from (mean and/or std over pixels).
FEATURE_GROUPS: tuple[tuple[str, int], ...] = (
    ("block1 mean+std (colour, texture)", 2 * _STEM),
    ("block2 mean+std (edges, fine texture)", 2 * _WIDTHS[0]),
    ("block3 mean (parts)", _WIDTHS[1]),
    ("block4 mean (shapes, layout)", _WIDTHS[2]),
)
FEATURE_DIM = sum(d for _, d in FEATURE_GROUPS)
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_RANGE_TOL = 1e-3
_NORM_SAMPLES = 2000  # training images whose features set each group's scale


def default_cache_dir() -> Path:
    """Cached evaluators' folder: ``$MTCORE_CACHE/evaluators`` or ``~/.cache/mtcore/evaluators``."""
    base = os.environ.get("MTCORE_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "mtcore"
    return root / "evaluators"


def first_stride(image_size: tuple[int, int]) -> int:
    """Stride of the first conv: 2 for images of side >= 32 (4x less compute), else 1."""
    return 2 if min(image_size) >= 32 else 1


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _mean_std(x: Tensor) -> Tensor:
    """[N, C, H, W] -> [N, 2C]: each channel's mean and standard deviation over the pixels."""
    mean = x.mean(dim=(2, 3))
    var = (x * x).mean(dim=(2, 3)) - mean * mean
    return torch.cat([mean, (var.clamp_min(0) + 1e-6).sqrt()], dim=1)


class EvaluatorNet(nn.Module):
    """Four blocks of 3x3 conv-BN-ReLU layers: block1 (one layer) at full resolution, block2 (two)
    strided by ``stride``, blocks 3 and 4 (two each) each after a 2x2 max-pool; heads on them:

    - ``segmenter`` (the data has masks): a top-down decoder (FPN-like, Lin et al. 2017) from
      blocks 4 and 3 down to block2's resolution, there per-pixel class logits;
    - ``label_head`` (labels): a linear layer on block4's mean; with a segmenter it is a probe
      (block4 detached) and ``classifier``, a linear layer fitted last (:func:`_fit_classifier`),
      reads the label off its logits, each segmentation class's soft pixel share, or both: "the
      class covering the most pixels" off the segmentation, a label the masks do not show off
      block4;
    - ``rotation`` (neither: the rotation pretext task).

    ``forward`` returns a dict: ``features`` (:data:`FEATURE_GROUPS`, each group shifted and scaled
    by buffers set on the training data) and ``logits`` / ``seg`` / ``rotation`` where present.
    """

    def __init__(self, channels: int, num_labels: int = 0, num_seg_classes: int = 0,
                 num_rotations: int = 0, stride: int = 1) -> None:
        super().__init__()
        w2, w3, w4 = _WIDTHS
        self.block1 = _conv_bn_relu(channels, _STEM)
        self.block2 = nn.Sequential(_conv_bn_relu(_STEM, w2, stride), _conv_bn_relu(w2, w2))
        self.block3 = nn.Sequential(nn.MaxPool2d(2), _conv_bn_relu(w2, w3), _conv_bn_relu(w3, w3))
        self.block4 = nn.Sequential(nn.MaxPool2d(2), _conv_bn_relu(w3, w4), _conv_bn_relu(w4, w4))
        self.segmenter: nn.ModuleDict | None = None
        if num_seg_classes:
            self.segmenter = nn.ModuleDict({
                "lat4": nn.Conv2d(w4, w2, 1), "lat3": nn.Conv2d(w3, w2, 1),
                "mid": _conv_bn_relu(w2, w2),
                "smooth": nn.Sequential(_conv_bn_relu(w2, w2), _conv_bn_relu(w2, w2)),
                "out": nn.Conv2d(w2, num_seg_classes, 1)})
        self.label_head = nn.Linear(w4, num_labels) if num_labels else None
        self.classifier: nn.Linear | None = None
        if num_labels and num_seg_classes:  # fitted last (train_evaluator)
            self.classifier = nn.Linear(num_labels + num_seg_classes, num_labels)
            self.register_buffer("classifier_shift", torch.zeros(num_labels + num_seg_classes))
            self.register_buffer("classifier_scale", torch.ones(num_labels + num_seg_classes))
        self.rotation = nn.Linear(w4, num_rotations) if num_rotations else None
        self.register_buffer("feature_shift", torch.zeros(FEATURE_DIM))
        self.register_buffer("feature_scale", torch.ones(FEATURE_DIM))

    @property
    def has_classifier(self) -> bool:
        return self.label_head is not None

    def _blocks(self, x: Tensor) -> list[Tensor]:
        b1 = self.block1(x * 2.0 - 1.0)
        b2 = self.block2(b1)
        b3 = self.block3(b2)
        return [b1, b2, b3, self.block4(b3)]

    def raw_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Unscaled pooled features [N, FEATURE_DIM] and the four block outputs."""
        b1, b2, b3, b4 = blocks = self._blocks(x)
        feats = torch.cat([_mean_std(b1), _mean_std(b2), b3.mean(dim=(2, 3)),
                           b4.mean(dim=(2, 3))], dim=1)
        return feats, blocks

    def _segment(self, blocks: list[Tensor]) -> Tensor:
        """Segmentation logits at block2's resolution."""
        seg = self.segmenter
        assert seg is not None
        _, b2, b3, b4 = blocks
        top = F.interpolate(seg["lat4"](b4), size=b3.shape[-2:], mode="nearest") + seg["lat3"](b3)
        top = F.interpolate(seg["mid"](top), size=b2.shape[-2:], mode="bilinear",
                            align_corners=False)
        return seg["out"](seg["smooth"](top + b2))

    def forward(self, x: Tensor, features: bool = True) -> dict[str, Tensor]:
        """``features=False`` (training) skips the pooled features."""
        if features:
            raw, blocks = self.raw_features(x)
            out = {"features": (raw - self.feature_shift) * self.feature_scale}
        else:
            blocks, out = self._blocks(x), {}
        deep = blocks[3].mean(dim=(2, 3))
        if self.segmenter is not None:
            out["seg"] = self._segment(blocks)
        if self.label_head is not None:  # with a segmenter, a probe: see train_evaluator
            probe = deep.detach() if self.segmenter is not None else deep
            out["label_logits"] = out["logits"] = self.label_head(probe)
            if self.classifier is not None:
                z = (self.classifier_raw_input(out) - self.classifier_shift) * self.classifier_scale
                out["logits"] = self.classifier(z)
        if self.rotation is not None:
            out["rotation"] = self.rotation(deep)
        return out

    @staticmethod
    def classifier_raw_input(out: dict[str, Tensor]) -> Tensor:
        """The label probe's logits and each segmentation class's soft pixel share (the mean of
        its softmax over the cells), before the classifier's standardisation."""
        share = torch.softmax(out["seg"].detach(), dim=1).mean(dim=(2, 3))
        return torch.cat([out["label_logits"].detach(), share], dim=1)

    def features(self, x: Tensor) -> Tensor:
        """[N, C, H, W] in [0, 1] -> [N, FEATURE_DIM] scaled features (no heads run)."""
        return (self.raw_features(x)[0] - self.feature_shift) * self.feature_scale


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights besides the data; hashed into the cache name."""

    epochs: int = 8
    seed: int = 0
    lr: float = 5e-3
    batch_size: int = 32
    max_train_samples: int = 20000

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "max_train_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.batch_size < 2:  # BatchNorm trains on two samples or more
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


def targets_for(info: DatasetInfo) -> tuple[str, ...]:
    """What an evaluator for ``info`` is trained on: ("masks", "labels") where the data has them,
    else ("rotation",)."""
    targets = tuple(t for t, has in (("masks", info.has_masks), ("labels", info.has_labels))
                    if has)
    return targets or ("rotation",)


def _num_rotations(info: DatasetInfo) -> int:
    return 4 if info.image_size[0] == info.image_size[1] else 2


def _new_net(info: DatasetInfo, mode: str) -> EvaluatorNet:
    targets = mode.split("+")
    return EvaluatorNet(
        info.channels,
        num_labels=info.num_labels if "labels" in targets else 0,
        num_seg_classes=info.num_seg_classes if "masks" in targets else 0,
        num_rotations=_num_rotations(info) if "rotation" in targets else 0,
        stride=first_stride(info.image_size),
    )


@dataclass
class Evaluator:
    """A trained EvaluatorNet plus what it was trained on; all methods run in eval mode, no grad."""

    net: EvaluatorNet
    info: DatasetInfo
    mode: str  # its targets joined by "+": "masks+labels", "masks", "labels" or "rotation"
    device: torch.device
    cache_path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # training params, time, final train loss

    @property
    def feature_dim(self) -> int:
        return FEATURE_DIM

    @property
    def feature_groups(self) -> tuple[int, ...]:
        """Sizes of the consecutive feature groups (:data:`FEATURE_GROUPS`), one per depth."""
        return tuple(d for _, d in FEATURE_GROUPS)

    @property
    def num_labels(self) -> int:
        """Number of dataset labels the evaluator predicts (0 when it has no classifier)."""
        return self.info.num_labels if self.net.has_classifier else 0

    def _check_images(self, images: Tensor, name: str = "images") -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
        c, (h, w) = self.info.channels, self.info.image_size
        if images.dim() != 4 or images.shape[1] != c or tuple(images.shape[2:]) != (h, w):
            raise ValueError(
                f"{name} must have shape [N, {c}, {h}, {w}] (dataset {self.info.name!r}), "
                f"got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise TypeError(f"{name} must be a float tensor in [0, 1], got dtype {images.dtype}")
        if images.numel():
            lo, hi = float(images.min()), float(images.max())
            if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL or lo != lo or hi != hi:
                raise ValueError(
                    f"{name} must hold values in [0, 1], got min {lo:.4g} max {hi:.4g} "
                    f"(map a [-1, 1] generator output with x * 0.5 + 0.5)"
                )

    def _need_classifier(self) -> None:
        if not self.net.has_classifier:
            raise ValueError(
                f"this evaluator for {self.info.name!r} was trained on {self.mode!r} (the dataset "
                "has no labels), so it cannot predict labels"
                + (" (the rotation pretext task)" if self.mode == "rotation" else "")
            )

    @torch.inference_mode()
    def embed(self, images: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor | None]:
        """Features [N, FEATURE_DIM] and predicted labels [N] (None without a classifier) of
        ``images`` [N, C, H, W] in [0, 1], in one pass; float32 / int64 on the CPU."""
        self._check_images(images)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.net.eval()
        feats, preds = [], []
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(self.device, torch.float32).clamp(0.0, 1.0)
            if not self.net.has_classifier:
                feats.append(self.net.features(x).float().cpu())
                continue
            out = self.net(x)
            feats.append(out["features"].float().cpu())
            preds.append(out["logits"].argmax(dim=1).cpu())
        f = torch.cat(feats) if feats else torch.empty(0, FEATURE_DIM)
        if not self.net.has_classifier:
            return f, None
        return f, torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64)

    def features(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Features of ``images`` [N, C, H, W] in [0, 1] as float32 [N, FEATURE_DIM] on the CPU:
        the :data:`FEATURE_GROUPS`, each scaled to total variance 1 on the training data."""
        self._check_images(images)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.net.eval()
        outs = []
        with torch.inference_mode():
            for start in range(0, images.shape[0], batch_size):
                x = images[start : start + batch_size].to(self.device, torch.float32)
                outs.append(self.net.features(x.clamp(0.0, 1.0)).float().cpu())
        return torch.cat(outs) if outs else torch.empty(0, FEATURE_DIM)

    def predict(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Predicted dataset labels [N] (int64, CPU); needs an evaluator trained on labels."""
        self._need_classifier()
        preds = self.embed(images, batch_size)[1]
        assert preds is not None
        return preds

    def accuracy_on(self, dataset: Any, batch_size: int = 256) -> float:
        """Fraction of ``dataset`` items whose label the evaluator predicts correctly."""
        images, labels = load_images(dataset, require_labels=True)
        if images.shape[0] == 0:
            raise ValueError("dataset is empty: accuracy is undefined")
        pred = self.predict(images, batch_size)
        return float((pred == labels).double().mean())


def _check_info(dataset: Any) -> DatasetInfo:
    info = getattr(dataset, "info", None)
    if not isinstance(info, DatasetInfo):
        raise TypeError(
            f"dataset must have an .info DatasetInfo (mtcore.data), got {type(dataset).__name__}"
        )
    return info


def load_images(
    dataset: Any, max_samples: int | None = None, require_labels: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Stack the first ``max_samples`` items of ``dataset``: images [N, C, H, W], labels [N]."""
    images, labels, _ = _load_data(dataset, max_samples, require_labels, masks=False)
    return images, labels


def _load_data(dataset: Any, max_samples: int | None, require_labels: bool,
          masks: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Images, labels (None without) and, with ``masks``, int16 masks [N, H, W] (None without)."""
    info = _check_info(dataset)
    if require_labels and not info.has_labels:
        raise ValueError(f"dataset {info.name!r} has no labels (info.num_labels == 0)")
    n = len(dataset)
    if max_samples is not None:
        n = min(n, max_samples)
    c, (h, w) = info.channels, info.image_size
    images = torch.empty(n, c, h, w, dtype=torch.float32)
    labels = torch.empty(n, dtype=torch.int64) if info.has_labels else None
    mask_t = torch.empty(n, h, w, dtype=torch.int16) if masks and info.has_masks else None
    for i in range(n):
        item = dataset[i]
        if not isinstance(item, dict) or "image" not in item:
            raise TypeError(f"dataset {info.name!r} item {i} must be a dict with an 'image' key")
        img = item["image"]
        if not isinstance(img, Tensor) or tuple(img.shape) != (c, h, w):
            got = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
            raise ValueError(
                f"dataset {info.name!r} item {i}: 'image' must be a tensor of shape "
                f"[{c}, {h}, {w}] (from .info), got {got}"
            )
        images[i] = img
        if labels is not None:
            if "label" not in item:
                raise ValueError(
                    f"dataset {info.name!r} item {i} has no 'label' but info says it has"
                )
            labels[i] = int(item["label"])
        if mask_t is not None:
            m = item.get("mask")
            if not isinstance(m, Tensor) or tuple(m.shape) != (h, w):
                got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
                raise ValueError(f"dataset {info.name!r} item {i}: 'mask' must be a tensor of "
                                 f"shape [{h}, {w}] (info says it has masks), got {got}")
            mask_t[i] = m
    if labels is not None and n and (labels.min() < 0 or labels.max() >= info.num_labels):
        raise ValueError(
            f"dataset {info.name!r} labels must lie in [0, {info.num_labels}), "
            f"got min {int(labels.min())} max {int(labels.max())}"
        )
    return images, labels, mask_t


def _rotate_batch(x: Tensor, square: bool, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Each image turned by a random multiple of 90 (180 if not square) degrees; target: which."""
    ks = (0, 1, 2, 3) if square else (0, 2)
    y = torch.randint(0, len(ks), (x.shape[0],), generator=gen)
    out = x.clone()
    for i, k in enumerate(ks[1:], start=1):
        sel = y == i
        if sel.any():
            out[sel] = torch.rot90(x[sel], k, dims=(2, 3))
    return out, y


def _area_targets(masks: Tensor, num_classes: int, ignore_index: int,
                  size: tuple[int, int] | torch.Size) -> tuple[Tensor, Tensor]:
    """Each segmentation-logit cell's class fractions [N, K, h, w] over the labelled pixels it
    covers, and the labelled fraction [N, h, w] (the cell's weight).

    Soft targets: a boundary cell learns the mix of classes it covers, so the mean of the
    softmax over the cells estimates each class's share of the full-resolution pixels, which
    a label like "the class covering the most pixels" depends on."""
    m = masks.long()
    valid = (m != ignore_index) & (m >= 0) & (m < num_classes)
    onehot = F.one_hot(torch.where(valid, m, 0), num_classes).permute(0, 3, 1, 2).float()
    onehot = onehot * valid[:, None]
    frac = F.adaptive_avg_pool2d(onehot, tuple(size))
    weight = frac.sum(dim=1)
    return frac / weight.clamp_min(1e-6)[:, None], weight


def _seg_loss(logits: Tensor, masks: Tensor, ignore_index: int) -> Tensor:
    """Soft-target cross-entropy per logit cell (:func:`_area_targets`), weighted by the cell's
    labelled fraction (0 when the batch has no labelled pixel)."""
    target, weight = _area_targets(masks, logits.shape[1], ignore_index, logits.shape[-2:])
    ce = -(target * torch.log_softmax(logits, dim=1)).sum(dim=1)
    return (ce * weight).sum() / weight.sum().clamp_min(1e-6)


def _logistic_regression(z: Tensor, y: Tensor, num_labels: int,
                         l2: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Weight [L, D] and bias [L] minimising cross-entropy + ``l2`` |W|^2 (L-BFGS, from zero)."""
    weight = torch.zeros(num_labels, z.shape[1], dtype=z.dtype, requires_grad=True)
    bias = torch.zeros(num_labels, dtype=z.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


def _standardise(x: Tensor, cols: slice) -> tuple[Tensor, Tensor]:
    """Shift and scale that standardise the columns ``cols`` of ``x`` and zero the others."""
    shift = torch.zeros(x.shape[1], dtype=x.dtype)
    scale = torch.zeros(x.shape[1], dtype=x.dtype)  # 0: the column is not used
    shift[cols] = x[:, cols].mean(0)
    scale[cols] = 1.0 / (x[:, cols].std(0, correction=0) + 1e-6)
    return shift, scale


def _fit_classifier(net: EvaluatorNet, images: Tensor, labels: Tensor,
                    device: torch.device, folds: int = 5) -> dict[str, Any]:
    """Fit ``net.classifier`` on the training ``images``: multinomial logistic regression
    (L-BFGS, a little L2) on standardised inputs, three ways: the soft pixel shares, the label
    probe's logits, both. The way with the best ``folds``-fold cross-validated accuracy is kept
    (ties: the first, fewer inputs) and fitted on all of them. Returns which, with each way's
    cross-validated accuracy."""
    assert net.classifier is not None
    net.eval()
    with torch.no_grad():
        x = torch.cat([
            net.classifier_raw_input(net(images[s : s + 256].to(device), features=False)).cpu()
            for s in range(0, images.shape[0], 256)]).double()
    y = labels.cpu()
    num_labels = net.classifier.out_features
    ways = {"shares": slice(num_labels, None), "probe": slice(0, num_labels),
            "probe+shares": slice(0, None)}
    fold = torch.arange(x.shape[0]) % max(1, min(folds, x.shape[0]))
    scores: dict[str, float] = {}
    for way, cols in ways.items():
        right = 0
        for k in fold.unique().tolist():
            train, test = fold != k, fold == k
            if not bool(train.any()):
                train = test
            shift, scale = _standardise(x[train], cols)
            weight, bias = _logistic_regression((x[train] - shift) * scale, y[train], num_labels)
            pred = (((x[test] - shift) * scale) @ weight.T + bias).argmax(1)
            right += int((pred == y[test]).sum())
        scores[way] = right / x.shape[0]
    best = max(scores, key=lambda w: scores[w])  # the first of equals: fewer inputs
    shift, scale = _standardise(x, ways[best])
    weight, bias = _logistic_regression((x - shift) * scale, y, num_labels)
    with torch.no_grad():
        net.classifier.weight.copy_(weight.float())
        net.classifier.bias.copy_(bias.float())
        net.classifier_shift.copy_(shift.float())
        net.classifier_scale.copy_(scale.float())
    return {"classifier_input": best, "classifier_cv_accuracy": scores}


@torch.no_grad()
def _set_feature_scale(net: EvaluatorNet, images: Tensor, device: torch.device) -> None:
    """Shift each feature to mean 0 and scale each :data:`FEATURE_GROUPS` group to total variance
    1 over ``images``, so every depth weighs alike in FID and in nearest-neighbour distances."""
    net.eval()
    raw = torch.cat([net.raw_features(images[s : s + 256].to(device))[0].double().cpu()
                     for s in range(0, images.shape[0], 256)])
    shift = raw.mean(dim=0)
    var = raw.var(dim=0, correction=1) if raw.shape[0] > 1 else torch.ones_like(shift)
    scale = torch.empty_like(shift)
    start = 0
    for _, dim in FEATURE_GROUPS:
        total = float(var[start : start + dim].sum())
        scale[start : start + dim] = 1.0 / max(total, 1e-12) ** 0.5
        start += dim
    net.feature_shift.copy_(shift.float())
    net.feature_scale.copy_(scale.float())


def train_evaluator(
    dataset: Any,
    config: TrainConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Evaluator:
    """Train an Evaluator on ``dataset`` (no caching); deterministic for a seed on the CPU.

    The loss is the sum of the targets' cross-entropies (:func:`targets_for`): per logit cell
    over the masks (soft area targets, :func:`_seg_loss`) and per image over the labels, or the
    rotation pretext task without either. With masks, the label loss trains only the label head
    (a linear probe on block4): through the trunk it made the net memorise the training labels
    and segment worse (on ``shapes``, accuracy read off the segmentation 0.95 -> 0.92). With
    masks and labels, ``classifier`` is fitted last (:func:`_fit_classifier`). (Holding a tenth
    of the images out of the net's training to fit it cost more accuracy than it bought.)"""
    config = config or TrainConfig()
    config.validate()
    info = _check_info(dataset)
    targets = targets_for(info)
    images, labels, masks = _load_data(dataset, config.max_train_samples, False,
                                  masks="masks" in targets)
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"dataset {info.name!r} needs at least 2 images to train on, got {n}")
    mode = "+".join(targets)
    square = info.image_size[0] == info.image_size[1]
    device = torch.device(device)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        net = _new_net(info, mode).to(device, memory_format=torch.channels_last)
        gen = torch.Generator().manual_seed(config.seed)
        steps_per_epoch = (n + config.batch_size - 1) // config.batch_size
        opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.2
        )
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.epochs * steps_per_epoch, desc=f"evaluator {info.name}")
        net.train()
        loss_sum, loss_count = 0.0, 0
        for epoch in range(config.epochs):
            perm = torch.randperm(n, generator=gen)
            last_epoch = epoch == config.epochs - 1
            for start in range(0, n, config.batch_size):
                idx = perm[start : start + config.batch_size]
                if idx.numel() < 2:  # BatchNorm needs 2+ samples
                    continue
                x = images[idx].contiguous(memory_format=torch.channels_last)
                if mode == "rotation":
                    x, y = _rotate_batch(x, square, gen)
                    loss = F.cross_entropy(net(x.to(device), features=False)["rotation"],
                                           y.to(device))
                else:
                    out = net(x.to(device), features=False)
                    loss = torch.zeros((), device=device)
                    if masks is not None:
                        loss = loss + _seg_loss(out["seg"], masks[idx].to(device),
                                                info.ignore_index)
                    if labels is not None:
                        loss = loss + F.cross_entropy(out["label_logits"],
                                                      labels[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if last_epoch:
                    loss_sum += loss.item() * idx.numel()
                    loss_count += idx.numel()
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        net.to(memory_format=torch.contiguous_format)  # as a net loaded from the cache runs
        fitted: dict[str, Any] = {}
        if net.classifier is not None:
            assert labels is not None
            fitted = _fit_classifier(net, images, labels, device)
        _set_feature_scale(net, images[:_NORM_SAMPLES], device)
    net.eval()
    meta = {
        "arch_version": ARCH_VERSION,
        "mode": mode,
        "num_labels": info.num_labels,
        "num_seg_classes": info.num_seg_classes,
        "num_train": n,
        **fitted,
        "train_seconds": time.perf_counter() - t0,
        "final_train_loss": loss_sum / max(loss_count, 1),
        **{k: getattr(config, k) for k in config.__dataclass_fields__},
    }
    return Evaluator(net=net, info=info, mode=mode, device=device, meta=meta)


def data_fingerprint(dataset: Any, n: int, k: int = 16) -> str:
    """A hash of ``k`` items (image, label, mask) evenly spread over the first ``n`` of ``dataset``.

    Part of the cache name: a dataset whose content changed under the same name and size (a new
    version of a procedural generator, edited files) gets a new evaluator instead of a stale one
    trained on other images, whose features would silently shift every FID."""
    h = hashlib.sha256()
    for i in sorted({(j * (n - 1)) // max(k - 1, 1) for j in range(min(k, n))}):
        item = dataset[i]
        for key in ("image", "label", "mask"):
            value = item.get(key) if isinstance(item, dict) else None
            if isinstance(value, torch.Tensor):
                h.update(key.encode())
                h.update(value.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key_for(info: DatasetInfo) -> str:
    """The evaluator cache name of a dataset: its name (made file-name safe: ``image_folder:my
    photos`` -> ``image_folder-my-photos``), image size and channels."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", info.name).strip("-._") or "data"
    return f"{name}-{info.image_size[0]}x{info.image_size[1]}-c{info.channels}"


def _cache_name(cache_key: str, info: DatasetInfo, n: int, config: TrainConfig,
                data: str) -> str:
    spec = {
        "data": data,
        "arch_version": ARCH_VERSION,
        "channels": info.channels,
        "image_size": list(info.image_size),
        "num_labels": info.num_labels,
        "num_seg_classes": info.num_seg_classes,
        "num_train": n,
        **{k: getattr(config, k) for k in config.__dataclass_fields__},
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return f"{cache_key}-{digest}.pt"


def _save(ev: Evaluator, path: Path) -> None:
    """Write atomically (temp file in the same folder, then os.replace): no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in ev.net.state_dict().items()}
    payload = {"meta": dict(ev.meta), "state_dict": state}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path, info: DatasetInfo, device: torch.device) -> Evaluator:
    """Load a cached evaluator; raises ValueError when the file is unreadable or does not fit."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated / foreign file
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(
            f"unreadable evaluator cache file {path} ({type(exc).__name__}: {first_line})"
        ) from exc
    try:
        meta, state = payload["meta"], payload["state_dict"]
        if meta["arch_version"] != ARCH_VERSION:
            raise ValueError(f"arch_version {meta['arch_version']} != {ARCH_VERSION}")
        want = "+".join(targets_for(info))
        if meta["mode"] != want:
            raise ValueError(f"trained on {meta['mode']!r}, but this dataset gives {want!r}")
        if (meta["num_labels"], meta["num_seg_classes"]) != (info.num_labels,
                                                             info.num_seg_classes):
            raise ValueError(f"trained for {meta['num_labels']} labels and "
                             f"{meta['num_seg_classes']} segmentation classes")
        net = _new_net(info, meta["mode"])
        net.load_state_dict(state)
    except Exception as exc:
        raise ValueError(f"evaluator cache file {path} does not fit this dataset: {exc}") from exc
    net.to(device).eval()
    return Evaluator(
        net=net, info=info, mode=meta["mode"], device=device, cache_path=path, meta=meta
    )


def get_evaluator(
    dataset: Any,
    cache_key: str,
    cache_dir: str | os.PathLike[str] | None = None,
    epochs: int = TrainConfig.epochs,
    seed: int = TrainConfig.seed,
    device: str | torch.device = "cpu",
    progress: bool = False,
    *,
    lr: float = TrainConfig.lr,
    batch_size: int = TrainConfig.batch_size,
    max_train_samples: int = TrainConfig.max_train_samples,
) -> Evaluator:
    """The evaluator for ``dataset`` (its train split), loaded from the cache or trained and cached.

    ``cache_key`` names the dataset (e.g. ``"shapes-32"``); a fingerprint of the data joins it in
    the file name (:func:`data_fingerprint`), so changed content trains anew. ``cache_dir`` (default ``default_cache_dir()``)
    is the folder holding the ``.pt`` files. A corrupt or unfitting cache file is not trusted: a
    warning names it, the evaluator is retrained and the file overwritten.
    """
    if not isinstance(cache_key, str) or not _KEY_RE.match(cache_key):
        raise ValueError(
            f"cache_key must be a non-empty file-name-safe string (letters, digits, '.', '_', "
            f"'-'), got {cache_key!r}"
        )
    config = TrainConfig(
        epochs=epochs, seed=seed, lr=lr, batch_size=batch_size, max_train_samples=max_train_samples
    )
    config.validate()
    info = getattr(dataset, "info", None)
    if not isinstance(info, DatasetInfo):
        raise TypeError(
            f"dataset must have an .info DatasetInfo (mtcore.data), got {type(dataset).__name__}"
        )
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    n = min(len(dataset), config.max_train_samples)
    path = folder / _cache_name(cache_key, info, n, config, data_fingerprint(dataset, n))
    dev = torch.device(device)
    if path.exists():
        try:
            return _load(path, info, dev)
        except ValueError as exc:
            warnings.warn(f"{exc}; retraining the evaluator", RuntimeWarning, stacklevel=2)
    ev = train_evaluator(dataset, config, device=dev, progress=progress)
    try:
        _save(ev, path)
        ev.cache_path = path
    except OSError as exc:
        warnings.warn(
            f"could not write evaluator cache {path}: {exc}", RuntimeWarning, stacklevel=2
        )
    return ev


__all__: Sequence[str] = (
    "ARCH_VERSION",
    "FEATURE_DIM",
    "Evaluator",
    "EvaluatorNet",
    "TrainConfig",
    "data_fingerprint",
    "default_cache_dir",
    "get_evaluator",
    "load_images",
    "train_evaluator",
)

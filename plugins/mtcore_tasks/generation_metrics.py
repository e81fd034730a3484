"""Offline generation metrics on a per-dataset evaluator's features: FID, precision/recall, labels,
and the classifier two-sample test, each beside its real-vs-real baseline.

These are NOT the ImageNet-Inception FID / precision / recall of the literature: the features come
from the small ``evaluator.Evaluator`` trained on one dataset (its masks and labels; see there),
so the numbers are comparable only between models scored on the same dataset, with the same
evaluator and the same sample count. :func:`head_generation_metrics` is what the built-in
generative heads report; :class:`RealReference` holds the real images they are scored against and
the same metrics between two disjoint real sets (the best a generator can hope for).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .c2st import C2STConfig, c2st_accuracy
from .evaluator import Evaluator, cache_key_for, data_fingerprint, get_evaluator, load_images


def _as_feats(x: Any, name: str) -> Tensor:
    """A finite float64 [N, D] copy of ``x`` (tensor or array), or a clear error naming ``name``."""
    if not isinstance(x, Tensor):
        if type(x).__module__ == "numpy":
            x = torch.from_numpy(x)
        else:
            raise TypeError(f"{name} must be a torch.Tensor [N, D], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D feature tensor [N, D], got shape {tuple(x.shape)}")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must be a float tensor, got dtype {x.dtype}")
    x = x.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} of shape {tuple(x.shape)} holds NaN or inf values")
    return x


def feature_statistics(feats: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N >= 2."""
    x = _as_feats(feats, "feats")
    if x.shape[0] < 2:
        raise ValueError(
            f"feats needs at least 2 rows for a covariance, got shape {tuple(x.shape)}"
        )
    mu = x.mean(dim=0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def _sym_sqrt(s: Tensor) -> Tensor:
    """Square root of a symmetric PSD matrix via eigh; tiny negative eigenvalues clamped to 0."""
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance_from_stats(
    mu_a: Tensor, sigma_a: Tensor, mu_b: Tensor, sigma_b: Tensor
) -> float:
    """Frechet distance of two Gaussians (Heusel et al. 2017, "GANs Trained by a Two Time-Scale
    Update Rule..."): ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}).

    Tr (S_a S_b)^{1/2} is the sum of square roots of the eigenvalues of sqrt(S_a) S_b sqrt(S_a),
    which is symmetric PSD and shares its eigenvalues with S_a S_b; computed in float64.
    """
    mu_a, mu_b = mu_a.to(torch.float64), mu_b.to(torch.float64)
    sigma_a, sigma_b = sigma_a.to(torch.float64), sigma_b.to(torch.float64)
    d = mu_a.shape[0]
    for name, t, shape in (
        ("mu_b", mu_b, (d,)),
        ("sigma_a", sigma_a, (d, d)),
        ("sigma_b", sigma_b, (d, d)),
    ):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} to match mu_a, got {tuple(t.shape)}")
    root_a = _sym_sqrt(sigma_a)
    m = root_a @ sigma_b @ root_a
    eig = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0)
    diff = mu_a - mu_b
    value = diff @ diff + torch.trace(sigma_a) + torch.trace(sigma_b) - 2 * eig.sqrt().sum()
    return max(float(value), 0.0)  # the true value is >= 0; rounding may dip just below


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """FID-style Frechet distance between Gaussians fitted to features [N_a, D] and [N_b, D].

    Not ImageNet-Inception FID: comparable only within one dataset and evaluator (and sample count,
    since the estimate is biased upwards for small N).
    """
    a, b = _as_feats(feats_a, "feats_a"), _as_feats(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feats_a and feats_b must have the same feature size, got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )
    for name, x in (("feats_a", a), ("feats_b", b)):
        if x.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 rows, got shape {tuple(x.shape)}")
    return frechet_distance_from_stats(*feature_statistics(a), *feature_statistics(b))


def _check_groups(groups: Any, dim: int) -> tuple[int, ...]:
    sizes = tuple(groups)
    if not sizes or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in sizes):
        raise ValueError(f"groups must be positive ints (feature counts), got {groups!r}")
    if sum(sizes) != dim:
        raise ValueError(f"groups {sizes} add up to {sum(sizes)}, but the features have {dim}")
    return sizes


def grouped_frechet_distance(feats_a: Tensor, feats_b: Tensor, groups: Any) -> float:
    """The sum of the Frechet distances of consecutive feature groups (``groups``: their sizes,
    e.g. one group per network depth): FID with the covariances between groups left out.

    With a few hundred samples, the estimation noise of the cross-group covariances of a few
    hundred features inflates even two real sets' FID (on ``shapes``, 500 images, the evaluator's
    features: 0.167 joint against 0.076 grouped) and hides what differs within one group, such as
    the early layers' texture statistics. Equal to :func:`frechet_distance` for one group.
    """
    a, b = _as_feats(feats_a, "feats_a"), _as_feats(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feats_a and feats_b must have the same feature size, got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )
    total, start = 0.0, 0
    for size in _check_groups(groups, a.shape[1]):
        total += frechet_distance(a[:, start : start + size], b[:, start : start + size])
        start += size
    return total


def _kth_nn_radii(x: Tensor, k: int, batch_size: int) -> Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row (the row itself excluded)."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        d = torch.cdist(x[start : start + batch_size], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the smallest (k=0th) is the row itself
    return torch.cat(out)


def _covered(query: Tensor, ref: Tensor, radii: Tensor, batch_size: int) -> Tensor:
    """For each query row: is it inside some ball (ref_i, radii_i)?"""
    out = []
    for start in range(0, query.shape[0], batch_size):
        d = torch.cdist(query[start : start + batch_size], ref)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(
    real_feats: Tensor, fake_feats: Tensor, k: int = 3, batch_size: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union
    of balls reaching every sample's k-th nearest neighbour in its own set; precision is the
    fraction of fake samples inside the real manifold, recall of real samples inside the fake one.

    Not the Inception-feature numbers of the paper: comparable only within one dataset and
    evaluator.
    """
    real, fake = _as_feats(real_feats, "real_feats"), _as_feats(fake_feats, "fake_feats")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"real_feats and fake_feats must have the same feature size, got {tuple(real.shape)} "
            f"and {tuple(fake.shape)}"
        )
    for name, x in (("real_feats", real), ("fake_feats", fake)):
        if x.shape[0] <= k:
            raise ValueError(f"{name} needs more than k={k} rows, got shape {tuple(x.shape)}")
    real_r = _kth_nn_radii(real, k, batch_size)
    fake_r = _kth_nn_radii(fake, k, batch_size)
    precision = _covered(fake, real, real_r, batch_size).double().mean()
    recall = _covered(real, fake, fake_r, batch_size).double().mean()
    return float(precision), float(recall)


def _check_labels(evaluator: Evaluator, images: Tensor, requested_labels: Tensor) -> Tensor:
    """``requested_labels`` as int64 on the CPU, checked against ``images`` and the evaluator."""
    if not isinstance(requested_labels, Tensor):
        raise TypeError(
            f"requested_labels must be an int64 tensor [N], got {type(requested_labels).__name__}"
        )
    if requested_labels.dim() != 1 or requested_labels.is_floating_point():
        raise ValueError(
            f"requested_labels must be a 1-D integer tensor [N], got shape "
            f"{tuple(requested_labels.shape)} dtype {requested_labels.dtype}"
        )
    if (
        not isinstance(images, Tensor)
        or images.dim() < 1
        or images.shape[0] != requested_labels.shape[0]
    ):
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(
            f"images and requested_labels must have the same N, got images {got} and "
            f"requested_labels {tuple(requested_labels.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError("images is empty: class consistency is undefined")
    evaluator._need_classifier()
    n_labels = evaluator.num_labels
    labels = requested_labels.cpu().long()
    if n_labels and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(
            f"requested_labels must lie in [0, {n_labels}), got min {int(labels.min())} "
            f"max {int(labels.max())}"
        )
    return labels


def class_consistency(evaluator: Evaluator, images: Tensor, requested_labels: Tensor) -> float:
    """Fraction of ``images`` the evaluator classifies as ``requested_labels`` (conditional
    generation: does the sample show the class it was asked for?). Bounded by evaluator accuracy.
    """
    labels = _check_labels(evaluator, images, requested_labels)
    pred = evaluator.predict(images)
    return float((pred == labels).double().mean())


class GenerationMetrics:
    """Scores generated images against a fixed real set: {"fid", "precision", "recall"} plus
    "class_consistency" when the requested labels are given. "fid" is the
    :func:`grouped_frechet_distance` over the evaluator's feature groups (one per depth).

    ``real`` is real images [N, C, H, W] in [0, 1] or their evaluator features [N, D]. With
    ``num_samples``, a seeded random ``num_samples`` of the real set and the first ``num_samples``
    generated images are used, so every model is scored with the same sample count (FID is biased
    by N). Not ImageNet-Inception FID: comparable only within one dataset and evaluator.
    """

    def __init__(
        self,
        evaluator: Evaluator,
        real: Tensor,
        num_samples: int | None = None,
        k: int = 3,
        seed: int = 0,
    ) -> None:
        if not isinstance(real, Tensor):
            raise TypeError(
                f"real must be images [N, C, H, W] or features [N, D], got {type(real).__name__}"
            )
        if num_samples is not None and (
            isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= k
        ):
            raise ValueError(f"num_samples must be an int > k={k}, got {num_samples!r}")
        if real.dim() == 4:
            feats = evaluator.features(real)
        elif real.dim() == 2:
            if real.shape[1] != evaluator.feature_dim:
                raise ValueError(
                    f"real features must have {evaluator.feature_dim} columns (the evaluator's "
                    f"feature size), got shape {tuple(real.shape)}"
                )
            feats = real
        else:
            raise ValueError(
                "real must be images [N, C, H, W] or features [N, D], "
                f"got shape {tuple(real.shape)}"
            )
        feats = _as_feats(feats, "real")
        if num_samples is not None:
            if feats.shape[0] < num_samples:
                raise ValueError(
                    f"real has {feats.shape[0]} samples, fewer than num_samples={num_samples}"
                )
            gen = torch.Generator().manual_seed(seed)
            feats = feats[torch.randperm(feats.shape[0], generator=gen)[:num_samples]]
        self.evaluator = evaluator
        self.num_samples = num_samples
        self.k = k
        self.real_feats = feats
        self.groups = _check_groups(evaluator.feature_groups, feats.shape[1])
        self.real_stats = [feature_statistics(g) for g in feats.split(self.groups, dim=1)]

    def __call__(self, fake_images: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        """Metrics of generated images [M, C, H, W] in [0, 1] (and their requested labels)."""
        if not isinstance(fake_images, Tensor) or fake_images.dim() != 4:
            got = (
                tuple(fake_images.shape)
                if isinstance(fake_images, Tensor)
                else type(fake_images).__name__
            )
            raise ValueError(f"fake_images must be a tensor [M, C, H, W], got {got}")
        if labels is not None and (not isinstance(labels, Tensor)
                                   or labels.shape[:1] != fake_images.shape[:1]):
            got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"labels must hold one label per image: {fake_images.shape[0]} "
                             f"fake_images, labels {got}")
        if self.num_samples is not None:
            if fake_images.shape[0] < self.num_samples:
                raise ValueError(
                    f"fake_images has {fake_images.shape[0]} samples, fewer than "
                    f"num_samples={self.num_samples}"
                )
            fake_images = fake_images[: self.num_samples]
            if labels is not None:
                labels = labels[: self.num_samples]
        if labels is not None:
            _check_labels(self.evaluator, fake_images, labels)
            feats, pred = self.evaluator.embed(fake_images)
        else:
            feats, pred = self.evaluator.features(fake_images), None
        fake = _as_feats(feats, "fake features")
        if fake.shape[0] <= self.k:
            raise ValueError(f"fake_images needs more than k={self.k} samples, got {fake.shape[0]}")
        out = {"fid": sum(
            frechet_distance_from_stats(*real, *feature_statistics(f))
            for real, f in zip(self.real_stats, fake.split(self.groups, dim=1), strict=True)
        )}
        out["precision"], out["recall"] = precision_recall(self.real_feats, fake, k=self.k)
        if labels is not None and pred is not None:
            out["class_consistency"] = float((pred == labels.cpu().long()).double().mean())
        return out


def _subset(dataset: Any, start: int, n: int) -> Tensor:
    """Images ``start`` .. ``start + n - 1`` of ``dataset``, stacked [n, C, H, W]."""
    return torch.stack([dataset[i]["image"] for i in range(start, start + n)]).float()


class RealReference:
    """The real images generated ones are scored against (the first ``n`` of ``datasets[split]``)
    and the real-vs-real baseline of every metric.

    The baseline compares them with ``n`` other real images: the first ``n`` of the training split
    (the next ``n`` of ``split`` when it is the training split or there is none). Both sets are
    real, so its FID, precision, recall and C2ST show what a perfect generator would score at this
    sample count (FID > 0, precision and recall < 1, C2ST near 0.5); its class consistency is the
    evaluator's accuracy on the reference images with their true labels.
    """

    def __init__(self, evaluator: Evaluator, datasets: Mapping[str, Any], split: str, n: int,
                 k: int = 3, c2st: C2STConfig | None = None) -> None:
        ref = datasets[split]
        if isinstance(n, bool) or not isinstance(n, int) or n <= k:
            raise ValueError(f"n must be an int > k={k}, got {n!r}")
        n = min(n, len(ref))
        if n <= k:
            raise ValueError(f"split {split!r} has {len(ref)} images; the metrics need more "
                             f"than k={k}")
        self.evaluator, self.split, self.n, self.k = evaluator, split, n, k
        self.c2st_config = c2st or C2STConfig()
        self.images = _subset(ref, 0, n)
        self.labels: Tensor | None = None
        if ref.info.has_labels:
            self.labels = load_images(ref, n, require_labels=True)[1]
        self.metrics = GenerationMetrics(evaluator, self.images, k=k)
        train = datasets.get("train")
        self._other: tuple[Any, int] | None = None
        if train is not None and train is not ref and len(train) >= n:
            self._other = (train, 0)
        elif len(ref) >= 2 * n:
            self._other = (ref, n)
        self._baseline: dict[str, float] | None = None

    def score(self, fake: Tensor, labels: Tensor | None = None, c2st: bool = False
              ) -> dict[str, float]:
        """fid, precision, recall (+ class_consistency with ``labels``; + c2st) of ``fake``."""
        out = self.metrics(fake, labels=labels)
        if c2st:
            out["c2st"] = c2st_accuracy(self.images, fake, self.c2st_config)
        return out

    def baseline(self) -> dict[str, float]:
        """The same metrics between two disjoint real sets of ``n`` images (computed once);
        {} when there are not enough real images for a second set."""
        if self._baseline is None:
            self._baseline = {}
            if self._other is not None:
                other = _subset(self._other[0], self._other[1], self.n)
                self._baseline = self.score(other, c2st=True)
                if self.labels is not None and self.evaluator.num_labels:
                    pred = self.evaluator.predict(self.images)
                    self._baseline["class_consistency"] = float(
                        (pred == self.labels).double().mean())
        return dict(self._baseline)


_REFERENCES: OrderedDict[tuple[Any, ...], RealReference] = OrderedDict()
_MAX_REFERENCES = 4


def real_reference(evaluator: Evaluator, datasets: Mapping[str, Any], split: str,
                   n: int) -> RealReference:
    """The :class:`RealReference` of this evaluator, split and size, built once per process (the
    generative heads of a run share it, and every epoch reuses it)."""
    ref = datasets[split]
    train = datasets.get("train")
    key = (str(evaluator.cache_path) if evaluator.cache_path else id(evaluator.net),
           split, n, len(ref), data_fingerprint(ref, len(ref)),
           None if train is None else (len(train), data_fingerprint(train, len(train))))
    found = _REFERENCES.get(key)
    if found is None:
        found = _REFERENCES[key] = RealReference(evaluator, datasets, split, n)
        while len(_REFERENCES) > _MAX_REFERENCES:
            _REFERENCES.popitem(last=False)
    else:
        found.evaluator = found.metrics.evaluator = evaluator
        _REFERENCES.move_to_end(key)
    return found


def head_generation_metrics(head: Any, datasets: Mapping[str, Any], split: str, num_samples: int,
                            seed: int, conditional: bool, final: bool = True) -> dict[str, float]:
    """A generative head's metrics against ``datasets[split]`` in the cached evaluator's features
    (trained on ``datasets["train"]``): ``fid``, ``precision``, ``recall`` and, for a conditional
    head on labelled data, ``class_consistency`` (samples asked for label ``i % num_labels``,
    judged by the evaluator's classifier, which the generator never trains against).

    With ``final`` (the untrained and the last evaluation) also ``c2st`` and the real-vs-real
    baseline of each metric, under the metric's name plus ``_real`` (``fid_real``, ...); the
    per-epoch calls (``final=False``) skip them, as the C2ST trains a network each time.
    """
    train, ref = datasets.get("train"), datasets[split]
    info = ref.info
    device = next(head.parameters()).device
    ev = get_evaluator(train if train is not None else ref, cache_key_for(info), seed=0,
                       device=device)
    reference = real_reference(ev, datasets, split, num_samples)
    n = reference.n
    gen = torch.Generator().manual_seed(seed + 7)
    labels = None
    if conditional and info.num_labels and ev.num_labels:
        labels = torch.arange(n) % info.num_labels
    fake = head.sample(n, labels=labels, generator=gen)
    out = reference.score(fake.float().cpu(), labels, c2st=final)
    if final:
        base = reference.baseline()
        out.update({f"{k}_real": v for k, v in base.items() if k in out})
    return {k: float(v) for k, v in out.items()}


__all__ = [
    "GenerationMetrics",
    "RealReference",
    "class_consistency",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_stats",
    "grouped_frechet_distance",
    "head_generation_metrics",
    "precision_recall",
    "real_reference",
]

"""A small per-dataset CNN whose features stand in for Inception in offline generation metrics.

One evaluator is trained once per dataset on its train split and cached on disk at
``$MTCORE_CACHE/evaluators/<cache_key>-<hash>.pt`` (default root ``~/.cache/mtcore``), where the
hash covers the architecture version, every training parameter and a fingerprint of the data (16
training items spread over the split), so changed data cannot reuse a stale evaluator. A labelled dataset trains it
as a classifier on its labels; a dataset without labels trains it on the rotation-prediction
pretext task (Gidaris et al. 2018, "Unsupervised Representation Learning by Predicting Image
Rotations"): each training image is turned by a random one of 0/90/180/270 degrees (0/180 when
not square) and the net predicts which. Either way ``Evaluator.features`` is the 128-d pooled trunk
output. Rotation features are weak on rotation-symmetric images; labels give better features.
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

ARCH_VERSION = 1  # bump on any change to EvaluatorNet or the training recipe: it invalidates caches
FEATURE_DIM = 128
_WIDTHS = (32, 64, FEATURE_DIM)
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_RANGE_TOL = 1e-3


def default_cache_dir() -> Path:
    """Cached evaluators' folder: ``$MTCORE_CACHE/evaluators`` or ``~/.cache/mtcore/evaluators``."""
    base = os.environ.get("MTCORE_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "mtcore"
    return root / "evaluators"


def first_stride(image_size: tuple[int, int]) -> int:
    """Stride of the first conv: 2 for images of side >= 32 (4x less compute), else 1."""
    return 2 if min(image_size) >= 32 else 1


class EvaluatorNet(nn.Module):
    """Three conv-BN-ReLU blocks (the first two max-pooled), global average pool, linear head."""

    def __init__(self, channels: int, num_outputs: int, stride: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = channels
        for i, c_out in enumerate(_WIDTHS):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=stride if i == 0 else 1, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            if i < len(_WIDTHS) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(FEATURE_DIM, num_outputs)

    def features(self, x: Tensor) -> Tensor:
        """[N, C, H, W] in [0, 1] -> [N, FEATURE_DIM] pooled trunk features."""
        return self.trunk(x * 2.0 - 1.0).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights besides the data; hashed into the cache name."""

    epochs: int = 8
    seed: int = 0
    lr: float = 3e-3
    batch_size: int = 64
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


@dataclass
class Evaluator:
    """A trained EvaluatorNet plus what it was trained on; all methods run in eval mode, no grad."""

    net: EvaluatorNet
    info: DatasetInfo
    mode: str  # "labels" (classifier on the dataset labels) or "rotation" (pretext task)
    device: torch.device
    cache_path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # training params, time, final train loss

    @property
    def feature_dim(self) -> int:
        return FEATURE_DIM

    @property
    def num_labels(self) -> int:
        """Number of dataset labels the evaluator predicts (0 for a rotation-pretext evaluator)."""
        return self.info.num_labels if self.mode == "labels" else 0

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

    @torch.inference_mode()
    def _run(self, images: Tensor, batch_size: int, head: bool) -> Tensor:
        self._check_images(images)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.net.eval()
        outs = []
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(self.device, torch.float32)
            x = x.clamp(0.0, 1.0)
            out = self.net(x) if head else self.net.features(x)
            outs.append(out.float().cpu())
        if not outs:
            return torch.empty(0, self.net.head.out_features if head else FEATURE_DIM)
        return torch.cat(outs)

    def features(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Trunk features of ``images`` [N, C, H, W] in [0, 1] as float32 [N, 128] on the CPU."""
        return self._run(images, batch_size, head=False)

    def predict(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Predicted dataset labels [N] (int64, CPU); needs an evaluator trained on labels."""
        if self.mode != "labels":
            raise ValueError(
                f"this evaluator for {self.info.name!r} was trained on the rotation pretext task "
                "(the dataset has no labels), so it cannot predict labels"
            )
        return self._run(images, batch_size, head=True).argmax(dim=1)

    def accuracy_on(self, dataset: Any, batch_size: int = 256) -> float:
        """Fraction of ``dataset`` items whose label the evaluator predicts correctly."""
        images, labels = load_images(dataset, require_labels=True)
        if images.shape[0] == 0:
            raise ValueError("dataset is empty: accuracy is undefined")
        pred = self.predict(images, batch_size)
        return float((pred == labels).double().mean())


def load_images(
    dataset: Any, max_samples: int | None = None, require_labels: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Stack the first ``max_samples`` items of ``dataset``: images [N, C, H, W], labels [N]."""
    info = getattr(dataset, "info", None)
    if not isinstance(info, DatasetInfo):
        raise TypeError(
            f"dataset must have an .info DatasetInfo (mtcore.data), got {type(dataset).__name__}"
        )
    if require_labels and not info.has_labels:
        raise ValueError(f"dataset {info.name!r} has no labels (info.num_labels == 0)")
    n = len(dataset)
    if max_samples is not None:
        n = min(n, max_samples)
    c, (h, w) = info.channels, info.image_size
    images = torch.empty(n, c, h, w, dtype=torch.float32)
    labels = torch.empty(n, dtype=torch.int64) if info.has_labels else None
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
    if labels is not None and n and (labels.min() < 0 or labels.max() >= info.num_labels):
        raise ValueError(
            f"dataset {info.name!r} labels must lie in [0, {info.num_labels}), "
            f"got min {int(labels.min())} max {int(labels.max())}"
        )
    return images, labels


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


def train_evaluator(
    dataset: Any,
    config: TrainConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Evaluator:
    """Train an Evaluator on ``dataset`` (no caching); deterministic for a seed on the CPU."""
    config = config or TrainConfig()
    config.validate()
    images, labels = load_images(dataset, config.max_train_samples)
    info: DatasetInfo = dataset.info
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"dataset {info.name!r} needs at least 2 images to train on, got {n}")
    mode = "labels" if labels is not None else "rotation"
    square = info.image_size[0] == info.image_size[1]
    num_outputs = info.num_labels if mode == "labels" else (4 if square else 2)
    device = torch.device(device)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        net = EvaluatorNet(info.channels, num_outputs, first_stride(info.image_size)).to(device)
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
                x = images[idx]
                if mode == "labels":
                    y = labels[idx]  # type: ignore[index]
                else:
                    x, y = _rotate_batch(x, square, gen)
                loss = F.cross_entropy(net(x.to(device)), y.to(device))
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
    net.eval()
    meta = {
        "arch_version": ARCH_VERSION,
        "mode": mode,
        "num_outputs": num_outputs,
        "num_train": n,
        "train_seconds": time.perf_counter() - t0,
        "final_train_loss": loss_sum / max(loss_count, 1),
        **{k: getattr(config, k) for k in config.__dataclass_fields__},
    }
    return Evaluator(net=net, info=info, mode=mode, device=device, meta=meta)


def data_fingerprint(dataset: Any, n: int, k: int = 16) -> str:
    """A hash of ``k`` items (image and label) evenly spread over the first ``n`` of ``dataset``.

    Part of the cache name: a dataset whose content changed under the same name and size (a new
    version of a procedural generator, edited files) gets a new evaluator instead of a stale one
    trained on other images, whose features would silently shift every FID."""
    h = hashlib.sha256()
    for i in sorted({(j * (n - 1)) // max(k - 1, 1) for j in range(min(k, n))}):
        item = dataset[i]
        for key in ("image", "label"):
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
        want = ("labels", info.num_labels) if info.has_labels else ("rotation", None)
        if meta["mode"] != want[0] or (want[1] is not None and meta["num_outputs"] != want[1]):
            raise ValueError(f"trained as {meta['mode']!r} with {meta['num_outputs']} outputs")
        net = EvaluatorNet(info.channels, int(meta["num_outputs"]), first_stride(info.image_size))
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
    epochs: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    *,
    lr: float = 3e-3,
    batch_size: int = 64,
    max_train_samples: int = 20000,
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

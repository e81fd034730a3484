"""The user's own images, with optional index masks and a labels CSV, from a plain folder.

Layout (per split folder, or at the root when there are no split folders)::

    images/<stem>.{png,jpg,jpeg,bmp}
    masks/<stem>.png        optional; pixel value = class index, 255 = ignore
    labels.csv              optional; header ``filename,label``

Every problem found is reported with the file it concerns, since a user's folder is the input.
"""

from __future__ import annotations

import csv
import inspect
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mtcore.plugin import SPLITS, DatasetInfo, image_pixels, open_image, upright_size

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
IGNORE_INDEX = 255
# preload="auto" keeps a split's pixels in memory up to this many bytes (uint8 images and masks)
PRELOAD_LIMIT = 1 << 30
_INDEX_MODES = ("1", "L", "P", "I", "I;16")


@dataclass(frozen=True)
class _Folder:
    """One split's files: images by stem, and the optional masks folder and labels CSV."""

    root: Path
    images: dict[str, Path]
    masks_dir: Path | None
    labels_csv: Path | None


def _scan(root: Path) -> _Folder:
    """List ``root/images`` and check that masks pair one-to-one with images."""
    image_dir = root / "images"
    if not image_dir.is_dir():
        raise ValueError(
            f"image folder {image_dir} does not exist (expected images/ inside {root})"
        )
    images: dict[str, Path] = {}
    for path in sorted(image_dir.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.stem in images:
            raise ValueError(
                f"two images share the stem {path.stem!r}: {images[path.stem]} and {path}; "
                "masks and labels are matched by stem, so rename one"
            )
        images[path.stem] = path
    if not images:
        raise ValueError(
            f"empty folder: no images ({', '.join(IMAGE_EXTENSIONS)}) found in {image_dir}"
        )
    masks_dir = root / "masks" if (root / "masks").is_dir() else None
    if masks_dir is not None:
        for path in sorted(masks_dir.iterdir()):
            if path.name.startswith("."):
                continue
            if path.suffix.lower() != ".png":
                raise ValueError(f"mask {path} is not a .png; masks must be lossless PNG files")
            if path.stem not in images:
                raise ValueError(f"mask {path} has no image: no {image_dir}/{path.stem}.* file")
        for stem, path in images.items():
            if not (masks_dir / f"{stem}.png").is_file():
                raise ValueError(f"missing mask for image {path}: expected {masks_dir}/{stem}.png")
    labels_csv = root / "labels.csv" if (root / "labels.csv").is_file() else None
    return _Folder(root, images, masks_dir, labels_csv)


def _read_labels(folder: _Folder, label_names: Sequence[str] | None) -> dict[str, int]:
    """Map each image stem to its label from ``labels.csv``; every image must have exactly one."""
    assert folder.labels_csv is not None
    path = folder.labels_csv
    by_name = {name: i for i, name in enumerate(label_names)} if label_names else {}
    file_names = {p.name: stem for stem, p in folder.images.items()}
    labels: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = [f.strip() for f in reader.fieldnames or []]
        if "filename" not in fields or "label" not in fields:
            raise ValueError(f"{path}: header must be 'filename,label', got {fields}")
        reader.fieldnames = fields
        for line, row in enumerate(reader, start=2):
            name, value = (row["filename"] or "").strip(), (row["label"] or "").strip()
            if name not in file_names:
                raise ValueError(
                    f"{path} line {line}: row for a missing file {name!r} "
                    f"(no such image in {folder.root / 'images'})"
                )
            stem = file_names[name]
            if stem in labels:
                raise ValueError(f"{path} line {line}: {name!r} is listed twice")
            try:
                label = int(value)
            except ValueError:
                if value not in by_name:
                    known = f"label_names={list(label_names)}" if label_names else "no label_names"
                    raise ValueError(
                        f"{path} line {line}: unknown label name {value!r} for {name!r} "
                        f"({known}; a label is an int or one of label_names)"
                    ) from None
                label = by_name[value]
            if label < 0 or (label_names and label >= len(label_names)):
                raise ValueError(
                    f"{path} line {line}: label {label} for {name!r} is out of range "
                    + (f"0..{len(label_names) - 1} of label_names" if label_names else "(negative)")
                )
            labels[stem] = label
    for stem, image_path in folder.images.items():
        if stem not in labels:
            raise ValueError(f"image {image_path} is missing from {path}")
    return labels


def _mask_indices(path: Path, palette: np.ndarray | None) -> tuple[np.ndarray, tuple[int, int]]:
    """Read a mask PNG as class indices [H, W] (int64) and return them with the PIL size."""
    mask = open_image(path)
    if mask.mode in _INDEX_MODES:
        return np.asarray(mask, dtype=np.int64), mask.size
    if mask.mode in ("RGB", "RGBA"):
        if palette is None:
            raise ValueError(
                f"mask {path} is an {mask.mode} colour image; save it as an index PNG (mode L or "
                "P, pixel value = class) or pass palette=[[r, g, b], ...] (one colour per class)"
            )
        rgb = np.asarray(mask.convert("RGB"), dtype=np.int64)
        codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        keys = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
        order = np.argsort(keys)
        pos = np.clip(np.searchsorted(keys[order], codes), 0, len(keys) - 1)
        found = keys[order][pos] == codes
        if not found.all():
            y, x = np.argwhere(~found)[0]
            raise ValueError(
                f"mask {path} has colour {tuple(int(c) for c in rgb[y, x])} at (x={x}, y={y}) "
                "that is not in palette"
            )
        return order[pos], mask.size
    raise ValueError(f"mask {path} has unsupported PNG mode {mask.mode!r}; use L or P (indices)")


def _check_palette(palette: Sequence[Sequence[int]] | None) -> np.ndarray | None:
    if palette is None:
        return None
    array = np.asarray(palette)
    if array.ndim != 2 or array.shape[1] != 3 or len(array) == 0 or array.dtype.kind not in "iu":
        raise ValueError(f"palette must be a non-empty list of [r, g, b] ints, got {palette!r}")
    if array.min() < 0 or array.max() > 255:
        raise ValueError(f"palette colours must be in 0..255, got {palette!r}")
    if len({tuple(c) for c in array.tolist()}) != len(array):
        raise ValueError(f"palette has a repeated colour: {palette!r}")
    if len(array) > IGNORE_INDEX:
        raise ValueError(f"palette has {len(array)} colours; at most {IGNORE_INDEX} classes")
    return array.astype(np.int64)


def _max_mask_value(paths: Sequence[Path], palette: np.ndarray | None) -> int:
    """Largest class index in the masks, not counting the ignore value (-1 when none)."""
    best = -1
    for path in paths:
        values = _mask_indices(path, palette)[0]
        values = values[values != IGNORE_INDEX]
        if values.size:
            best = max(best, int(values.max()))
    return best


class ImageFolderDataset(Dataset):
    """A user's images (and optional masks/labels) from ``root``.

    If ``root/train/`` exists, each split reads ``root/<split>/``; otherwise the files under
    ``root`` are split into train/val by a seeded shuffle (``val_fraction``; no test split).
    ``num_seg_classes``, when not given, is ``len(class_names)`` or ``len(palette)``, else the
    largest mask value (255 = ignore excluded) + 1 over all splits' masks; ``class_names`` name
    the segmentation classes by mask value (default ``class_0``, ``class_1``, ...); labels without
    ``label_names`` are ints and count max + 1 over all splits. Images are read upright (EXIF
    orientation), resized bilinear and masks nearest to ``size`` (an int or (height, width)).

    ``preload``: True decodes every file at construction (in threads) and keeps the resized
    pixels in memory as uint8; False reads each item's files when it is asked for (for sets too
    large for memory; ``data.num_workers`` then decodes in parallel); "auto" (default) preloads
    when the split's resized pixels take at most ``PRELOAD_LIMIT`` bytes (1 GiB). Either way
    the files' sizes, the masks' pairing and the labels are checked at construction; a mask value
    out of range is found then when preloading or inferring ``num_seg_classes``, else when the
    item is read (the error names the file either way).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: int | tuple[int, int] = 32,
        num_seg_classes: int | None = None,
        label_names: Sequence[str] | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
        channels: int = 3,
        palette: Sequence[Sequence[int]] | None = None,
        preload: bool | str = "auto",
        class_names: Sequence[str] | None = None,
    ) -> None:
        if not (isinstance(preload, bool) or preload == "auto"):
            raise ValueError(f"preload must be true, false or \"auto\", got {preload!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        pair = (size, size) if isinstance(size, int) else size
        if not (
            isinstance(pair, (tuple, list))
            and len(pair) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in pair)
        ):
            raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
        height, width = pair
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        for key, names in (("label_names", label_names), ("class_names", class_names)):
            if names is not None and (isinstance(names, str) or len(set(names)) != len(names)):
                raise ValueError(f"{key} must be a list of distinct names, got {names!r}")
        if class_names is not None:
            counts = {"num_seg_classes": num_seg_classes,
                      "the palette's colours": None if palette is None else len(palette)}
            for what, n in counts.items():
                if n is not None and n != len(class_names):
                    raise ValueError(f"class_names has {len(class_names)} names but {what} "
                                     f"gives {n} classes")
            num_seg_classes = len(class_names)
        if num_seg_classes is not None and not 1 <= num_seg_classes <= IGNORE_INDEX:
            raise ValueError(f"num_seg_classes must be in 1..{IGNORE_INDEX}, got {num_seg_classes}")
        pal = _check_palette(palette)
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"root {root} is not a directory")

        # Every split folder is scanned so class counts agree between train, val and test.
        split_layout = (root / "train").is_dir()
        if split_layout:
            present = [s for s in SPLITS if (root / s).is_dir()]
            if split not in present:
                raise ValueError(f"split {split!r} requested but {root / split} does not exist")
            folders = [_scan(root / s) for s in present]
            folder = folders[present.index(split)]
        else:
            if split == "test":
                raise ValueError(
                    f"{root} has no split folders, so only 'train' and 'val' exist (split by "
                    f"val_fraction); create {root}/train, {root}/val and {root}/test to have a test set"
                )
            folder = _scan(root)
            folders = [folder]
        has_masks = [f.masks_dir is not None for f in folders]
        has_labels = [f.labels_csv is not None for f in folders]
        for what, flags in (("masks/", has_masks), ("labels.csv", has_labels)):
            if any(flags) and not all(flags):
                raise ValueError(f"{what} exists in some split folders of {root} but not all")
        if not has_masks[0] and (num_seg_classes is not None or palette is not None):
            raise ValueError(
                f"num_seg_classes/palette/class_names given but {folder.root}/masks does not exist"
            )
        if not has_labels[0] and label_names is not None:
            raise ValueError(f"label_names given but {folder.root}/labels.csv does not exist")

        labels_all = [_read_labels(f, label_names) for f in folders] if has_labels[0] else None
        stems = list(folder.images)
        if not split_layout:
            stems = self._seeded_split(stems, split, val_fraction, seed, folder.root)

        # Class counts, inferred over all splits when not given.
        if has_masks[0] and num_seg_classes is None:
            if pal is not None:
                num_seg_classes = len(pal)
            else:
                paths = [f.masks_dir / f"{s}.png" for f in folders for s in f.images]
                num_seg_classes = _max_mask_value(paths, None) + 1
                if num_seg_classes < 1:
                    raise ValueError(f"every mask under {root} is all ignore ({IGNORE_INDEX})")
        num_labels = 0
        if labels_all is not None:
            num_labels = (
                len(label_names)
                if label_names
                else max(v for labels in labels_all for v in labels.values()) + 1
            )

        self.split = split
        self.root = root
        self.size = (height, width)
        self.channels = channels
        self.num_seg_classes = num_seg_classes or 0
        self._palette = pal
        self.files: list[Path] = [folder.images[s] for s in stems]
        self.mask_files: list[Path] | None = (
            [folder.masks_dir / f"{s}.png" for s in stems] if folder.masks_dir is not None else None)
        # every file opens, and each mask has its image's size: from the headers, before any
        # decoding (the pixels are checked again as they are read)
        sizes = [upright_size(path) for path in self.files]
        for i, mask_path in enumerate(self.mask_files or ()):
            _check_sizes(self.files[i], sizes[i], mask_path, upright_size(mask_path))
        pixels = len(stems) * height * width * (channels + (self.mask_files is not None))
        self.preloaded = preload is True or (preload == "auto" and pixels <= PRELOAD_LIMIT)
        self._images: torch.Tensor | None = None  # uint8 [N, C, H, W] when preloaded
        self._masks: torch.Tensor | None = None  # uint8 [N, H, W] when preloaded, with masks
        if self.preloaded:
            workers = min(8, os.cpu_count() or 1, max(len(stems), 1))
            with ThreadPoolExecutor(workers) as pool:  # PIL decodes and resizes without the GIL
                read = list(pool.map(self._read, range(len(stems))))
            self._images = torch.stack([image for image, _ in read])
            if self.mask_files is not None:
                self._masks = torch.stack([mask for _, mask in read])
        self.labels: torch.Tensor | None = None
        if labels_all is not None:
            labels = labels_all[folders.index(folder)]
            self.labels = torch.tensor([labels[s] for s in stems], dtype=torch.int64)
        names = tuple(label_names) if label_names else tuple(str(i) for i in range(num_labels))
        self.info = DatasetInfo(
            name=f"image_folder:{root.name}",
            channels=channels,
            image_size=(height, width),
            num_seg_classes=num_seg_classes or 0,
            num_labels=num_labels,
            seg_class_names=(tuple(map(str, class_names)) if class_names is not None
                             else tuple(f"class_{i}" for i in range(num_seg_classes or 0))),
            label_names=names,
            ignore_index=IGNORE_INDEX,
        )

    @staticmethod
    def _seeded_split(
        stems: list[str], split: str, val_fraction: float, seed: int, root: Path
    ) -> list[str]:
        """Shuffle the sorted stems with ``seed``; the first round(n * val_fraction) are val."""
        n = len(stems)
        n_val = round(n * val_fraction)
        if val_fraction > 0:
            n_val = min(max(n_val, 1), n - 1)
        if split == "val" and n_val == 0:
            raise ValueError(
                f"val split of {root} is empty ({n} images, val_fraction={val_fraction}); "
                "raise val_fraction or add images"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        chosen = order[:n_val] if split == "val" else order[n_val:]
        return [stems[i] for i in sorted(chosen)]

    def _read(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Item ``index``'s files: the image uint8 [C, H, W] and its mask uint8 [H, W] (or None),
        checked and resized."""
        height, width = self.size
        image_path = self.files[index]
        image = open_image(image_path)  # upright, as its EXIF orientation says
        pixels = torch.from_numpy(image_pixels(image, self.channels, self.size).copy())
        if self.mask_files is None:
            return pixels.permute(2, 0, 1), None
        mask_path = self.mask_files[index]
        values, mask_size = _mask_indices(mask_path, self._palette)
        _check_sizes(image_path, image.size, mask_path, mask_size)
        bad = ((values >= self.num_seg_classes) & (values != IGNORE_INDEX)) | (values < 0)
        if bad.any():
            raise ValueError(
                f"mask {mask_path} has value {int(values[bad][0])}, outside 0.."
                f"{self.num_seg_classes - 1} (num_seg_classes={self.num_seg_classes}) and not "
                f"the ignore value {IGNORE_INDEX}"
            )
        small = Image.fromarray(values.astype(np.uint8))
        small = small.resize((width, height), Image.Resampling.NEAREST)
        return pixels.permute(2, 0, 1), torch.from_numpy(np.asarray(small, dtype=np.uint8).copy())

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.preloaded:
            image = self._images[index]
            mask = self._masks[index] if self._masks is not None else None
        else:
            image, mask = self._read(index)
        item = {"image": image.float().div_(255.0)}  # [C, H, W] in [0, 1]
        if mask is not None:
            item["mask"] = mask.long()
        if self.labels is not None:
            item["label"] = self.labels[index]
        return item


def _check_sizes(image_path: Path, image_size: tuple[int, int], mask_path: Path,
                 mask_size: tuple[int, int]) -> None:
    """A mask has its (upright) image's size."""
    if mask_size != image_size:
        turned = (" (turned a quarter: images are read upright, as their EXIF orientation says "
                  "and viewers show them; draw the mask on the upright image)"
                  if mask_size == image_size[::-1] else "")
        raise ValueError(
            f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} (WxH) but its image "
            f"{image_path} is {image_size[0]}x{image_size[1]}{turned}"
        )


def image_folder(split: str, root: str | Path, **params) -> ImageFolderDataset:
    """The registry's factory: mtcore passes the split first (``factory(split, **params)``), the
    class takes ``root`` first (its Python API)."""
    return ImageFolderDataset(root, split, **params)


# the factory's visible signature is the class's, split first: the registry checks parameter
# names against it (a misspelt one is a config error listing the accepted ones)
_params = inspect.signature(ImageFolderDataset).parameters
image_folder.__signature__ = inspect.Signature(
    [_params["split"].replace(default=inspect.Parameter.empty), _params["root"],
     *(p for name, p in _params.items() if name not in ("split", "root"))],
    return_annotation=ImageFolderDataset)

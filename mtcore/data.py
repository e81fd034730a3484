"""The dataset contract: what a dataset component returns and describes about itself.

Every dataset item is a dict ``{"image": float32 [C, H, W] in [0, 1], "mask": int64 [H, W],
"label": int64 []}``; ``mask`` and ``label`` may be absent when the dataset has none, and a mask
pixel equal to ``DatasetInfo.ignore_index`` is not scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mtcore.errors import DataError

SPLITS = ("train", "val", "test")
ORIENTATION = 0x0112  # the EXIF tag that says how a stored picture turns upright
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 0..65535 grey levels


def open_image(path: str | Path) -> Image.Image:
    """A picture file read into memory upright: turned as its EXIF orientation says (as photo
    viewers and labelling tools show it, so a mask drawn over it lines up). One function for
    the datasets that read files and for ``mtcore predict``; an unreadable file is a
    :class:`~mtcore.errors.DataError` naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            try:
                return ImageOps.exif_transpose(image)  # a new image, turned or not
            except (SyntaxError, ValueError, KeyError):  # malformed EXIF: the pixels as stored
                return image.copy()
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"unreadable image {path}: {err}") from err


def upright_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of a picture file as :func:`open_image` reads it (upright), from its
    header without decoding it: cheap, for checks over many files (for a PNG whose EXIF chunk
    comes after the pixel data, the chunks' headers are walked to it, the pixels skipped). An
    unreadable file is a DataError naming it."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            try:  # the base class reads what the header gave (PNG's own would decode the file)
                orientation = Image.Image.getexif(image).get(ORIENTATION)
                if orientation is None and image.format == "PNG":
                    orientation = _png_tail_orientation(path)
            except (SyntaxError, ValueError, KeyError):  # malformed EXIF: open_image keeps it
                orientation = None
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"unreadable image {path}: {err}") from err
    turned = orientation in (5, 6, 7, 8)  # a quarter turn
    return (height, width) if turned else (width, height)


def _png_tail_orientation(path: str | Path) -> int | None:
    """The EXIF orientation of a PNG whose ``eXIf`` chunk follows its image data (Pillow reads
    that only when it decodes the pixels): the chunks' 8-byte headers are read and their data
    skipped, up to ``eXIf`` or ``IEND``."""
    with open(path, "rb") as fh:
        fh.seek(8)  # the PNG signature
        while True:
            head = fh.read(8)
            if len(head) < 8:
                return None
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind == b"IEND":
                return None
            if kind == b"eXIf":
                exif = Image.Exif()
                exif.load(b"Exif\x00\x00" + fh.read(length))
                return exif.get(ORIENTATION)
            fh.seek(length + 4, 1)  # the data and its CRC


def image_pixels(image: Image.Image, channels: int, size: tuple[int, int]) -> np.ndarray:
    """A picture as a model of ``channels`` (1 or 3) at ``size`` (height, width) sees it:
    converted to grayscale or RGB (16-bit grey scaled to 8 bits) and resized bilinearly;
    uint8 [H, W, C]. One function for the datasets that read files and for ``mtcore predict``,
    so training and inference prepare images alike."""
    height, width = size
    if image.mode in WIDE_GREY_MODES:  # 16-bit grey (PNG, TIFF): convert() would clip at 255
        wide = np.asarray(image, dtype=np.int64).clip(0, 65535)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    image = image.convert("RGB" if channels == 3 else "L")
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).reshape(height, width, channels)


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset to build its heads."""

    name: str
    channels: int
    image_size: tuple[int, int]
    num_seg_classes: int = 0  # 0: the dataset has no masks
    num_labels: int = 0  # 0: the dataset has no image-level labels
    seg_class_names: tuple[str, ...] = field(default_factory=tuple)
    label_names: tuple[str, ...] = field(default_factory=tuple)
    ignore_index: int = 255

    @property
    def has_masks(self) -> bool:
        return self.num_seg_classes > 0

    @property
    def has_labels(self) -> bool:
        return self.num_labels > 0

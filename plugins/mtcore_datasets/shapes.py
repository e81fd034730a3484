"""Procedural shapes: coloured circles, squares and triangles on a textured background.

A dataset that needs no download and exercises both segmentation (per-pixel kind) and
classification (the kind covering the most pixels) at any image size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mtcore.plugin import SPLITS, DatasetInfo

KINDS = ("circle", "square", "triangle")
DEFAULT_NUM_SAMPLES = {"train": 2000, "val": 500, "test": 500}

# Radius of the circle with the same area as the shape, as a fraction of the image side; the
# square and triangle are scaled to that area so no kind is favoured by the "largest" label.
_RADIUS_RANGE = (0.14, 0.26)
_CENTRE_RANGE = (0.2, 0.8)
# Squares and triangles turn by up to 15 degrees either way: enough variety that kinds are not
# told apart by edge direction alone, while a small U-Net still learns them in CPU minutes.
_MAX_ROTATION = math.pi / 12
_SQUARE_HALF_SIDE = math.sqrt(math.pi) / 2  # half side of the square with area pi r^2, per unit r
_TRIANGLE_CIRCUMRADIUS = math.sqrt(4 * math.pi / (3 * math.sqrt(3)))  # same, for an equilateral


def _split_generator(seed: int, split: str) -> torch.Generator:
    """One independent random stream per (seed, split), so splits never share an image."""
    state = np.random.SeedSequence([seed, SPLITS.index(split), 0x5AA9E5]).generate_state(1)
    return torch.Generator().manual_seed(int(state[0]))


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vectorised HSV -> RGB for tensors of shape [...]; returns [..., 3] in [0, 1]."""
    n = torch.tensor([5.0, 3.0, 1.0])
    k = (n + h.unsqueeze(-1) * 6.0) % 6.0
    ramp = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return v.unsqueeze(-1) - v.unsqueeze(-1) * s.unsqueeze(-1) * ramp


def _uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen)


def _background(gen: torch.Generator, n: int, size: int, ys: torch.Tensor, xs: torch.Tensor):
    """Low-saturation texture: grey level + tint + low-frequency noise + oriented coloured stripes."""
    grey = _uniform(gen, (n, 1, 1, 1), 0.3, 0.7)
    tint = _uniform(gen, (n, 3, 1, 1), -0.08, 0.08)
    noise = 0.08 * torch.randn((n, 3, 4, 4), generator=gen)
    noise = F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
    angle = _uniform(gen, (n, 1, 1, 1), 0.0, math.pi)
    freq = _uniform(gen, (n, 1, 1, 1), 2.0, 6.0)  # cycles per image side
    phase = _uniform(gen, (n, 1, 1, 1), 0.0, 2 * math.pi)
    amp = _uniform(gen, (n, 3, 1, 1), -0.15, 0.15)
    proj = xs * torch.cos(angle) + ys * torch.sin(angle)
    stripes = amp * torch.sin(2 * math.pi * freq * proj + phase)
    return grey + tint + noise + stripes


def _shape_masks(
    kind: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    r: torch.Tensor,
    rot: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
) -> torch.Tensor:
    """Boolean [N, H, W] coverage of one shape per image (kind 1 circle, 2 square, 3 triangle)."""
    cx, cy, r, rot = (t.view(-1, 1, 1) for t in (cx, cy, r, rot))
    dx, dy = xs[0] - cx, ys[0] - cy
    circle = dx * dx + dy * dy <= r * r
    cos, sin = torch.cos(rot), torch.sin(rot)
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    square = torch.maximum(u.abs(), v.abs()) <= _SQUARE_HALF_SIDE * r
    # Equilateral triangle: inside all three edges, whose outward normals point at
    # rot + 150, 270 and 30 degrees and lie at the inradius (half the circumradius) from the centre.
    inradius = 0.5 * _TRIANGLE_CIRCUMRADIUS * r
    triangle = torch.ones_like(circle)
    for k in range(3):
        a = rot + math.radians(150 + 120 * k)
        triangle &= dx * torch.cos(a) + dy * torch.sin(a) <= inradius
    kind = kind.view(-1, 1, 1)
    return torch.where(kind == 1, circle, torch.where(kind == 2, square, triangle))


def generate_shapes(
    n: int, size: int, gen: torch.Generator, min_shapes: int = 1, max_shapes: int = 3,
    radius_range: tuple[float, float] = _RADIUS_RANGE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Make ``n`` RGB images [n, 3, size, size], masks [n, size, size] (uint8) and labels [n].

    Shapes are drawn in order, later ones on top; the label is the kind (0 circle, 1 square,
    2 triangle) with the most pixels in the final mask, ties going to the lower kind.
    """
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # pixel centres in (0, 1)
    ys = coords.view(1, 1, size, 1)
    xs = coords.view(1, 1, 1, size)
    image = _background(gen, n, size, ys, xs)
    mask = torch.zeros((n, size, size), dtype=torch.uint8)
    count = torch.randint(min_shapes, max_shapes + 1, (n,), generator=gen)
    for slot in range(max_shapes):
        kind = torch.randint(1, 4, (n,), generator=gen)
        cx = _uniform(gen, (n,), *_CENTRE_RANGE)
        cy = _uniform(gen, (n,), *_CENTRE_RANGE)
        r = _uniform(gen, (n,), *radius_range)
        rot = _uniform(gen, (n,), -_MAX_ROTATION, _MAX_ROTATION)
        colour = _hsv_to_rgb(
            _uniform(gen, (n,), 0.0, 1.0),
            _uniform(gen, (n,), 0.55, 1.0),
            _uniform(gen, (n,), 0.55, 1.0),
        )
        inside = _shape_masks(kind, cx, cy, r, rot, ys, xs) & (slot < count).view(-1, 1, 1)
        mask = torch.where(inside, kind.to(torch.uint8).view(-1, 1, 1), mask)
        image = torch.where(inside.unsqueeze(1), colour.view(n, 3, 1, 1), image)
    image = image + 0.02 * torch.randn(image.shape, generator=gen)  # sensor noise: no flat colours
    image = image.clamp_(0.0, 1.0)
    pixels = F.one_hot(mask.long().flatten(1), num_classes=4).sum(dim=1)  # [n, 4]
    labels = pixels[:, 1:].argmax(dim=1)  # argmax returns the first maximum on ties
    return image, mask, labels


def _split_size(num_samples: int | Mapping[str, int] | None, split: str) -> int:
    """Images in ``split``: one int for every split, or a table by split (missing: the default)."""
    if isinstance(num_samples, Mapping):
        unknown = sorted(set(num_samples) - set(SPLITS))
        if unknown:
            raise ValueError(f"num_samples: unknown split(s) {unknown}; the splits are {SPLITS}")
        num_samples = num_samples.get(split)
    if num_samples is None:
        return DEFAULT_NUM_SAMPLES[split]
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError("num_samples must be a positive int, a table of them by split "
                         f"(e.g. {{ train = 4000 }}), or None; got {num_samples!r} for {split!r}")
    return num_samples


class ShapesDataset(Dataset):
    """Procedural circles/squares/triangles with per-pixel kind masks and a largest-kind label.

    Every item is built at construction (vectorised, cached as tensors). Classes of ``mask``:
    0 background, 1 circle, 2 square, 3 triangle; ``label``: 0 circle, 1 square, 2 triangle, the
    kind with the most pixels in the mask (shapes of one kind count together, so the label can be
    checked from the mask alone). Shape size is relative to ``size``, and each split draws from
    its own seed stream, so train, val and test never share an image. ``num_samples`` is one size
    for every split or a table by split (``{"train": 4000}``); a split it leaves out keeps its
    default (train 2000, val 500, test 500).
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 32,
        num_samples: int | Mapping[str, int] | None = None,
        seed: int = 0,
        min_shapes: int = 1,
        max_shapes: int = 3,
        channels: int = 3,
        min_radius: float = _RADIUS_RANGE[0],
        max_radius: float = _RADIUS_RANGE[1],
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 8:
            raise ValueError(f"size must be an int >= 8, got {size!r}")
        num_samples = _split_size(num_samples, split)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not (isinstance(min_shapes, int) and isinstance(max_shapes, int)) or not (
            1 <= min_shapes <= max_shapes
        ):
            raise ValueError(
                "min_shapes and max_shapes must be ints with 1 <= min_shapes <= max_shapes, "
                f"got min_shapes={min_shapes!r}, max_shapes={max_shapes!r}"
            )
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        if not all(isinstance(r, int | float) and not isinstance(r, bool)
                   for r in (min_radius, max_radius)) or not (
                0.02 <= min_radius <= max_radius <= 0.5):
            raise ValueError("min_radius and max_radius (fractions of the image side) must satisfy "
                             f"0.02 <= min_radius <= max_radius <= 0.5, got {min_radius!r}, {max_radius!r}")
        self.split = split
        self.info = DatasetInfo(
            name="shapes",
            channels=channels,
            image_size=(size, size),
            num_seg_classes=4,
            num_labels=3,
            seg_class_names=("background", *KINDS),
            label_names=KINDS,
        )
        images, masks, labels = generate_shapes(
            num_samples, size, _split_generator(seed, split), min_shapes, max_shapes,
            (float(min_radius), float(max_radius)),
        )
        if channels == 1:  # ITU-R BT.601 luma; grey shapes are harder to tell from the background
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images * weights).sum(dim=1, keepdim=True)
        self.images: torch.Tensor = images.contiguous()  # float32 [N, C, H, W]
        self.masks: torch.Tensor = masks  # uint8 [N, H, W]
        self.labels: torch.Tensor = labels  # int64 [N]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "image": self.images[index],
            "mask": self.masks[index].long(),
            "label": self.labels[index],
        }

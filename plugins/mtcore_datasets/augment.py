"""First-party training-time augmentations: flips, random resized crops and colour jitter,
batched on the training device, the mask moved with its image (nearest) and labels untouched.
The contract is :class:`mtcore.plugin.Augmentation`'s."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from mtcore.plugin import Augmentation

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights: the grey an RGB image has


def _probability(name: str, p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:  # NaN too
        raise ValueError(f"{name}: p must be a probability in [0, 1], got {p!r}")
    return float(p)


def _range(name: str, key: str, value: Sequence[float], low: float, high: float | None
           ) -> tuple[float, float]:
    """A [a, b] pair with low < a <= b (<= high)."""
    ok = (isinstance(value, list | tuple) and len(value) == 2
          and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value))
    if ok:
        a, b = float(value[0]), float(value[1])
        ok = low < a <= b and (high is None or b <= high)
    if not ok:
        bound = f"{low} < a <= b" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"{name}: {key} must be a pair [a, b] with {bound}, got {value!r}")
    return a, b


class Flip(Augmentation):
    """Mirror each sample left-right (``horizontal``) and/or top-bottom (``vertical``), each
    with probability ``p`` on its own."""

    def __init__(self, horizontal: bool = True, vertical: bool = False, p: float = 0.5) -> None:
        for key, v in (("horizontal", horizontal), ("vertical", vertical)):
            if not isinstance(v, bool):
                raise ValueError(f"flip: {key} must be true or false, got {v!r}")
        if not (horizontal or vertical):
            raise ValueError("flip: set horizontal and/or vertical to true")
        self.dims = [d for d, on in ((-1, horizontal), (-2, vertical)) if on]
        self.p = _probability("flip", p)

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(batch)
        n = out["image"].shape[0]
        for dim in self.dims:
            pick = (torch.rand(n) < self.p).to(out["image"].device)
            for key in ("image", "mask"):
                if key in out:
                    x = out[key]
                    sel = pick.view(-1, *([1] * (x.dim() - 1)))
                    out[key] = torch.where(sel, x.flip(dim), x)
        return out


class RandomResizedCrop(Augmentation):
    """With probability ``p``, crop a random box of ``scale`` (a fraction of the area) and
    ``ratio`` (width / height) from each sample and resize it back to the image's size: the
    image bilinearly, the mask by nearest neighbour. A box that would not fit is clamped to
    the image (as wide or as tall as it)."""

    def __init__(self, scale: Sequence[float] = (0.5, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), p: float = 1.0) -> None:
        self.scale = _range("random_resized_crop", "scale", scale, 0.0, 1.0)
        self.ratio = _range("random_resized_crop", "ratio", ratio, 0.0, None)
        self.p = _probability("random_resized_crop", p)

    def boxes(self, n: int) -> torch.Tensor:
        """[n, 4] boxes (x0, y0, width, height) as fractions of the image."""
        area = torch.rand(n) * (self.scale[1] - self.scale[0]) + self.scale[0]
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        ratio = torch.exp(torch.rand(n) * (hi - lo) + lo)
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        x0, y0 = torch.rand(n) * (1 - w), torch.rand(n) * (1 - h)
        return torch.stack([x0, y0, w, h], dim=1)

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(batch)
        image = out["image"]
        n = image.shape[0]
        pick = torch.rand(n) < self.p
        boxes = self.boxes(n)  # drawn for every sample: the stream does not depend on p's picks
        idx = pick.nonzero().flatten()
        if idx.numel() == 0:
            return out
        out.update(crop_resize({k: out[k] for k in ("image", "mask") if k in out},
                               boxes[idx], idx.to(image.device)))
        return out


def crop_resize(batch: Mapping[str, torch.Tensor], boxes: torch.Tensor,
                idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Samples ``idx`` of the image (and mask) replaced by their ``boxes`` (x0, y0, w, h as
    fractions) resized to the full size: bilinear (align_corners=False, as ``F.interpolate``
    of the cropped pixels) and nearest for the mask."""
    image = batch["image"]
    x0, y0, w, h = boxes.to(image.device, torch.float32).unbind(1)
    theta = torch.zeros(len(idx), 2, 3, device=image.device)
    theta[:, 0, 0], theta[:, 0, 2] = w, 2 * x0 + w - 1
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * y0 + h - 1
    height, width = image.shape[-2:]
    grid = F.affine_grid(theta, [len(idx), 1, height, width], align_corners=False)
    # no reading past the box: sample positions stay between its first and last pixel centres
    # (as resizing the cropped pixels alone clamps them), not its neighbours outside
    for axis, (start, size, pixels) in enumerate(((x0, w, width), (y0, h, height))):
        lo = (2 * start * pixels + 1) / pixels - 1
        hi = (2 * (start + size) * pixels - 1) / pixels - 1
        grid[..., axis] = torch.maximum(torch.minimum(grid[..., axis], hi.view(-1, 1, 1)),
                                        lo.view(-1, 1, 1))
    out = {}
    cropped = F.grid_sample(image[idx].float(), grid, mode="bilinear", padding_mode="border",
                            align_corners=False).to(image.dtype)
    out["image"] = image.index_copy(0, idx, cropped.contiguous(memory_format=_layout(image)))
    if "mask" in batch:
        mask = batch["mask"]
        picked = F.grid_sample(mask[idx].unsqueeze(1).float(), grid, mode="nearest",
                               padding_mode="border", align_corners=False)
        out["mask"] = mask.index_copy(0, idx, picked.squeeze(1).round().to(mask.dtype))
    return out


def _layout(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last and not x.is_contiguous() else torch.contiguous_format


class ColorJitter(Augmentation):
    """With probability ``p``, scale each sample's brightness, contrast and saturation (in that
    order) by factors drawn from [max(0, 1 - b), 1 + b] (b: the parameter, 0 leaves it), as
    torchvision's ColorJitter defines them, clamping to [0, 1] after each. Saturation needs RGB
    (grey images keep theirs)."""

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0,
                 p: float = 1.0) -> None:
        self.amounts = {}
        for key, v in (("brightness", brightness), ("contrast", contrast),
                       ("saturation", saturation)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < math.inf:
                raise ValueError(f"color_jitter: {key} must be a finite number >= 0, got {v!r}")
            self.amounts[key] = float(v)
        if not any(self.amounts.values()):
            raise ValueError("color_jitter: set brightness, contrast and/or saturation above 0")
        self.p = _probability("color_jitter", p)

    def factors(self, n: int) -> dict[str, torch.Tensor]:
        """[n] factors per property, 1 where a sample is not picked."""
        pick = torch.rand(n) < self.p
        out = {}
        for key, b in self.amounts.items():  # U[max(0, 1 - b), 1 + b], as torchvision's
            low = max(0.0, 1.0 - b)
            f = torch.rand(n) * (1.0 + b - low) + low
            out[key] = torch.where(pick, f, torch.ones(n))
        return out

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(batch)
        x = out["image"]
        f = {k: v.to(x.device, x.dtype).view(-1, 1, 1, 1) for k, v in self.factors(x.shape[0]).items()}
        if self.amounts["brightness"]:
            x = (x * f["brightness"]).clamp(0, 1)
        if self.amounts["contrast"]:
            mean = grey(x).mean(dim=(-2, -1), keepdim=True)
            x = (f["contrast"] * x + (1 - f["contrast"]) * mean).clamp(0, 1)
        if self.amounts["saturation"] and x.shape[1] == 3:
            x = (f["saturation"] * x + (1 - f["saturation"]) * grey(x)).clamp(0, 1)
        out["image"] = x
        return out


def grey(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] grey levels of an RGB (luma) or grey batch."""
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    w = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)

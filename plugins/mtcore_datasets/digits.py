"""scikit-learn's bundled 8x8 handwritten digits: real data that needs no download.

Each image gets its digit as ``label`` and a foreground/background ``mask`` made by thresholding
the resized intensity, so one small dataset serves both classification and segmentation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mtcore.plugin import SPLITS, DatasetInfo

# A resized pixel is "digit" when its intensity (in [0, 1], 1 = full ink) is at least this.
MASK_THRESHOLD = 0.5
_SOURCE_MAX = 16.0  # load_digits pixel values are integers in 0..16


def _load_digits():
    """Return sklearn's (data [1797, 64], target [1797]), or say how to install it."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "DigitsDataset needs scikit-learn, which is not installed; "
            "run: pip install 'mtcore[digits]'"
        ) from err
    bunch = load_digits()
    return bunch.data, bunch.target


def stratified_split(
    targets: torch.Tensor, seed: int, val_fraction: float, test_fraction: float
) -> dict[str, torch.Tensor]:
    """Seeded per-class split of indices into train/val/test, each sorted ascending.

    Within each class, round(n * fraction) items go to test, then to val; the rest to train.
    """
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {s: [] for s in SPLITS}
    for cls in torch.unique(targets).tolist():
        members = torch.nonzero(targets == cls).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        n_test = round(len(members) * test_fraction)
        n_val = round(len(members) * val_fraction)
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test : n_test + n_val])
        parts["train"].append(members[n_test + n_val :])
    return {s: torch.sort(torch.cat(p)).values for s, p in parts.items()}


class DigitsDataset(Dataset):
    """The 1,797 sklearn digits, resized (bilinear) to ``size``, with digit labels and masks.

    ``mask`` is 1 where the resized intensity is >= ``MASK_THRESHOLD`` (0.5 of full ink), else 0.
    The split is stratified by digit and seeded; ``indices`` holds each item's row in sklearn's
    ``load_digits()``. With ``test_fraction=0`` (the default) there is no test split.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 32,
        seed: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        channels: int = 1,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an int, got {seed!r}")
        fractions = (val_fraction, test_fraction)
        if not all(isinstance(f, int | float) and not isinstance(f, bool) for f in fractions) or not (
                0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0):
            raise ValueError(
                f"val_fraction and test_fraction must be in [0, 1), got val_fraction="
                f"{val_fraction!r}, test_fraction={test_fraction!r}"
            )
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 so train is not empty, got "
                f"{val_fraction} + {test_fraction}"
            )
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB copies), got {channels!r}")
        data, target = _load_digits()
        targets = torch.as_tensor(target, dtype=torch.int64)
        indices = stratified_split(targets, seed, val_fraction, test_fraction)[split]
        if len(indices) == 0:
            fraction = "val_fraction" if split == "val" else "test_fraction"
            raise ValueError(
                f"split {split!r} is empty: {fraction}="
                f"{val_fraction if split == 'val' else test_fraction}; raise it to get a {split} set"
            )
        images = torch.as_tensor(data, dtype=torch.float32)[indices].view(-1, 1, 8, 8)
        images = images / _SOURCE_MAX
        if size != 8:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
            images = images.clamp_(0.0, 1.0)
        self.split = split
        self.indices: torch.Tensor = indices  # rows of load_digits(), int64 [N]
        self.masks: torch.Tensor = (images[:, 0] >= MASK_THRESHOLD).to(torch.uint8)  # [N, H, W]
        self.images: torch.Tensor = images.expand(-1, channels, -1, -1).contiguous()
        self.labels: torch.Tensor = targets[indices]  # int64 [N]
        self.info = DatasetInfo(
            name="digits",
            channels=channels,
            image_size=(size, size),
            num_seg_classes=2,
            num_labels=10,
            seg_class_names=("background", "digit"),
            label_names=tuple(str(d) for d in range(10)),
        )

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "image": self.images[index],
            "mask": self.masks[index].long(),
            "label": self.labels[index],
        }

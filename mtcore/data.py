"""The dataset contract: what a dataset component returns and describes about itself.

Every dataset item is a dict ``{"image": float32 [C, H, W] in [0, 1], "mask": int64 [H, W],
"label": int64 []}``; ``mask`` and ``label`` may be absent when the dataset has none, and a mask
pixel equal to ``DatasetInfo.ignore_index`` is not scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SPLITS = ("train", "val", "test")


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

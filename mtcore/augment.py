"""Training-time data augmentation: components (config key ``data.augment``, a list applied in
order) that change each training batch on the training device, the image and its mask alike.

An augmentation acts on a whole batch at once (per-sample random choices, tensor ops: as fast
on a GPU as the step it feeds), draws its randomness from torch's default CPU generator (the
training stream a checkpoint saves, so a resumed run augments exactly as an uninterrupted one),
and keeps the batch's contract: the same keys, shapes and dtypes, images in [0, 1], mask values
among the mask's classes or its ignore index. Evaluation, samples and predictions see the data
as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mtcore.errors import ContractError


class Augmentation:
    """Base class. Implement :meth:`__call__`; ``ignore_index`` (set by the trainer from the
    dataset) is the mask value for pixels an augmentation has no label for."""

    ignore_index: int = 255

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The augmented batch: ``image`` float [N, C, H, W] in [0, 1], and ``mask`` int64
        [N, H, W] and ``label`` int64 [N] where the batch has them; other keys pass through."""
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(batch)")


def augment_batch(augmentations: Sequence[tuple[str, Augmentation]],
                  batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` through each ``(config key, augmentation)`` in turn; an augmentation that breaks
    the batch's contract is named with what it returned."""
    out = dict(batch)
    for key, aug in augmentations:
        got = aug(out)
        if not isinstance(got, Mapping):
            raise ContractError(f"{key} ({type(aug).__name__}) must return the batch as a dict, "
                                f"got {type(got).__name__}")
        for name, before in out.items():
            after = got.get(name)
            if torch.is_tensor(before) and (not torch.is_tensor(after)
                                            or after.shape != before.shape
                                            or after.dtype != before.dtype
                                            or after.device != before.device):
                what = (f"{after.dtype} {tuple(after.shape)} on {after.device}"
                        if torch.is_tensor(after) else type(after).__name__)
                raise ContractError(f"{key} ({type(aug).__name__}) changed the batch's {name!r} "
                                    f"from {before.dtype} {tuple(before.shape)} on "
                                    f"{before.device} to {what}")
        out = dict(got)
    return out


def uniform(n: int, low: float, high: float) -> torch.Tensor:
    """``n`` draws from U[low, high) on the default CPU generator (the training stream)."""
    return torch.rand(n) * (high - low) + low


def chosen(n: int, p: float) -> torch.Tensor:
    """bool [n]: which samples an augmentation applied with probability ``p`` acts on."""
    return torch.rand(n) < p

"""Training-time augmentation (``data.augment``): each first-party augmentation against a hand
computation, the batch contract, the config checks, and the trainer applying it to training
batches only (a resumed run augmenting exactly as an uninterrupted one: test_training)."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import mtcore
from mtcore.augment import Augmentation, augment_batch
from mtcore.errors import ComponentNotFoundError, ConfigError, ContractError
from mtcore.plugin import AugmentSpec, hookimpl
from mtcore.plugin_manager import default_manager
from mtcore.registry import Registry
from mtcore.trainer import Trainer
from mtcore_datasets.augment import LUMA, ColorJitter, Flip, RandomResizedCrop, crop_resize


def _batch(n=6, c=3, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, 4, (n, h, w), generator=g)
    mask[:, 0, :3] = 255  # some unlabelled pixels
    return {"image": torch.rand(n, c, h, w, generator=g), "mask": mask,
            "label": torch.randint(0, 3, (n,), generator=g)}


def test_flip_mirrors_image_and_mask_together_on_the_drawn_samples():
    batch = _batch()
    torch.manual_seed(5)
    out = Flip(horizontal=True, vertical=True, p=0.5)(batch)
    torch.manual_seed(5)
    lr, tb = torch.rand(6) < 0.5, torch.rand(6) < 0.5  # the draws, in the order documented
    assert lr.any() and (~lr).any()
    for i in range(6):
        image, mask = batch["image"][i], batch["mask"][i]
        if lr[i]:
            image, mask = image.flip(-1), mask.flip(-1)
        if tb[i]:
            image, mask = image.flip(-2), mask.flip(-2)
        assert torch.equal(out["image"][i], image) and torch.equal(out["mask"][i], mask), i
    assert out["label"] is batch["label"]
    assert torch.equal(Flip(p=0.0)(batch)["image"], batch["image"])
    with pytest.raises(ValueError, match="horizontal and/or vertical"):
        Flip(horizontal=False)
    with pytest.raises(ValueError, match="flip: horizontal must be true or false, got 'false'"):
        Flip(horizontal="false")


def test_a_crop_is_the_cropped_pixels_resized():
    """A box on pixel boundaries: the image as F.interpolate (bilinear) of the cropped pixels,
    the mask as nearest-neighbour of the cropped labels; other samples untouched."""
    batch = _batch(n=3)
    idx = torch.tensor([0, 2])
    boxes = torch.tensor([[4 / 16, 2 / 16, 8 / 16, 8 / 16],    # x0, y0, w, h: 8x8 at (4, 2)
                          [0.0, 8 / 16, 16 / 16, 8 / 16]])      # the lower half, full width
    out = crop_resize(batch, boxes, idx)
    regions = [(slice(2, 10), slice(4, 12)), (slice(8, 16), slice(0, 16))]
    for j, (rows, cols) in zip(idx.tolist(), regions, strict=True):
        want = F.interpolate(batch["image"][j:j + 1, :, rows, cols], size=(16, 16),
                             mode="bilinear", align_corners=False)
        torch.testing.assert_close(out["image"][j:j + 1], want, rtol=1e-5, atol=1e-6)
        want_mask = F.interpolate(batch["mask"][j:j + 1, None, rows, cols].float(),
                                  size=(16, 16), mode="nearest-exact").long()[:, 0]
        assert torch.equal(out["mask"][j:j + 1], want_mask)
    assert torch.equal(out["image"][1], batch["image"][1])
    assert torch.equal(out["mask"][1], batch["mask"][1])


def test_random_crops_keep_to_their_scale_and_ratio_and_the_masks_classes():
    torch.manual_seed(0)
    crop = RandomResizedCrop(scale=(0.25, 0.5), ratio=(0.5, 2.0))
    b = crop.boxes(2000)
    x0, y0, w, h = b.unbind(1)
    assert ((x0 >= 0) & (y0 >= 0) & (x0 + w <= 1 + 1e-6) & (y0 + h <= 1 + 1e-6)).all()
    area, ratio = w * h, w / h
    assert area.min() >= 0.25 - 1e-5 and area.max() <= 0.5 + 1e-5
    assert ratio.min() >= 0.5 - 1e-4 and ratio.max() <= 2.0 + 1e-4
    batch = _batch()
    out = crop(batch)
    for i in range(6):  # nearest neighbour: no class that was not in the sample's mask
        assert set(out["mask"][i].unique().tolist()) <= set(batch["mask"][i].unique().tolist())
    whole = RandomResizedCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0))(batch)
    torch.testing.assert_close(whole["image"], batch["image"], rtol=0, atol=1e-6)
    assert torch.equal(whole["mask"], batch["mask"])
    assert torch.equal(RandomResizedCrop(p=0.0)(batch)["image"], batch["image"])
    for bad in ({"scale": (0.0, 1.0)}, {"scale": (0.6, 0.5)}, {"scale": (0.5, 1.5)},
                {"ratio": (2, 1)}, {"p": 1.5}):
        with pytest.raises(ValueError, match="random_resized_crop"):
            RandomResizedCrop(**bad)


def test_color_jitter_is_torchvisions_definition_by_hand():
    batch = _batch(n=4)
    torch.manual_seed(3)
    out = ColorJitter(brightness=0.4, contrast=0.3, saturation=0.5)(batch)
    torch.manual_seed(3)
    picked = torch.rand(4) < 1.0
    fb, fc, fs = (torch.rand(4) * 2 * a + 1 - a for a in (0.4, 0.3, 0.5))
    assert picked.all()
    for i in range(4):
        x = batch["image"][i].double()
        x = (x * fb[i]).clamp(0, 1)
        grey = sum(wt * x[c] for c, wt in enumerate(LUMA))
        x = (fc[i] * x + (1 - fc[i]) * grey.mean()).clamp(0, 1)
        grey = sum(wt * x[c] for c, wt in enumerate(LUMA))
        x = (fs[i] * x + (1 - fs[i]) * grey).clamp(0, 1)
        torch.testing.assert_close(out["image"][i].double(), x, rtol=1e-5, atol=1e-6)
    assert out["mask"] is batch["mask"]
    grey_batch = _batch(n=2, c=1)  # saturation leaves grey images as they are
    assert torch.equal(ColorJitter(saturation=0.9)(grey_batch)["image"], grey_batch["image"])
    with pytest.raises(ValueError, match="above 0"):
        ColorJitter()
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="brightness must be a finite number >= 0"):
            ColorJitter(brightness=bad)
    # beyond 1 the factors start at 0 (torchvision's [max(0, 1 - b), 1 + b]): no mass at 0
    torch.manual_seed(0)
    f = ColorJitter(brightness=2.0).factors(4000)["brightness"]
    assert f.min() > 0 and (f == 0).sum() == 0 and 2.9 < f.max() <= 3.0
    assert abs(float(f.mean()) - 1.5) < 0.05


class Shrink(Augmentation):
    def __call__(self, batch):
        return {**batch, "image": batch["image"][:, :, :8]}


def test_an_augmentation_that_breaks_the_batch_is_named():
    batch = _batch(n=2)
    with pytest.raises(ContractError, match=r"data.augment\[1\] \(Shrink\) changed the batch's "
                                            r"'image' from torch.float32 \(2, 3, 16, 16\) on cpu "
                                            r"to torch.float32 \(2, 3, 8, 16\) on cpu"):
        augment_batch([("data.augment[0]", Flip()), ("data.augment[1]", Shrink())], batch)


class Recorder(Augmentation):
    """Marks the batches it sees: every image pixel set to 1 (the label as it is)."""

    seen: list[int] = []

    def __call__(self, batch):
        Recorder.seen.append(batch["image"].shape[0])
        return {**batch, "image": torch.ones_like(batch["image"])}


def _registry():
    plugin = types.ModuleType("augment_plugin")

    @hookimpl
    def mtcore_augments():
        yield AugmentSpec("recorder", Recorder, "Records the batches it sees.")
        yield AugmentSpec("not_one", lambda: object(), "Builds the wrong thing.")

    plugin.mtcore_augments = mtcore_augments
    pm = default_manager()
    pm.register(plugin, "augment_plugin")
    return Registry(pm)


TINY = [
    "data.dataset.params.size=16", "data.dataset.params.num_samples=48", "data.batch_size=16",
    "data.eval_batch_size=48", "model.backbone.params.width=8", "tasks.vae.head.params.width=8",
    "tasks.gan.head.params.width=8", "tasks.gan.head.params.d_width=8", "train.progress=false",
    "optim.epochs=2", 'kernels="reference"', 'train.gen_metrics="none"', "train.samples_every=0",
]


def test_the_trainer_augments_training_batches_only():
    Recorder.seen.clear()
    exp = mtcore.build(None, [*TINY, "optim.epochs=1", 'data.augment=[{name="recorder"}]'],
                       registry=_registry())
    trainer = Trainer(exp, None, progress=False)
    steps = []
    original = trainer.train_step

    def step(batch):
        steps.append(bool((batch["image"] == 1).all()))
        return original(batch)
    trainer.train_step = step
    trainer.fit()
    assert steps == [True] * 3 and Recorder.seen == [16] * 3  # 48 images, batch 16
    before = len(Recorder.seen)
    trainer.evaluate()
    assert len(Recorder.seen) == before  # evaluation sees the data as it is
    with pytest.raises(ContractError, match=r"data.augment\[0\] \('not_one'\): the factory must "
                                            "return an mtcore.plugin.Augmentation"):
        mtcore.build(None, [*TINY, 'data.augment=[{name="not_one"}]'], registry=_registry())


def test_config_errors_name_the_list_item():
    cases = [('data.augment={name="flip"}', "data.augment: expected a list"),
             ('data.augment=[{name="flip"}, {name="flipp"}]',
              "data.augment[1].name: unknown augment 'flipp'. Did you mean 'flip'?"),
             ('data.augment=[{name="flip", params={p=2}}]',
              "data.augment[0] (augment 'flip'): flip: p must be a probability in [0, 1], got 2"),
             ('data.augment=["flip"]', "data.augment[0]: expected a table")]
    for override, message in cases:
        with pytest.raises((ConfigError, ComponentNotFoundError)) as err:
            mtcore.build(None, [*TINY, override])
        assert message in str(err.value), override

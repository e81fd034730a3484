"""The classifier two-sample test: chance on two real sets, near 1 where a person sees a difference
(blur, noise), seeded, and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtcore_datasets.shapes import ShapesDataset
from mtcore_tasks.c2st import C2STConfig, c2st_accuracy


def blur(x: torch.Tensor, k: int = 5) -> torch.Tensor:
    """A k x k box blur (edges replicated): shapes become soft blobs, the sensor noise goes."""
    w = torch.ones(x.shape[1], 1, k, k) / (k * k)
    return F.conv2d(F.pad(x, (k // 2,) * 4, mode="replicate"), w, groups=x.shape[1])


@pytest.fixture(scope="module")
def real():
    return ShapesDataset("train", num_samples=400).images, ShapesDataset("val", num_samples=400).images


def test_two_real_sets_are_at_chance(real):
    """Two disjoint sets of real images: nothing to learn, so the held-out accuracy is ~0.5
    (400 held-out images: one standard deviation is 0.025)."""
    assert abs(c2st_accuracy(*real) - 0.5) < 0.1


def test_blurred_images_are_told_apart(real):
    """A 5x5 box blur turns the shapes into soft blobs (what the GAN draws) and removes the
    sensor noise: a person tells every one apart; so must the test."""
    train, val = real
    assert c2st_accuracy(train, blur(val)) >= 0.95


def test_seeded_deterministic_and_leaves_the_global_rng_alone(real):
    train, val = real
    config = C2STConfig(steps=20)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = c2st_accuracy(train[:100], blur(val[:100], 3), config)
    assert torch.equal(torch.get_rng_state(), before)
    assert c2st_accuracy(train[:100], blur(val[:100], 3), config) == a
    # the score is a fraction of the 2 x 50 held-out images
    assert (a * 100) == pytest.approx(round(a * 100))


def test_only_the_held_out_part_is_scored():
    """Fakes that differ from the real images only in their training part (the held-out fakes are
    real images) cannot be told apart on the held-out part: the score stays near chance however
    well the training part was learnt."""
    real = ShapesDataset("val", num_samples=200).images
    other = ShapesDataset("test", num_samples=200).images
    # c2st shuffles each set with the seeded generator; rebuild that order to plant the fakes
    gen = torch.Generator().manual_seed(0)
    torch.randperm(200, generator=gen)  # the real set's shuffle
    order = torch.randperm(200, generator=gen)
    fake = other.clone()
    fake[order[:100]] = torch.rand(100, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert abs(c2st_accuracy(real, fake, C2STConfig(steps=60)) - 0.5) < 0.15
    noise = torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert c2st_accuracy(real, noise, C2STConfig(steps=60)) > 0.95


def test_bad_input_is_named():
    x = torch.rand(8, 3, 16, 16)
    with pytest.raises(ValueError, match=r"same shape \[C, H, W\], got \(3, 16, 16\) and "
                                         r"\(1, 16, 16\)"):
        c2st_accuracy(x, torch.rand(8, 1, 16, 16))
    with pytest.raises(ValueError, match=r"fake must be a float tensor \[N, C, H, W\]"):
        c2st_accuracy(x, torch.zeros(8, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="needs images to train on and to hold out: 1 per set"):
        c2st_accuracy(x[:1], x[:1])
    with pytest.raises(ValueError, match=r"train_fraction must lie in \(0, 1\)"):
        c2st_accuracy(x, x, C2STConfig(train_fraction=1.0))
    with pytest.raises(ValueError, match="steps must be a positive int"):
        c2st_accuracy(x, x, C2STConfig(steps=0))


def test_small_sets_train_for_at_most_max_epochs_passes(monkeypatch):
    """The step count is min(steps, ceil(max_epochs * n_train / half batch)): 8 + 8 images with
    4 for training, batch 64 (halves of 4) and 60 passes take 60 steps, not 400."""
    import mtcore_tasks.c2st as c2st

    calls = []
    real_step = torch.optim.Adam.step

    def counting(self, *a, **k):
        calls.append(1)
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", counting)
    x = torch.rand(8, 3, 16, 16)
    c2st.c2st_accuracy(x, x.flip(3))
    assert len(calls) == 60
    calls.clear()
    c2st.c2st_accuracy(x, x.flip(3), C2STConfig(steps=7))
    assert len(calls) == 7

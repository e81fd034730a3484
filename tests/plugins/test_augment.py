"""DiffAugment transforms of the GAN discriminator's inputs: each checked against its definition."""

from __future__ import annotations

import pytest
import torch

from mtcore_tasks.augment import check_policy, color, cutout, diff_augment, translation
from mtcore_tasks.generators import Discriminator


def _shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x moved down by dy and right by dx, zeros where nothing moved in (by hand, with slices)."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[..., max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def test_translation_is_a_zero_filled_shift_within_the_ratio():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 16, 16)
    y = translation(x, ratio=0.125)  # up to 2 pixels each way at 16 px
    seen = set()
    for i in range(x.shape[0]):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(y[i], _shifted(x[i], dy, dx))]
        assert len(matches) == 1, i
        seen.add(matches[0])
    assert len(seen) > 10  # the shifts differ per sample


def test_cutout_zeroes_one_square_and_keeps_the_rest():
    torch.manual_seed(1)
    x = torch.rand(32, 3, 16, 16) + 1.0  # no zeros of its own
    y = cutout(x, ratio=0.5)
    for i in range(x.shape[0]):
        zero = (y[i] == 0).all(0)
        assert ((y[i] == x[i]).all(0) | zero).all()  # every pixel kept or zeroed in all channels
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        assert 1 <= len(rows) <= 8 and 1 <= len(cols) <= 8  # side 8, clipped at the border
        assert zero[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a solid box
        assert int(zero.sum()) == len(rows) * len(cols)


def test_color_on_grey_images_is_a_per_sample_affine_map():
    torch.manual_seed(2)
    grey = torch.rand(16, 1, 8, 8).expand(16, 3, 8, 8).contiguous()
    y = color(grey)
    # saturation does nothing to grey; brightness adds, contrast scales about the mean
    for i in range(grey.shape[0]):
        a = grey[i] - grey[i].mean()
        b = y[i] - y[i].mean()
        k = float((a * b).sum() / (a * a).sum())
        assert 0.5 <= k <= 1.5
        torch.testing.assert_close(b, k * a, atol=1e-5, rtol=1e-5)


def test_diff_augment_is_differentiable_and_check_policy_rejects_unknown_names():
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    diff_augment(x, check_policy("color,translation,cutout")).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"unknown augmentation\(s\) \['flip'\]"):
        check_policy(["color", "flip"])


def test_discriminator_augments_only_in_train_mode():
    d = Discriminator(3, (16, 16), width=8, augment=["translation", "cutout"])
    plain = Discriminator(3, (16, 16), width=8)
    plain.load_state_dict(d.state_dict())
    x = torch.rand(8, 3, 16, 16)
    d.eval(), plain.eval()
    torch.testing.assert_close(d(x), plain(x))
    d.train(), plain.train()
    assert not torch.allclose(d(x), plain(x))


def test_cutout_covers_both_borders_equally_often():
    """The square's position is symmetric: opposite border rows (columns) are cut equally often
    (here exactly: 3 of the 9 possible top rows cover row 0, 3 cover row 7)."""
    torch.manual_seed(3)
    y = cutout(torch.ones(9000, 1, 8, 8), ratio=0.5)
    cut = y[:, 0] == 0
    rows = cut.any(2).float().mean(0)  # [8]: fraction of images in which each row was cut
    cols = cut.any(1).float().mean(0)
    for a, b in ((rows[0], rows[7]), (cols[0], cols[7]), (rows[1], rows[6])):
        assert abs(float(a) - float(b)) < 0.03
    assert abs(float(rows[0]) - 3 / 9) < 0.03

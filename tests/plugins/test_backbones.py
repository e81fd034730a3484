"""Tests of the first-party backbones: declared feature maps match what forward returns, strides
hold for several image sizes, gradients reach every parameter, and bad input gets a clear error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtcore.backbone import Backbone
from mtcore_backbones.blocks import BasicBlock, group_count, make_norm
from mtcore_backbones.resnet import ResNetBackbone
from mtcore_backbones.small_conv import SmallConvBackbone
from mtcore_backbones.unet import UNetBackbone

# (factory, coarsest stride); small widths keep the tests fast on CPU
CASES = {
    "small_conv": (lambda c, norm: SmallConvBackbone(c, width=4, depth=3, norm=norm), 8),
    "resnet": (lambda c, norm: ResNetBackbone(c, width=4, blocks=(1, 2, 1), norm=norm), 4),
    "unet": (lambda c, norm: UNetBackbone(c, width=4, depth=3, norm=norm), 8),
    "unet_dec": (lambda c, norm: UNetBackbone(c, width=4, depth=2, norm=norm, decoder=True), 4),
}


def check_outputs(model: Backbone, images: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    """Keys, order, channels and spatial size of every feature map match ``feature_info``."""
    assert list(out) == [f.name for f in model.feature_info]
    n, _, h, w = images.shape
    for info in model.feature_info:
        assert tuple(out[info.name].shape) == (n, info.channels, h // info.stride, w // info.stride), info


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_outputs_match_feature_info(case, norm):
    factory, max_stride = CASES[case]
    model = factory(3, norm)
    strides = [f.stride for f in model.feature_info]
    assert strides == sorted(strides) and strides[0] == 1 and strides[-1] == max_stride
    assert model.deepest == model.feature_info[-1]
    for h, w in [(16, 24), (max_stride, 3 * max_stride)]:
        images = torch.randn(2, 3, h, w)
        check_outputs(model, images, model(images))


@pytest.mark.parametrize("case", list(CASES))
def test_sizes_not_divisible_by_the_coarsest_stride_are_rejected(case):
    factory, max_stride = CASES[case]
    model = factory(1, "batch")
    with pytest.raises(ValueError, match=rf"divisible by {max_stride}.*\(2, 1, 33, 32\)"):
        model(torch.randn(2, 1, 33, 32))
    with pytest.raises(ValueError, match=rf"divisible by {max_stride}"):
        model(torch.randn(2, 1, 32, 32 + max_stride // 2))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_gradients_reach_every_parameter(case, norm):
    factory, _ = CASES[case]
    model = factory(2, norm)
    images = torch.randn(2, 2, 16, 16, requires_grad=True)
    out = model(images)
    gen = torch.Generator().manual_seed(0)
    # a random projection of every output (a plain sum would be blind through BatchNorm)
    loss = sum((v * torch.randn(v.shape, generator=gen)).sum() for v in out.values())
    loss.backward()
    assert images.grad is not None and torch.count_nonzero(images.grad) > 0
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and torch.count_nonzero(p.grad) > 0, name


@pytest.mark.parametrize("case", list(CASES))
def test_channels_last_gives_the_same_result(case):
    factory, _ = CASES[case]
    torch.manual_seed(0)
    model = factory(3, "batch").eval()
    images = torch.randn(2, 3, 16, 16)
    ref = model(images)
    model_cl = model.to(memory_format=torch.channels_last)
    got = model_cl(images.to(memory_format=torch.channels_last))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)


def test_unet_decoder_flag_adds_dec1_only():
    plain = UNetBackbone(3, width=8, depth=3)
    dec = UNetBackbone(3, width=8, depth=3, decoder=True)
    assert [f.name for f in plain.feature_info] == ["enc1", "enc2", "enc3", "bottleneck"]
    assert [(f.name, f.channels, f.stride) for f in dec.feature_info] == [
        ("enc1", 8, 1), ("dec1", 8, 1), ("enc2", 16, 2), ("enc3", 32, 4), ("bottleneck", 64, 8)
    ]
    assert plain.deepest.name == dec.deepest.name == "bottleneck"
    assert dec.feature("dec1").channels == 8
    n_plain = sum(p.numel() for p in plain.parameters())
    n_dec = sum(p.numel() for p in dec.parameters())
    assert n_dec > n_plain


def test_depth_one_and_config_style_params():
    model = UNetBackbone(1, width=2, depth=1, norm="group", decoder=True)
    images = torch.randn(1, 1, 6, 10)
    check_outputs(model, images, model(images))
    model = ResNetBackbone(1, width=2, blocks=[1], norm="none")  # a TOML list
    assert [f.stride for f in model.feature_info] == [1]
    check_outputs(model, torch.randn(1, 1, 5, 7), model(torch.randn(1, 1, 5, 7)))
    model = SmallConvBackbone(1, width=3, depth=1)
    assert [(f.name, f.channels) for f in model.feature_info] == [("s1", 3), ("s2", 6)]


def test_basic_block_is_residual():
    torch.manual_seed(0)
    block = BasicBlock(4, 4, "batch").eval()
    nn.init.zeros_(block.body[1][1].weight)  # last norm's gamma = 0 and beta = 0: body outputs 0
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(block(x), torch.relu(x))  # identity shortcut
    down = BasicBlock(4, 8, "none", stride=2)
    assert isinstance(down.shortcut, nn.Sequential)  # projection when shape changes
    assert down(x).shape == (2, 8, 3, 3)


def test_norm_layers():
    assert isinstance(make_norm("batch", 6), nn.BatchNorm2d)
    assert isinstance(make_norm("none", 6), nn.Identity)
    gn = make_norm("group", 12)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 6
    assert [group_count(c) for c in (1, 7, 9, 16, 48)] == [1, 7, 3, 8, 8]
    conv = SmallConvBackbone(1, width=2, depth=1, norm="none").stem[0]
    assert conv.bias is not None  # without a norm the conv keeps its bias
    assert SmallConvBackbone(1, width=2, depth=1).stem[0].bias is None


@pytest.mark.parametrize("cls", [SmallConvBackbone, ResNetBackbone, UNetBackbone])
def test_parameter_validation(cls):
    name = cls.__name__
    with pytest.raises(ValueError, match=rf"{name}: width must be >= 1, got 0"):
        cls(3, width=0)
    with pytest.raises(TypeError, match=rf"{name}: width must be an int"):
        cls(3, width=8.0)
    with pytest.raises(TypeError, match=rf"{name}: in_channels must be an int"):
        cls(True)
    with pytest.raises(ValueError, match=rf"{name}: in_channels must be >= 1"):
        cls(0)
    with pytest.raises(ValueError, match=r"norm must be one of \['batch', 'group', 'none'\], got 'layer'"):
        cls(3, norm="layer")
    if cls is ResNetBackbone:
        with pytest.raises(TypeError, match="blocks must be a non-empty sequence"):
            cls(3, blocks=())
        with pytest.raises(TypeError, match="blocks must be a non-empty sequence"):
            cls(3, blocks=2)
        with pytest.raises(ValueError, match=r"blocks\[1\] must be >= 1, got 0"):
            cls(3, blocks=(2, 0))
    else:
        with pytest.raises(ValueError, match=rf"{name}: depth must be >= 1, got 0"):
            cls(3, depth=0)
    if cls is UNetBackbone:
        with pytest.raises(TypeError, match="decoder must be a bool"):
            cls(3, decoder="yes")


def test_bad_images_are_rejected():
    model = UNetBackbone(3, width=2, depth=1)
    with pytest.raises(ValueError, match=r"shape \[N, 3, H, W\], got \(3, 8, 8\)"):
        model(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match=r"shape \[N, 3, H, W\], got \(1, 1, 8, 8\)"):
        model(torch.randn(1, 1, 8, 8))
    with pytest.raises(TypeError, match="floating-point.*torch.uint8"):
        model(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        model([[0.0]])

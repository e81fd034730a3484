"""Registers the first-party backbones (entry point ``mtcore = backbones``)."""

from mtcore.plugin import BackboneSpec, hookimpl

from .resnet import ResNetBackbone
from .small_conv import SmallConvBackbone
from .unet import UNetBackbone


@hookimpl
def mtcore_backbones():
    yield BackboneSpec("small_conv", SmallConvBackbone, "Plain conv-BN-ReLU stages, stride 2 each.")
    yield BackboneSpec("resnet", ResNetBackbone, "ResNet-style basic residual blocks (He et al. 2016).")
    yield BackboneSpec("unet", UNetBackbone,
                       "U-Net-style encoder with multi-scale skips, optional shared decoder.")

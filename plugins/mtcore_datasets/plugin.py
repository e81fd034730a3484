"""Registers the first-party datasets and training-time augmentations (entry point
``mtcore = datasets``)."""

from mtcore.plugin import AugmentSpec, DatasetSpec, hookimpl

from .augment import ColorJitter, Flip, RandomResizedCrop
from .digits import DigitsDataset
from .image_folder import image_folder
from .shapes import ShapesDataset


@hookimpl
def mtcore_datasets():
    yield DatasetSpec("shapes", ShapesDataset,
                      "Procedural shapes on texture: masks + labels, any size, no download.")
    yield DatasetSpec("digits", DigitsDataset,
                      "scikit-learn's 1,797 handwritten digits with foreground masks.")
    yield DatasetSpec("image_folder", image_folder,
                      "Your images, optional index/palette PNG masks and labels.csv.")


@hookimpl
def mtcore_augments():
    yield AugmentSpec("flip", Flip, "Mirror images and masks left-right (and/or top-bottom).")
    yield AugmentSpec("random_resized_crop", RandomResizedCrop,
                      "Crop a random box and resize it back: image bilinear, mask nearest.")
    yield AugmentSpec("color_jitter", ColorJitter,
                      "Random brightness, contrast and saturation per image.")

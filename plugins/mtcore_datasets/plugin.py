"""Registers the first-party datasets (entry point ``mtcore = datasets``)."""

from mtcore.plugin import DatasetSpec, hookimpl

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

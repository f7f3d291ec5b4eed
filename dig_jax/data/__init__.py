"""Data sources and the grain input pipelines."""
from dig_jax.data.imagefolder import ImageFolderSource
from dig_jax.data.latents import LatentSource
from dig_jax.data.pipeline import ordered_batches, train_dataset
from dig_jax.data.sources import SOURCES, DigitsSource, ImageSource, create_source, load_mnist_5k
from dig_jax.data.tfds_source import TfdsSource
from dig_jax.data.transforms import ToModelInput

__all__ = ["DigitsSource", "ImageFolderSource", "ImageSource", "LatentSource", "SOURCES",
           "TfdsSource", "ToModelInput", "create_source", "load_mnist_5k", "ordered_batches",
           "train_dataset"]

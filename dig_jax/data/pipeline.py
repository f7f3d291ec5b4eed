"""The grain input pipelines: shuffled training batches, and in-order batches for one-pass tools.

Per-example work (decoding, cropping, flips, latent draws) comes from the source's own
`transforms(image_size)`, so one pipeline serves pixels and cached latents alike.
"""
from __future__ import annotations

import grain
import jax
import numpy as np

from dig_jax.data.sources import ImageSource
from dig_jax.data.transforms import ToModelInput, pad_to_size  # noqa: F401  (public here too)


def _apply(ds: grain.MapDataset, transforms: list, seed: int) -> grain.MapDataset:
  for t in transforms:
    ds = ds.random_map(t, seed=seed) if isinstance(t, grain.transforms.RandomMap) else ds.map(t)
  return ds


def _to_iter(ds: grain.MapDataset, num_threads: int, num_workers: int) -> grain.IterDataset:
  """Reads with `num_threads` threads, in each of `num_workers` processes when > 0. Either way
  grain skips the None elements that transforms return for unusable files."""
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(4, num_threads))
  ds = ds.to_iter_dataset(options)
  if num_workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


def train_dataset(source: ImageSource, *, global_batch_size: int, image_size, seed: int,
                  process_index: int | None = None, process_count: int | None = None,
                  num_threads: int = 2, num_workers: int = 0) -> grain.IterDataset:
  """Infinite iterable of this process's batches ({"image": [b, H, W, C], "label": [b]}).

  Every process shuffles the same global order (reshuffled each epoch) and reads its own
  contiguous block of each global batch (process i: rows i*b .. (i+1)*b - 1, b = global batch /
  process count), so the global batch, assembled in process order, is row for row the one a
  single process reads: a run computes the same on any number of hosts. An unusable file shortens
  no batch: the next example of the process's share takes its place. Random transforms are
  seeded by the global position, so resuming replays them exactly.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} must be divisible by the number "
                     f"of processes {process_count}")
  size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  ds = _apply(ds, source.transforms(size), seed)
  local_batch = global_batch_size // process_count
  if process_count > 1:
    ds = grain.MapDataset.range(len(ds) // process_count).map(
        _ProcessShare(ds, global_batch_size, local_batch, process_index))
  ds = _to_iter(ds, num_threads, num_workers)
  return ds.batch(local_batch, drop_remainder=True)


class _ProcessShare(grain.transforms.Map):
  """Local position j -> the element at its global position: the j % b-th row of this process's
  block in global batch j // b."""

  def __init__(self, ds, global_batch: int, local_batch: int, process_index: int):
    self.ds, self.global_batch, self.local_batch = ds, global_batch, local_batch
    self.offset = process_index * local_batch

  def map(self, j):
    batch, row = divmod(int(j), self.local_batch)
    return self.ds[batch * self.global_batch + self.offset + row]


class _ReadAt(grain.transforms.Map):
  """Index -> the source's record, tagged with its index."""

  def __init__(self, source):
    self.source = source

  def map(self, index):
    return {**self.source[int(index)], "index": np.int64(index)}


def ordered_batches(source, indices: np.ndarray, transforms: list, batch_size: int, *,
                    num_threads: int = 8, num_workers: int = 0) -> grain.IterDataset:
  """The records at `indices` through `transforms`, in batches of up to `batch_size` (each element
  keeps its "index"); for one pass over a dataset, e.g. to cache latents. The order is kept as
  long as no transform drops an element (grain's workers hand out elements round-robin)."""
  ds = grain.MapDataset.source(np.asarray(indices, np.int64)).map(_ReadAt(source))
  ds = _apply(ds, transforms, seed=0)
  return _to_iter(ds, num_threads, num_workers).batch(batch_size)

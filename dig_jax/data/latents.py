"""The latent cache: VAE posteriors of a dataset in ArrayRecord shards, and the source that reads them.

A cache directory holds `metadata.json` and `latents-SSSSS-of-NNNNN.array_record`; shard s holds
the examples [s * shard_size, (s + 1) * shard_size) of the image source, less unusable files.
Each record is one image:

    int32 label (little-endian) | moments [2, 2, h, w, c] in `dtype` (C order)

where moments[0] is the unflipped image and moments[1] its mirror (flipped in pixel space before
encoding, so the flip augmentation is exact), each as (posterior mean, posterior std), unscaled.
Training draws a fresh latent per step from the chosen mirror (transforms.SampleLatent).
Written by `python -m dig_jax.tools.cache_latents`.
"""
from __future__ import annotations

import json
import os

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from dig_jax.data.transforms import SampleLatent

FORMAT = "dig-jax latent cache v1"
METADATA = "metadata.json"
_LABEL = np.dtype("<i4")


def shard_name(index: int, count: int) -> str:
  return f"latents-{index:05d}-of-{count:05d}.array_record"


def encode_record(label: int, moments: np.ndarray) -> bytes:
  return np.asarray(label, _LABEL).tobytes() + np.ascontiguousarray(moments).tobytes()


def decode_record(data: bytes, shape: tuple[int, ...], dtype: np.dtype) -> dict:
  label = np.frombuffer(data, _LABEL, count=1)[0]
  moments = np.frombuffer(data, dtype, offset=_LABEL.itemsize).reshape(shape)
  return {"moments": moments, "label": label}


def write_shard(path: str, records) -> int:
  """Writes encoded records to `path` atomically (a temporary file, then a rename), so a shard
  file that exists is complete; returns the number written."""
  tmp = path + ".incomplete"
  writer = ArrayRecordWriter(tmp, "group_size:1")  # group size 1: fast random access
  count = 0
  for record in records:
    writer.write(record)
    count += 1
  writer.close()
  os.replace(tmp, path)
  return count


def read_metadata(directory: str) -> dict:
  path = os.path.join(directory, METADATA)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no latent cache at {directory!r} (missing {METADATA}); write one "
                            f"with: python -m dig_jax.tools.cache_latents --config ... --out "
                            f"{directory}")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path} is not a {FORMAT!r} (format: {meta.get('format')!r})")
  return meta


def missing_shards(directory: str, meta: dict) -> list[str]:
  names = [shard_name(i, meta["num_shards"]) for i in range(meta["num_shards"])]
  return [n for n in names if not os.path.isfile(os.path.join(directory, n))]


class LatentSource:
  """[i] -> {"moments": [2, 2, h, w, c], "label"}; the model sees scale * (one latent draw)."""

  def __init__(self, directory: str, scale: float):
    meta = read_metadata(directory)
    missing = missing_shards(directory, meta)
    if missing:
      raise FileNotFoundError(
          f"latent cache {directory!r} is incomplete: {len(missing)} of {meta['num_shards']} "
          f"shards missing (first: {missing[0]}); run cache_latents again with the same --out "
          f"to finish it")
    self.directory, self.scale, self.meta = directory, scale, meta
    self.num_classes = meta["num_classes"]
    self.image_shape = tuple(meta["latent_shape"])
    self._shape = (2, 2, *self.image_shape)
    self._dtype = np.dtype(meta["dtype"])
    self._records = grain.sources.ArrayRecordDataSource(
        [os.path.join(directory, shard_name(i, meta["num_shards"]))
         for i in range(meta["num_shards"])])
    if not len(self._records):
      raise ValueError(f"latent cache {directory!r} holds no examples")

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    return decode_record(self._records[index], self._shape, self._dtype)

  def transforms(self, image_size: tuple[int, int]) -> list:
    if tuple(image_size) != self.image_shape[:2]:
      h, w, c = self.image_shape
      raise ValueError(
          f"latent cache {self.directory!r} holds {h}x{w}x{c} latents of "
          f"{self.meta['pixel_size']} px images, but the config's image size is {image_size}; "
          f"set config.data.image_size={h} or cache the images at the matching size")
    return [SampleLatent(self.scale)]

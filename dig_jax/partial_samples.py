"""Samples kept on disk while they are made, so a long sampling run survives an interruption.

FID wants 50,000 images: hours of sampling. `PartialSamples` keeps `<npz>.partial.npz` beside
the final file: the uint8 images and labels of every finished batch, and a fingerprint of all
that decides them (checkpoint, labels, seed, sampler settings, images per batch). Run again with
the same settings, sampling resumes after the last saved batch (batch i's noise depends only on
the seed and i, so the result is the uninterrupted run's); with other settings it is refused,
so no run's images are mixed with, or overwritten by, another's. At the end the final npz
(arr_0 images, arr_1 labels) is written and the partial file removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np


def labels_digest(labels: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(labels, np.int64).tobytes()).hexdigest()[:16]


def _atomic_savez(path: str, **arrays):
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:  # a file object: numpy appends no second .npz
    np.savez(f, **arrays)
  os.replace(tmp, path)


class PartialSamples:
  """Finished batches of one sampling run, saved every `save_every_s` seconds (and on demand)."""

  def __init__(self, npz_path: str, labels: np.ndarray, per_batch: int, fingerprint: dict,
               save_every_s: float = 300.0):
    self.path = npz_path
    self.partial_path = npz_path + ".partial.npz"
    self.labels = np.asarray(labels)
    self.per_batch = per_batch
    self.fingerprint = json.dumps(dict(fingerprint, labels=labels_digest(labels),
                                       per_batch=per_batch), sort_keys=True)
    self.save_every_s = save_every_s
    self.images: list[np.ndarray] = []
    self._saved_count = 0
    self._last_save = time.monotonic()

  @property
  def count(self) -> int:
    return sum(len(x) for x in self.images)

  def resume(self) -> int:
    """Loads a partial file of the same run, if any; returns the first batch still to make."""
    if not os.path.exists(self.partial_path):
      return 0
    with np.load(self.partial_path) as f:
      theirs = str(f["fingerprint"])
      if theirs != self.fingerprint:
        raise ValueError(
            f"{self.partial_path} holds a partial run with other settings ({theirs}); rerun "
            f"with the same flags to finish it, or move it away to start this one")
      images = f["arr_0"]
    if len(images) % self.per_batch and len(images) != len(self.labels):
      raise ValueError(f"{self.partial_path}: {len(images)} images is not a whole number of "
                       f"batches of {self.per_batch}")
    self.images = [images]
    self._saved_count = len(images)
    return -(-len(images) // self.per_batch)  # a complete set ends in a short batch

  def add(self, batch_uint8: np.ndarray):
    self.images.append(batch_uint8)
    if time.monotonic() - self._last_save >= self.save_every_s:
      self.save()

  def save(self):
    """Writes the partial file (atomically), if there is anything new."""
    if self.count == self._saved_count:
      return
    images = np.concatenate(self.images)
    self.images = [images]
    _atomic_savez(self.partial_path, arr_0=images, arr_1=self.labels[:len(images)],
                  fingerprint=np.array(self.fingerprint))
    self._saved_count = len(images)
    self._last_save = time.monotonic()

  def finish(self) -> np.ndarray:
    """Writes the final npz, removes the partial file; returns all the images."""
    images = np.concatenate(self.images)
    if len(images) != len(self.labels):
      raise ValueError(f"{len(images)} images for {len(self.labels)} labels")
    _atomic_savez(self.path, arr_0=images, arr_1=self.labels)
    if os.path.exists(self.partial_path):
      os.remove(self.partial_path)
    return images

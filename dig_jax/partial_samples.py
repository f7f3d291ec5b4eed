"""Samples kept on disk while they are made, so a long sampling run survives an interruption.

FID wants 50,000 images: hours of sampling, 10 GB of uint8 pixels at 256 px. `PartialSamples`
keeps the folder `<npz>.partial/` beside the final file: a fingerprint of all that decides the
images (checkpoint, labels, seed, sampler settings, images per batch) and the finished batches
as .npy shards, one per save, so memory holds only the batches since the last save. Run again
with the same settings, sampling resumes after the last saved batch (batch i's noise depends
only on the seed and i, so the result is the uninterrupted run's); with other settings it is
refused, so no run's images are mixed with, or overwritten by, another's. At the end the
shards are streamed into the final npz (arr_0 images, arr_1 labels, what np.savez writes) and
the folder is removed.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
import zipfile

import numpy as np

FINGERPRINT = "fingerprint.json"


def labels_digest(labels: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(labels, np.int64).tobytes()).hexdigest()[:16]


def _write_npy_member(archive: zipfile.ZipFile, name: str, parts, shape, dtype):
  """One .npy member of `shape` from `parts` (arrays whose rows, in order, make it up)."""
  with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
    np.lib.format.write_array_header_2_0(
        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
            "shape": tuple(shape)})
    for part in parts:
      f.write(np.ascontiguousarray(part, dtype).tobytes())


class PartialSamples:
  """Finished batches of one sampling run, saved every `save_every_s` seconds (and on demand)."""

  def __init__(self, npz_path: str, labels: np.ndarray, per_batch: int, fingerprint: dict,
               save_every_s: float = 300.0, writer: bool = True):
    self.writer = writer  # several processes: all resume alike, one keeps and writes images
    self.path = npz_path
    self.partial_path = npz_path + ".partial"
    self.labels = np.asarray(labels)
    self.per_batch = per_batch
    self.fingerprint = dict(fingerprint, labels=labels_digest(labels), per_batch=per_batch)
    self.save_every_s = save_every_s
    self._unsaved: list[np.ndarray] = []
    self._saved_count = 0
    self._last_save = time.monotonic()

  @property
  def count(self) -> int:
    return self._saved_count + sum(len(x) for x in self._unsaved)

  def _shards(self) -> list[str]:
    return sorted(glob.glob(os.path.join(self.partial_path, "shard_*.npy")))

  def resume(self) -> int:
    """Takes up a partial run of the same settings, if any; returns the first batch to make."""
    meta = os.path.join(self.partial_path, FINGERPRINT)
    if not os.path.exists(meta):
      return 0
    with open(meta) as f:
      theirs = json.load(f)
    if theirs != json.loads(json.dumps(self.fingerprint)):
      raise ValueError(
          f"{self.partial_path} holds a partial run with other settings ({theirs}); rerun "
          f"with the same flags to finish it, or move it away to start this one")
    count = sum(len(np.load(p, mmap_mode="r")) for p in self._shards())
    if count % self.per_batch and count != len(self.labels):
      raise ValueError(f"{self.partial_path}: {count} images is not a whole number of "
                       f"batches of {self.per_batch}")
    self._saved_count = count
    return -(-count // self.per_batch)  # a complete set ends in a short batch

  def add(self, batch_uint8: np.ndarray):
    if not self.writer:
      return
    self._unsaved.append(batch_uint8)
    if time.monotonic() - self._last_save >= self.save_every_s:
      self.save()

  def save(self):
    """Writes the batches since the last save as one more shard (whole files only)."""
    if not self.writer or not self._unsaved:
      return
    os.makedirs(self.partial_path, exist_ok=True)
    meta = os.path.join(self.partial_path, FINGERPRINT)
    if not os.path.exists(meta):
      with open(meta + ".tmp", "w") as f:
        json.dump(self.fingerprint, f, indent=1)
      os.replace(meta + ".tmp", meta)
    shard = os.path.join(self.partial_path, f"shard_{self._saved_count:09d}.npy")
    with open(shard + ".tmp", "wb") as f:
      np.save(f, np.concatenate(self._unsaved))
    os.replace(shard + ".tmp", shard)
    self._saved_count = self.count
    self._unsaved = []
    self._last_save = time.monotonic()

  def finish(self):
    """Writes the final npz from the shards and the unsaved batches, then removes the folder."""
    if not self.writer:
      return
    if self.count != len(self.labels):
      raise ValueError(f"{self.count} images for {len(self.labels)} labels")
    parts = [np.load(p, mmap_mode="r") for p in self._shards()] + self._unsaved
    shape = (self.count, *parts[0].shape[1:])
    tmp = f"{self.path}.tmp-{os.getpid()}"
    with zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
      _write_npy_member(archive, "arr_0", parts, shape, np.uint8)
      _write_npy_member(archive, "arr_1", [self.labels], self.labels.shape, self.labels.dtype)
    os.replace(tmp, self.path)
    shutil.rmtree(self.partial_path, ignore_errors=True)

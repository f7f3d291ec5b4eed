"""One array of an .npz file, read in batches of its first axis instead of all at once.

FID reads 50,000 sample images: 10 GB as one uint8 array at 256 px, 39 GB at 512 px. An .npz is
a zip of .npy files, so the array's header gives its shape and dtype and its rows follow in
order: reading them a batch at a time (from stored or deflated members alike) keeps one batch
in memory.
"""
from __future__ import annotations

import math
import zipfile

import numpy as np


class NpzArray:
  """`NpzArray(path, "arr_0")`: shape, dtype, len, and `batches(n)` yielding arrays in order."""

  def __init__(self, path: str, key: str):
    self.path, self.key = path, key
    with zipfile.ZipFile(path) as archive:
      names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
      if key not in names:
        raise KeyError(f"{path} has no array {key!r}; it holds {sorted(names)}")
      with archive.open(f"{key}.npy") as f:
        self.shape, fortran_order, self.dtype = _read_header(f)
    if fortran_order or self.dtype.hasobject or not self.shape:
      raise ValueError(f"{path}: {key} is not a C-ordered numeric array with a batch axis")

  def __len__(self) -> int:
    return self.shape[0]

  def batches(self, batch_size: int):
    row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
    with zipfile.ZipFile(self.path) as archive, archive.open(f"{self.key}.npy") as f:
      _read_header(f)
      for start in range(0, len(self), batch_size):
        rows = min(batch_size, len(self) - start)
        data = f.read(rows * row_bytes)
        if len(data) != rows * row_bytes:
          raise ValueError(f"{self.path}: {self.key} ends after {start} of {len(self)} rows")
        yield np.frombuffer(data, self.dtype).reshape(rows, *self.shape[1:])


def _read_header(f):
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  return np.lib.format.read_array_header_2_0(f)

"""Reads a PyTorch state dict (saved by `torch.save`) into numpy arrays, without torch.

The project does not depend on torch, yet users supply pytorch-fid's Inception weights as a .pth
file. Such a file (torch >= 1.6's default format) is a zip archive with one top-level folder
holding `data.pkl`, a pickle of the state dict in which every tensor refers by key to a raw
little-endian storage `data/<key>`. The pickle is read by an unpickler that knows only the few
globals a state dict needs and refuses every other, so an untrusted file cannot run code.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str
  dtype: np.dtype


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                    metadata=None):
  """A numpy copy of the view (offset, size, stride) of a storage, checked to lie inside it."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, np.ndarray):
    raise ValueError(f"a tensor's storage is a {type(storage).__name__}, not a storage")
  size, stride = tuple(size), tuple(stride)
  if len(size) != len(stride) or min(stride, default=0) < 0 or storage_offset < 0:
    raise ValueError(f"bad tensor layout: size {size}, stride {stride}, offset {storage_offset}")
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))  # as_strided won't check
  if 0 not in size and last >= len(storage):
    raise ValueError(f"a tensor (size {size}, stride {stride}, offset {storage_offset}) reaches "
                     f"past the end of its storage of {len(storage)} elements")
  view = np.lib.stride_tricks.as_strided(storage[storage_offset:], size,
                                         [s * storage.itemsize for s in stride], writeable=False)
  return np.array(view)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
  del requires_grad, backward_hooks, state
  return data


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name, np.dtype(dtype))
       for name, dtype in _STORAGE_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
  """Knows only the globals of a state dict; loads each storage from the zip once, when used."""

  def __init__(self, file, archive: zipfile.ZipFile, folder: str):
    super().__init__(file)
    self._archive, self._folder, self._storages = archive, folder, {}

  def find_class(self, module, name):
    if (module, name) not in _GLOBALS:
      raise ValueError(f"refusing to load global {module}.{name}: a torch state dict needs only "
                       "tensors (of the typed storages) in an OrderedDict")
    return _GLOBALS[module, name]

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise ValueError(f"unknown persistent id {pid!r}")
    _, storage_type, key, _, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise ValueError(f"unsupported storage type {storage_type!r}")
    if key not in self._storages:
      raw = self._archive.read(f"{self._folder}/data/{key}")
      storage = np.frombuffer(raw, storage_type.dtype)  # little-endian, like the hosts jax runs on
      if len(storage) < numel:
        raise ValueError(f"storage {key} holds {len(storage)} elements, not {numel}")
      self._storages[key] = storage
    return self._storages[key]


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a state dict saved by `torch.save` in torch's (default) zip format."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such torch checkpoint: {path}")
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path} is not a zip archive, so not torch >= 1.6's format (an older torch's "
                     "legacy format?); re-save it with a recent torch: "
                     "torch.save(torch.load(old_path), new_path)")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"{path} holds {len(pickles)} top-level <folder>/data.pkl, not 1: not a "
                       "torch checkpoint")
    folder = pickles[0].split("/")[0]
    if f"{folder}/byteorder" in archive.namelist():
      byteorder = archive.read(f"{folder}/byteorder").decode().strip()
      if byteorder != "little":
        raise ValueError(f"{path} was saved {byteorder}-endian; only little-endian is read")
    with archive.open(pickles[0]) as f:
      state = _Unpickler(f, archive, folder).load()
  if not isinstance(state, dict):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
  for name, value in state.items():
    if not isinstance(value, np.ndarray):
      raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
  return dict(state)

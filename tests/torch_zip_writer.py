"""Writes a state dict in torch's zip checkpoint format without torch, for tests of its reader.

The file is what `torch.save(state_dict, path)` writes: `<folder>/data.pkl` (a protocol-2 pickle
of an OrderedDict whose tensors are REDUCEs of `torch._utils._rebuild_tensor_v2` on persistent
storage ids), the raw storages `<folder>/data/<key>`, `<folder>/version` and `<folder>/byteorder`.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import zipfile

import ml_dtypes
import numpy as np

STORAGE_NAMES = {
    np.dtype(np.float64): "DoubleStorage", np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage",
    np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage",
}


class Global:
  """Pickled as `GLOBAL module name`, whatever it stands for (callable, so it may head a REDUCE)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise TypeError("a marker, only for pickling")


REBUILD_TENSOR = Global("torch._utils", "_rebuild_tensor_v2")
REBUILD_PARAMETER = Global("torch._utils", "_rebuild_parameter")


@dataclasses.dataclass(eq=False)
class StridedTensor:
  """A tensor viewing `storage` (1-D, possibly shared by several tensors) at offset and stride."""
  storage: np.ndarray
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]
  parameter: bool = False  # wrapped in torch._utils._rebuild_parameter, as nn.Parameter is


class _Pickler(pickle._Pickler):
  """Pure-Python pickler (its dispatch table is extensible) that writes tensors as torch does."""
  dispatch = dict(pickle._Pickler.dispatch)

  def __init__(self, file, storage_keys: dict[int, str]):
    super().__init__(file, protocol=2)
    self.storage_keys = storage_keys  # id(storage array) -> key

  def persistent_id(self, obj):
    if isinstance(obj, np.ndarray) and id(obj) in self.storage_keys:
      storage_type = Global("torch", STORAGE_NAMES[obj.dtype])
      return ("storage", storage_type, self.storage_keys[id(obj)], "cpu", obj.size)
    return None

  def save_marker(self, obj: Global):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  def save_tensor(self, obj: StridedTensor):
    if obj.parameter:  # _rebuild_parameter(_rebuild_tensor_v2(...), requires_grad, hooks)
      tensor = dataclasses.replace(obj, parameter=False)
      self.save_reduce(REBUILD_PARAMETER, (tensor, True, collections.OrderedDict()), obj=obj)
    else:  # requires_grad False, no backward hooks
      args = (obj.storage, obj.offset, tuple(obj.shape), tuple(obj.stride), False,
              collections.OrderedDict())
      self.save_reduce(REBUILD_TENSOR, args, obj=obj)

  dispatch[Global] = save_marker
  dispatch[StridedTensor] = save_tensor


def _own_storage(array: np.ndarray) -> StridedTensor:
  array = np.asarray(array, order="C")  # (np.ascontiguousarray makes 0-d arrays 1-d)
  return StridedTensor(array.reshape(-1), 0, array.shape,
                       tuple(s // array.itemsize for s in array.strides))


def write_state_dict(path, tensors: dict, folder: str = "archive") -> None:
  """Writes {name: np.ndarray | StridedTensor | anything picklable} as torch.save would.

  An ndarray gets a storage of its own; StridedTensors whose `storage` is the same array share
  one. Other values are pickled as they are (a test plants forbidden globals that way).
  """
  tensors = {name: _own_storage(v) if isinstance(v, np.ndarray) else v
             for name, v in tensors.items()}
  storages = {}
  for t in tensors.values():
    if isinstance(t, StridedTensor):
      storages.setdefault(id(t.storage), t.storage)
  keys = {i: str(k) for k, i in enumerate(storages)}
  buffer = io.BytesIO()
  _Pickler(buffer, keys).dump(collections.OrderedDict(tensors))
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr(f"{folder}/data.pkl", buffer.getvalue())
    archive.writestr(f"{folder}/byteorder", "little")
    for i, storage in storages.items():
      archive.writestr(f"{folder}/data/{keys[i]}", np.ascontiguousarray(storage).tobytes())
    archive.writestr(f"{folder}/version", "3\n")

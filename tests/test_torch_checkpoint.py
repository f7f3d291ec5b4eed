"""The torch-free reader of torch.save'd state dicts, on files from tests/torch_zip_writer.py."""
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest
from torch_zip_writer import Global, StridedTensor, write_state_dict

from dig_jax.evaluate.torch_checkpoint import read_state_dict


def _nonzero(rng, shape, dtype):
  """Random values, none of them zero (a reader that drops data cannot pass by luck)."""
  return (rng.uniform(0.5, 2, shape) * rng.choice([-1, 1], shape)).astype(dtype)


def test_round_trip_of_dtypes_and_scalars(tmp_path, rng):
  tensors = {
      "conv.weight": _nonzero(rng, (4, 3, 2, 2), np.float32),
      "fc.bias": _nonzero(rng, (7,), np.float16),
      "emb": _nonzero(rng, (3, 5), ml_dtypes.bfloat16),
      "ids": rng.integers(1, 2**40, (2, 3)).astype(np.int64),
      "bn.num_batches_tracked": np.array(rng.integers(1, 1000), np.int64),  # 0-d
      "scale": np.array(rng.uniform(1, 2), np.float32),
  }
  path = tmp_path / "model.pth"
  write_state_dict(path, tensors)
  out = read_state_dict(str(path))
  assert list(out) == list(tensors)
  for name, want in tensors.items():
    assert out[name].dtype == want.dtype and out[name].shape == want.shape, name
    np.testing.assert_array_equal(out[name], want, err_msg=name)


def test_views_of_one_shared_storage(tmp_path, rng):
  raw = _nonzero(rng, (30,), np.float32)
  tensors = {
      "whole": StridedTensor(raw, 0, (30,), (1,)),
      "transposed": StridedTensor(raw, 5, (3, 4), (1, 6)),  # [i, j] = raw[5 + i + 6 j]
      "param": StridedTensor(raw, 2, (2, 2), (2, 1), parameter=True),
  }
  path = tmp_path / "shared.pth"
  write_state_dict(path, tensors)
  with zipfile.ZipFile(path) as archive:
    assert [n for n in archive.namelist() if "/data/" in n] == ["archive/data/0"]
  out = read_state_dict(str(path))
  np.testing.assert_array_equal(out["whole"], raw)
  np.testing.assert_array_equal(out["transposed"], raw[5:29].reshape(4, 6)[:, :3].T)
  np.testing.assert_array_equal(out["param"], raw[2:6].reshape(2, 2))
  assert out["transposed"].flags.writeable and out["transposed"].base is None  # own copies


def test_other_top_level_folder(tmp_path, rng):
  want = _nonzero(rng, (3, 3), np.float32)
  path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  write_state_dict(path, {"w": want}, folder="pt_inception-2015-12-05-6726825d")
  np.testing.assert_array_equal(read_state_dict(str(path))["w"], want)


class _RunsCommand:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return Global("os", "system"), (f"touch {self.marker}",)


def test_forbidden_global_is_refused_and_not_run(tmp_path, rng):
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pth"
  write_state_dict(path, {"w": _nonzero(rng, (2,), np.float32), "x": _RunsCommand(marker)})
  with zipfile.ZipFile(path) as archive:
    assert b"cos\nsystem\n" in archive.read("archive/data.pkl")
  with pytest.raises(ValueError, match=r"os\.system"):
    read_state_dict(str(path))
  assert not marker.exists()


def test_storage_type_without_a_dtype_is_refused(tmp_path):
  path = tmp_path / "untyped.pth"
  write_state_dict(path, {"s": Global("torch", "UntypedStorage")})
  with pytest.raises(ValueError, match=r"torch\.UntypedStorage"):
    read_state_dict(str(path))


def test_tensor_past_its_storage_is_refused(tmp_path, rng):
  path = tmp_path / "overrun.pth"
  write_state_dict(path, {"w": StridedTensor(_nonzero(rng, (6,), np.float32), 2, (3, 2), (2, 1))})
  with pytest.raises(ValueError, match="past the end"):
    read_state_dict(str(path))


def test_legacy_and_missing_files_give_clear_errors(tmp_path):
  legacy = tmp_path / "legacy.pth"
  legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))  # legacy magic first
  with pytest.raises(ValueError, match=r"torch\.save\(torch\.load\(old_path\), new_path\)"):
    read_state_dict(str(legacy))
  missing = os.path.join(tmp_path, "nope.pth")
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    read_state_dict(missing)

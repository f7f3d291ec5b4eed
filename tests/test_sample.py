"""sample.py: a PNG grid and npz from a checkpoint; bad inputs stop with one clear line."""
import os

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from dig_jax.sample import load_run, parse_classes, save_grid


def test_sample_cli_writes_grid_and_npz(tiny_run, tmp_path):
  png, npz = str(tmp_path / "grid.png"), str(tmp_path / "s.npz")
  result = run_cli("sample.py", "--workdir", tiny_run, "--classes", "1,7,9", "--num_per_class",
                   "2", "--steps", "3", "--cfg_scale", "2.0", "--out", png, "--npz", npz)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "from step 4" in result.stdout
  # 3 rows (classes) x 2 columns of 32x32 digits with 2-pixel borders.
  assert Image.open(png).size == (2 * 34 + 2, 3 * 34 + 2) and Image.open(png).mode == "L"
  with np.load(npz) as f:
    assert f["arr_0"].shape == (6, 32, 32, 1) and f["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(f["arr_1"], [1, 1, 7, 7, 9, 9])
    assert f["arr_0"].std() > 0  # not a blank image


def test_ddim_from_an_older_step_with_raw_weights(tiny_run):
  config, model, step = load_run(tiny_run, 2, ema=False)
  assert step == 2 and model.num_classes == 10 and config.model.depth == 2
  from dig_jax.sample import generate
  images = generate(model, np.array([0, 3, 3]), num_timesteps=1000, sampler="ddim", steps=2,
                    cfg_scale=1.0, batch_size=2)
  assert images.shape == (3, 32, 32, 1) and np.isfinite(images).all()


def test_save_grid_places_images_row_major(tmp_path, rng):
  images = rng.integers(0, 256, size=(6, 4, 5, 3), dtype=np.uint8)
  save_grid(images, rows=2, path=str(tmp_path / "g.png"), pad=1)
  grid = np.asarray(Image.open(tmp_path / "g.png"))
  assert grid.shape == (2 * 5 + 1, 3 * 6 + 1, 3)
  np.testing.assert_array_equal(grid[1 + 5:1 + 5 + 4, 1 + 2 * 6:1 + 2 * 6 + 5], images[5])


def test_parse_classes():
  assert parse_classes("all", 3) == [0, 1, 2]
  assert parse_classes("2, 0", 10) == [2, 0]
  for bad in ("10", "-1", "a,b", ""):
    with pytest.raises(ValueError, match="--classes"):
      parse_classes(bad, 10)


@pytest.mark.parametrize("args,message", [
    (["--classes", "12"], "class ids must be in [0, 9]"),
    (["--step", "3"], "no checkpoint at step 3 in"),
    (["--step", "-2"], "--step=-2; expected a checkpoint step >= 0"),
    (["--num_per_class", "0"], "--num_per_class=0; expected >= 1"),
])
def test_bad_inputs_leave_the_run_untouched(tiny_run, args, message):
  before = sorted(os.listdir(os.path.join(tiny_run, "checkpoints")))
  result = run_cli("sample.py", "--workdir", tiny_run, "--steps", "2", *args)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, result.stderr[-2000:]
  assert sorted(os.listdir(os.path.join(tiny_run, "checkpoints"))) == before


def test_missing_or_empty_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_run(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="no checkpoints in"):
    load_run(str(tmp_path))
  result = run_cli("sample.py", "--workdir", str(tmp_path / "nope"))
  assert result.returncode != 0 and "error: workdir" in result.stderr

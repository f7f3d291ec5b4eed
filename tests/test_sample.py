"""sample.py: a PNG grid and npz from a checkpoint; bad inputs stop with one clear line."""
import glob
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


def test_grid_without_npz_matches_the_grid_read_back_from_the_npz(tiny_run, tmp_path):
  # without --npz the images stay in memory (only the grid's); with it they are read back
  grids = []
  for extra in ([], ["--npz", str(tmp_path / "s.npz")]):
    png = str(tmp_path / f"grid{len(extra)}.png")
    result = run_cli("sample.py", "--workdir", tiny_run, "--classes", "2,5,8", "--num_per_class",
                     "3", "--steps", "2", "--batch_size", "2", "--seed", "4", "--out", png, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    grids.append(np.asarray(Image.open(png)))
  assert grids[0].shape == (3 * 34 + 2, 3 * 34 + 2) and grids[0].std() > 0
  np.testing.assert_array_equal(grids[0], grids[1])


def test_ddim_from_an_older_step_with_raw_weights(tiny_run):
  config, model, step = load_run(tiny_run, 2, ema=False)
  assert step == 2 and model.num_classes == 10 and config.model.depth == 2
  from dig_jax.sample import generate
  images = generate(model, np.array([0, 3, 3]), num_timesteps=1000, sampler="ddim", steps=2,
                    cfg_scale=1.0, batch_size=2)
  assert images.shape == (3, 32, 32, 1) and np.isfinite(images).all()


def test_count_stops_after_the_batches_of_the_first_labels_with_the_same_images(tiny_run):
  # what sample.py samples without --npz: only the grid's labels, batched as for all of them
  from dig_jax.sample import generate_batches
  _, model, _ = load_run(tiny_run, None, ema=True)
  kwargs = dict(num_timesteps=1000, sampler="ddim", steps=2, batch_size=2, seed=3)
  labels = np.array([1, 1, 4, 4, 7, 7, 9])
  every = list(generate_batches(model, labels, **kwargs))
  some = list(generate_batches(model, labels, count=3, **kwargs))
  assert [i for i, _ in every] == [0, 1, 2, 3] and [i for i, _ in some] == [0, 1]
  for (_, a), (_, b) in zip(some, every):
    np.testing.assert_array_equal(a, b)


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


def test_sampling_over_8_devices_matches_one(tiny_run, tmp_path):
  """Batches split over 8 devices (one image each) give the images of one device doing the same
  batches of 8: the noise of a batch does not depend on how it is laid out."""
  from sharded_sample_check import LABELS
  from conftest import run_on_8_devices
  from dig_jax.sample import generate
  out = str(tmp_path / "eight.npy")
  assert run_on_8_devices("sharded_sample_check.py", tiny_run, out) == {"devices": 8,
                                                                         "per_batch": 8}
  _, model, _ = load_run(tiny_run)
  one = generate(model, LABELS, num_timesteps=1000, sampler="ddpm", steps=3, cfg_scale=2.0,
                 seed=5, batch_size=8)
  eight = np.load(out)
  assert eight.shape == one.shape == (12, 32, 32, 1) and one.std() > 0.1
  np.testing.assert_allclose(eight, one, atol=2e-4)


def _assert_npz_is_one_process_run(npz, workdir, labels, *, seed, batch_size):
  """The npz holds `labels` and the images generate() makes in this process (DDPM, 2 steps,
  guidance 2), up to one uint8 level where rounding lands on the other side."""
  from dig_jax.sample import generate, to_uint8
  _, model, _ = load_run(workdir)
  expected = to_uint8(generate(model, labels, num_timesteps=1000, sampler="ddpm", steps=2,
                               cfg_scale=2.0, seed=seed, batch_size=batch_size))
  with np.load(npz) as f:
    np.testing.assert_array_equal(f["arr_1"], labels)
    diff = np.abs(f["arr_0"].astype(int) - expected)
  assert diff.max() <= 1 and (diff == 0).mean() > 0.999


def test_interrupted_sampling_resumes_to_the_same_images(tiny_run, tmp_path):
  """SIGTERM mid-run keeps the finished batches in <npz>.partial.npz; the same command then
  finishes the run with the images an uninterrupted one makes."""
  import signal
  import subprocess
  import sys
  import time
  from conftest import REPO
  npz = str(tmp_path / "s.npz")
  args = [sys.executable, "sample.py", "--workdir", tiny_run, "--classes", "all",
          "--num_per_class", "40", "--batch_size", "1", "--steps", "2", "--sampler", "ddpm",
          "--cfg_scale", "2.0", "--seed", "3", "--npz", npz, "--out", str(tmp_path / "g.png"),
          "--save_every_s", "0"]
  proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.monotonic() + 300
  while not os.path.exists(npz + ".partial") and proc.poll() is None:
    assert time.monotonic() < deadline
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode != 0 and "run the same command again to continue" in err, err[-2000:]
  done = sum(len(np.load(p)) for p in glob.glob(os.path.join(npz + ".partial", "shard_*.npy")))
  assert 0 < done < 400 and not os.path.exists(npz)
  # another run's settings are refused, and its partial file left as it was
  other = subprocess.run([*args[:-4], "--seed", "4", *args[-4:]], cwd=REPO, capture_output=True,
                         text=True)
  assert other.returncode != 0 and "partial run with other settings" in other.stderr
  resumed = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"Resuming from {npz}.partial: {done} of 400 images done" in resumed.stdout
  assert not os.path.exists(npz + ".partial")
  _assert_npz_is_one_process_run(npz, tiny_run, np.repeat(np.arange(10), 40), seed=3,
                                 batch_size=1)


def test_grid_subset_keeps_the_first_images_of_the_first_classes():
  from dig_jax.sample import GRID_MAX_COLUMNS, GRID_MAX_ROWS, grid_subset
  classes, per_class = GRID_MAX_ROWS + 3, GRID_MAX_COLUMNS + 2
  index = np.arange(classes * per_class)  # image i is class i // per_class, column i % per_class
  images = index.reshape(-1, 1, 1, 1)
  grid, rows = grid_subset(images, classes, per_class)
  assert rows == GRID_MAX_ROWS
  expected = [c * per_class + j for c in range(GRID_MAX_ROWS) for j in range(GRID_MAX_COLUMNS)]
  np.testing.assert_array_equal(grid.reshape(-1), expected)
  small, rows = grid_subset(images[:6], 3, 2)
  assert rows == 3 and (small.reshape(-1) == np.arange(6)).all()


def test_partial_samples_resume_points(tmp_path, rng):
  """Whole batches resume after the last one; a complete set (short last batch) resumes at the
  end; a torn count or other settings are refused; the final npz holds every shard in order."""
  from dig_jax.partial_samples import PartialSamples
  labels = np.arange(12) % 10
  npz = str(tmp_path / "s.npz")
  make = lambda seed=0: PartialSamples(npz, labels, 8, dict(seed=seed), save_every_s=1e9)
  first = make()
  assert first.resume() == 0
  batches = [rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8) for n in (8, 4)]
  first.add(batches[0])  # not saved yet: save_every_s has not passed
  assert not os.path.exists(npz + ".partial")
  first.save()
  again = make()
  assert again.resume() == 1 and again.count == 8
  again.add(batches[1])
  again.save()
  assert make().resume() == 2  # all 12 made: nothing left to sample
  with pytest.raises(ValueError, match="other settings"):
    make(seed=1).resume()
  last = make()
  last.resume()
  last.finish()
  assert not os.path.exists(npz + ".partial")
  with np.load(npz) as f:
    np.testing.assert_array_equal(f["arr_0"], np.concatenate(batches))
    np.testing.assert_array_equal(f["arr_1"], labels)
  torn = make()
  torn.add(batches[1])  # 4 images: not a whole batch of 8, nor all 12
  torn.save()
  with pytest.raises(ValueError, match="not a whole number of batches of 8"):
    make().resume()


def test_two_processes_sample_like_one(tiny_run, tmp_path):
  """sample.py --distributed as two JAX processes (one CPU device each): every batch split over
  both, process 0 writes the npz and grid, and the images are one process's for the same
  batches (4 images: 2 per device there, 4 on one device here)."""
  import socket
  import subprocess
  import sys
  from conftest import REPO
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  npz = str(tmp_path / "s.npz")
  args = [sys.executable, "sample.py", "--workdir", tiny_run, "--classes", "1,7",
          "--num_per_class", "3", "--steps", "2", "--sampler", "ddpm", "--cfg_scale", "2.0",
          "--seed", "2", "--batch_size", "2", "--npz", npz, "--out", str(tmp_path / "g.png"),
          "--distributed", f"--coordinator_address=localhost:{port}", "--num_processes=2"]
  procs = [subprocess.Popen([*args, f"--process_id={i}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "Wrote 6 images" in outs[0][0] and "Wrote" not in outs[1][0]
  _assert_npz_is_one_process_run(npz, tiny_run, np.repeat([1, 7], 3), seed=2, batch_size=4)

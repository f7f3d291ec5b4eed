"""The latent cache: contents against direct VAE encodes, resume after interruption, host sharding,
latent draws in the pipeline, and train.py + sample.py on a tiny cache (configs/imagenet.py)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from ml_collections import config_dict

import configs.imagenet
from conftest import REPO, run_cli
from dig_jax.data import LatentSource, create_source, train_dataset
from dig_jax.data.latents import METADATA, encode_record, read_metadata, shard_name, write_shard
from dig_jax.data.transforms import center_crop_arr, decode_rgb, to_float
from dig_jax.sample import decode_latents
from dig_jax.tools import cache_latents as tool
from tiny_imagenet import write_image_folder, write_tiny_vae

PX = 64          # runlocal's pixel size: 8x8x4 latents with the 8x downsampling VAE
SHARD = 4        # 12 files -> 3 shards (one with two unusable files)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("latents")
  files = write_image_folder(root / "images")
  vae = write_tiny_vae(root / "vae")
  return {"root": root, "files": sorted(files), "vae": vae}


def _config(tiny, out=None):
  config = configs.imagenet.get_config("model=DiG-S/2,runlocal,images=imagefolder")
  config.data.images.path = str(tiny["root"] / "images")
  config.vae.path = str(tiny["root"] / "vae")
  config.data.num_classes = 3
  if out is not None:
    config.data.path = str(out)
  return config


@pytest.fixture(scope="module")
def cache(tiny):
  out = tiny["root"] / "cache"
  stats = tool.cache_latents(_config(tiny), str(out), batch_size=3, shard_size=SHARD)
  assert stats == {"shards_written": 3, "images_written": 9, "images_skipped": 3}
  return out


def test_cache_holds_both_mirrors_posteriors(tiny, cache):
  meta = read_metadata(str(cache))
  assert meta["latent_shape"] == [8, 8, 4] and meta["num_shards"] == 3 and meta["num_examples"] == 12
  source = LatentSource(str(cache), scale=0.18215)
  usable = [(label, data) for _, label, data, ok in tiny["files"] if ok]
  assert len(source) == len(usable) == 9 and source.num_classes == 3
  crops = np.stack([center_crop_arr(decode_rgb(data), PX) for _, data in usable])
  x = to_float(crops)
  for m, images in enumerate([x, x[:, :, ::-1]]):  # independent encodes, unflipped and mirrored
    mean, logvar = tiny["vae"].encode(images)
    got = np.stack([source[i]["moments"][m] for i in range(9)]).astype(np.float32)
    np.testing.assert_allclose(got[:, 0], mean, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(got[:, 1], np.exp(0.5 * np.asarray(logvar)), rtol=2e-3, atol=1e-4)
  assert [int(source[i]["label"]) for i in range(9)] == [label for label, _ in usable]
  assert source[0]["moments"].dtype == np.float16
  assert not np.allclose(source[0]["moments"][0], source[0]["moments"][1], atol=1e-2)


def _shard_bytes(directory):
  return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory))
          if n.endswith(".array_record")}


def test_interrupted_cache_resumes_to_the_same_files(tiny, cache, tmp_path, monkeypatch):
  out = tmp_path / "cache"
  real_write, calls = tool.write_shard, []

  def interrupted_write(path, records):
    calls.append(path)
    if len(calls) == 2:  # Ctrl-C in the middle of the second shard
      next(iter(records))
      open(path + ".incomplete", "wb").write(b"partial")
      raise KeyboardInterrupt
    return real_write(path, records)

  monkeypatch.setattr(tool, "write_shard", interrupted_write)
  with pytest.raises(KeyboardInterrupt):
    tool.cache_latents(_config(tiny), str(out), batch_size=3, shard_size=SHARD)
  monkeypatch.setattr(tool, "write_shard", real_write)
  assert list(_shard_bytes(out)) == [shard_name(0, 3)]
  with pytest.raises(FileNotFoundError, match=r"is incomplete: 2 of 3 shards missing \(first: "
                                              r"latents-00001-of-00003.array_record\); run "
                                              r"cache_latents again"):
    LatentSource(str(out), scale=1.0)
  first_shard_mtime = os.stat(out / shard_name(0, 3)).st_mtime_ns
  stats = tool.cache_latents(_config(tiny), str(out), batch_size=3, shard_size=SHARD)
  assert stats == {"shards_written": 2, "images_written": 6, "images_skipped": 2}
  assert os.stat(out / shard_name(0, 3)).st_mtime_ns == first_shard_mtime  # not redone
  assert _shard_bytes(out) == _shard_bytes(cache)  # identical to the uninterrupted run
  assert tool.cache_latents(_config(tiny), str(out), batch_size=3, shard_size=SHARD)[
      "shards_written"] == 0


def test_processes_split_the_shards(tiny, cache, tmp_path, monkeypatch):
  out = tmp_path / "cache"
  for index in (1, 0):  # two hosts, run one after the other
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    stats = tool.cache_latents(_config(tiny), str(out), batch_size=2, shard_size=SHARD)
    assert stats["shards_written"] == (2 if index == 0 else 1)
    if index == 1:
      assert list(_shard_bytes(out)) == [shard_name(1, 3)]
      assert not os.path.exists(out / METADATA)  # only process 0 writes it
  assert _shard_bytes(out) == _shard_bytes(cache)


def test_other_settings_in_the_same_directory_are_refused(tiny, cache):
  with pytest.raises(ValueError, match="other settings.*shard_size: cache 4, now 5"):
    tool.cache_latents(_config(tiny), str(cache), batch_size=3, shard_size=5)
  config = _config(tiny)
  config.data.image_size = 16
  with pytest.raises(ValueError, match=r"turns 64 px images into \[8, 8, 4\] latents, but "
                                       r"config.data.image_size=16"):
    tool.cache_latents(config, str(cache), batch_size=3, shard_size=SHARD)


def _synthetic_cache(directory, rng, n=6, shape=(4, 4, 4)):
  """A cache with known moments: distinct means per mirror and a small std."""
  mean = rng.normal(0, 3, (n, 2, *shape))
  std = rng.uniform(0.05, 0.2, (n, 2, *shape))
  moments = np.stack([mean, std], axis=2).astype(np.float32)  # [n, mirror, moment, ...]
  os.makedirs(directory)
  write_shard(str(directory / shard_name(0, 1)),
              (encode_record(i % 3, moments[i]) for i in range(n)))
  (directory / METADATA).write_text(json.dumps({
      "format": "dig-jax latent cache v1", "num_classes": 3, "num_shards": 1, "pixel_size": 32,
      "latent_shape": list(shape), "dtype": "float32"}))
  return moments


def test_pipeline_draws_scaled_latents_from_either_mirror(tmp_path, rng):
  moments = _synthetic_cache(tmp_path / "c", rng)
  data = config_dict.ConfigDict({"name": "latents", "path": str(tmp_path / "c"),
                                 "latent_scale": 0.5})
  source = create_source(data)
  ds = train_dataset(source, global_batch_size=3, image_size=4, seed=0, process_index=0,
                     process_count=1)
  mirrors, residuals = [], []
  for batch in [b for b, _ in zip(iter(ds), range(40))]:
    assert batch["image"].shape == (3, 4, 4, 4) and batch["image"].dtype == np.float32
    for z, label in zip(batch["image"] / 0.5, batch["label"]):
      # Which example and mirror: the one whose mean is within a few std of the draw.
      fits = [(i, m) for i in range(6) for m in range(2)
              if np.all(np.abs(z - moments[i, m, 0]) < 6 * moments[i, m, 1])]
      assert len(fits) == 1
      i, m = fits[0]
      assert label == i % 3
      mirrors.append(m)
      residuals.append((z - moments[i, m, 0]) / moments[i, m, 1])
  assert 0.35 < np.mean(mirrors) < 0.65  # 120 draws, each mirror about half of the time
  residuals = np.concatenate([r.ravel() for r in residuals])
  assert abs(residuals.mean()) < 0.05 and abs(residuals.std() - 1) < 0.05  # fresh N(0, 1) noise
  with pytest.raises(ValueError, match=r"holds 4x4x4 latents of 32 px images, but the config's "
                                       r"image size is \(8, 8\)"):
    source.transforms((8, 8))


def test_missing_cache_says_how_to_make_one(tmp_path):
  with pytest.raises(FileNotFoundError, match="no latent cache at .* python -m "
                                              "dig_jax.tools.cache_latents"):
    LatentSource(str(tmp_path), scale=1.0)
  with pytest.raises(ValueError, match="config.data.path is not set; data source 'latents'"):
    create_source(config_dict.ConfigDict({"name": "latents", "latent_scale": 0.18215}))


def test_decode_latents_divides_by_the_scale(tiny, rng):
  z = rng.normal(size=(3, 8, 8, 4)).astype(np.float32)
  got = decode_latents(tiny["vae"], z, 0.25, batch_size=2)
  np.testing.assert_allclose(got, tiny["vae"].decode(z / 0.25), rtol=1e-5, atol=1e-5)


def test_cli_cache_then_train_then_sample(tiny, cache, tmp_path):
  """The user's path end to end: cache_latents (2 devices), train.py, sample.py --npz."""
  out, workdir, npz = tmp_path / "cache", tmp_path / "run", tmp_path / "s.npz"
  common = ["--config.data.images.path", str(tiny["root"] / "images"),
            "--config.vae.path", str(tiny["root"] / "vae")]
  config = "configs/imagenet.py:model=DiG-S/2,runlocal,images=imagefolder"
  result = subprocess.run(
      [sys.executable, "-m", "dig_jax.tools.cache_latents", "--config", config, "--out", str(out),
       "--batch_size", "2", "--shard_size", str(SHARD), *common], cwd=REPO, capture_output=True,
      text=True, timeout=600,
      env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "wrote 3 shards (9 images, 3 unusable skipped)" in result.stdout
  two_devices, one_device = LatentSource(str(out), 1.0), LatentSource(str(cache), 1.0)
  assert len(two_devices) == len(one_device) == 9
  for i in range(9):  # another batch layout, the same latents
    np.testing.assert_allclose(two_devices[i]["moments"].astype(np.float32),
                               one_device[i]["moments"].astype(np.float32), rtol=2e-3, atol=2e-3)

  result = run_cli("train.py", "--config", config, "--workdir", str(workdir),
                   "--config.data.path", str(out), "--config.data.num_classes", "3", *common)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Training stopped at step 4" in result.stdout
  result = run_cli("sample.py", "--workdir", str(workdir), "--classes", "0,2",
                   "--num_per_class", "2", "--steps", "2", "--out", str(tmp_path / "g.png"),
                   "--npz", str(npz))
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(npz) as f:
    assert f["arr_0"].shape == (4, PX, PX, 3) and f["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(f["arr_1"], [0, 0, 2, 2])
    assert f["arr_0"].std() > 0

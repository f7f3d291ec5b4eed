"""Encode an image dataset with the VAE once, so latent-space training reads latents, not JPEGs.

  python -m dig_jax.tools.cache_latents --config configs/imagenet.py:res=256 --out /data/latents256 \\
      --config.data.images.path=/data/imagenet/train --config.vae.path=/models/sd-vae-ft-ema/vae

Reads `config.data.images` (the image source: imagefolder or tfds), crops to
`config.data.pixel_size` (ADM center crop), encodes every image and its mirror with the VAE at
`config.vae.path`, and writes the posterior mean and std of both (see dig_jax/data/latents.py)
to --out. Then train with --config.data.path=<out>.

Work is split into shards of --shard_size images: each process (host) takes every
process_count-th shard, each batch is split over the process's local devices, and every shard is
written atomically. Rerunning the same command after an interruption skips finished shards.
"""
from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, logging as absl_logging
import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from dig_jax.data import create_source, ordered_batches
from dig_jax.data.latents import (FORMAT, METADATA, encode_record, missing_shards, shard_name,
                                  write_shard)
from dig_jax.data.transforms import DecodeCenterCrop, to_float
from dig_jax.train import sharding
from dig_jax.vae import load_vae

STORAGE_DTYPES = ("float16", "float32")


def cache_metadata(config, source, vae_config, *, shard_size: int, dtype: str) -> dict:
  """What the cache holds; a rerun into the same directory must describe the same thing."""
  size, f = config.data.pixel_size, vae_config.downsample_factor
  if size % f:
    raise ValueError(f"config.data.pixel_size={size} is not a multiple of the VAE's "
                     f"downsampling factor {f}")
  latent_shape = [size // f, size // f, vae_config.latent_channels]
  if [config.data.image_size, config.data.channels] != latent_shape[1:]:
    raise ValueError(f"the VAE turns {size} px images into {latent_shape} latents, but "
                     f"config.data.image_size={config.data.image_size} and "
                     f"config.data.channels={config.data.channels}")
  return {
      "format": FORMAT,
      "source": config.data.images.to_dict(),
      "num_examples": len(source),
      "num_classes": source.num_classes,
      "pixel_size": size,
      "latent_shape": latent_shape,
      "dtype": dtype,
      "shard_size": shard_size,
      "num_shards": -(-len(source) // shard_size),
      "vae": vae_config.to_diffusers_dict(),
      "moments": "[unflipped, flipped] x [posterior mean, posterior std], unscaled",
  }


def _check_or_write_metadata(out: str, meta: dict, is_main: bool):
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, METADATA)
  if os.path.isfile(path):
    with open(path) as f:
      before = json.load(f)
    diffs = [f"{k}: cache {before.get(k)!r}, now {v!r}" for k, v in meta.items()
             if before.get(k) != v]
    if diffs:
      raise ValueError(f"{out!r} holds a latent cache made with other settings; use another "
                       f"--out or the same settings. Differences: " + "; ".join(diffs))
  elif is_main:
    with open(path + ".tmp", "w") as f:
      json.dump(meta, f, indent=2)
    os.replace(path + ".tmp", path)


class DecodeOrMark(grain.transforms.Map):
  """DecodeCenterCrop, except that an unusable file becomes a black row marked usable=False:
  a stream without gaps stays in index order even when grain worker processes interleave."""

  def __init__(self, size: int):
    self.decode = DecodeCenterCrop(size)

  def map(self, element: dict) -> dict:
    out = self.decode.map(element)
    if out is None:
      size = self.decode.size
      return {"image": np.zeros((size, size, 3), np.uint8), "label": np.int32(-1),
              "index": element["index"], "usable": False}
    return {**out, "usable": True}


def make_encoder(vae, mesh: Mesh):
  """uint8 [n, H, W, 3] (n a multiple of the device count) -> moments [n, 2, 2, h, w, c] float32
  of each image and its horizontal mirror, the batch split over the mesh's devices."""
  graphdef, params = nnx.split(vae)
  params = jax.device_put(params, NamedSharding(mesh, P()))
  data = NamedSharding(mesh, P("data"))

  @jax.jit
  def encode(params, images):
    x = to_float(images)  # the VAE's layers cast to their own dtype
    both = jnp.stack([x, x[:, :, ::-1]], axis=1).reshape(-1, *x.shape[1:])  # image, mirror, ...
    mean, logvar = nnx.merge(graphdef, params).encode(both)
    moments = jnp.stack([mean, jnp.exp(0.5 * logvar)], axis=1).astype(jnp.float32)
    return moments.reshape(x.shape[0], 2, *moments.shape[1:])

  return lambda images: encode(params, jax.device_put(images, data))


def cache_latents(config, out: str, *, batch_size: int = 32, shard_size: int = 2048,
                  dtype: str = "float16", num_workers: int = 0, num_threads: int = 16) -> dict:
  """Writes (or finishes) the latent cache of `config` in `out`; returns counts for this process.

  `batch_size` images per device per step (each encoded twice: it and its mirror).
  """
  if dtype not in STORAGE_DTYPES:
    raise ValueError(f"dtype={dtype!r}; expected one of {STORAGE_DTYPES}")
  sharding.initialize_distributed(config)  # multi-host: before any other JAX call
  if batch_size < 1 or shard_size < 1:
    raise ValueError(f"batch_size={batch_size} and shard_size={shard_size} must be >= 1")
  source = create_source(config.data.images)
  vae, vae_config = load_vae(config.vae.path, dtype=jnp.dtype(config.vae.dtype))
  meta = cache_metadata(config, source, vae_config, shard_size=shard_size, dtype=dtype)
  _check_or_write_metadata(out, meta, jax.process_index() == 0)

  n, num_shards = meta["num_examples"], meta["num_shards"]
  missing = set(missing_shards(out, meta))
  shards = [i for i in range(jax.process_index(), num_shards, jax.process_count())
            if shard_name(i, num_shards) in missing]
  stats = {"shards_written": 0, "images_written": 0, "images_skipped": 0}
  if not shards:
    return stats
  mesh = Mesh(np.array(jax.local_devices()), ("data",))  # local: hosts never wait for each other
  encode = make_encoder(vae, mesh)
  step_batch = batch_size * mesh.size
  indices = np.concatenate([np.arange(i * shard_size, min((i + 1) * shard_size, n))
                            for i in shards])
  batches = ordered_batches(source, indices, [DecodeOrMark(meta["pixel_size"])], step_batch,
                            num_threads=num_threads, num_workers=num_workers)
  bar = tqdm(total=len(indices), unit="img", desc=f"encoding {len(shards)} shards",
             disable=jax.process_index() != 0, dynamic_ncols=True)

  def encoded():
    """(index, record) of every usable image, in order."""
    for batch in batches:
      images = batch["image"]
      pad = np.zeros((step_batch - len(images), *images.shape[1:]), images.dtype)
      moments = np.asarray(encode(np.concatenate([images, pad])))[:len(images)].astype(dtype)
      bar.update(len(images))  # unusable files included: DecodeOrMark keeps them as rows
      for index, label, usable, m in zip(batch["index"], batch["label"], batch["usable"],
                                         moments):
        if usable:
          yield int(index), encode_record(label, m)

  rows = encoded()
  head = next(rows, None)

  def records_of(shard: int):
    nonlocal head
    while head is not None and head[0] // shard_size == shard:
      yield head[1]
      head = next(rows, None)

  for shard in shards:
    written = write_shard(os.path.join(out, shard_name(shard, num_shards)), records_of(shard))
    skipped = min(shard_size, n - shard * shard_size) - written
    stats["shards_written"] += 1
    stats["images_written"] += written
    stats["images_skipped"] += skipped
    bar.set_postfix(skipped=stats["images_skipped"])
  bar.close()
  if stats["images_skipped"]:
    logging.warning("%d unusable images skipped (see the warnings above for which)",
                    stats["images_skipped"])
  return stats


def main(argv):
  from absl import flags
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if not f["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    stats = cache_latents(f.config, f.out, batch_size=f.batch_size, shard_size=f.shard_size,
                          dtype=f.dtype, num_workers=f.num_workers, num_threads=f.num_threads)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(f"Process {jax.process_index()}: wrote {stats['shards_written']} shards "
        f"({stats['images_written']} images, {stats['images_skipped']} unusable skipped) to "
        f"{f.out}")


def define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config (configs/imagenet.py[:arg]); uses config.data.images, "
      "config.data.pixel_size/image_size/channels and config.vae.", lock_config=True)
  flags.DEFINE_string("out", None, "Cache directory; rerun with the same one to resume.")
  flags.DEFINE_integer("batch_size", 32, "Images per device per step (each encoded with its "
                       "mirror).")
  flags.DEFINE_integer("shard_size", 2048, "Images per ArrayRecord shard (the unit of resume).")
  flags.DEFINE_enum("dtype", "float16", list(STORAGE_DTYPES), "Storage dtype of the moments.")
  flags.DEFINE_integer("num_workers", 0, "grain worker processes decoding images (0: threads).")
  flags.DEFINE_integer("num_threads", 16, "grain reader threads (in each worker process when "
                       "--num_workers > 0).")
  flags.mark_flags_as_required(["config", "out"])


if __name__ == "__main__":
  define_flags()
  app.run(main)

r"""FID of generated images against a reference set, computed in JAX with pytorch-fid's Inception.

  python -m dig_jax.evaluate.fid --inception pt_inception-2015-12-05-6726825d.pth \
      --npz samples.npz --ref reference.npz [--json fid.json]

`--npz` is what `sample.py --npz` writes (arr_0: uint8 images [N, H, W, C], C = 3, or 1 for
grey images, which are repeated to RGB). `--ref` is either images in the same layout (e.g.
ADM's reference batch `VIRTUAL_imagenet256_labeled.npz`, or real images written with numpy),
whose statistics are then computed with the same network, or statistics (`mu` [2048], `sigma`
[2048, 2048]) saved by `--save_ref_stats` from an earlier run. ADM's reference batches also hold
`mu` / `sigma` from the TensorFlow Inception graph; they are used only with `--use_ref_stats`,
because features from this network (pytorch-fid's port of that graph) are close to but not the
same as TensorFlow's, and FID is only comparable between statistics of one network.

The weights are the user's copy of pytorch-fid's file (nothing is downloaded; see
`dig_jax.evaluate.inception`). FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).
"""
from __future__ import annotations

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import app, flags, logging
from flax import nnx

from dig_jax.evaluate import inception
from dig_jax.evaluate.npz_array import NpzArray


def check_images(dtype, shape, what: str):
  """A clear error unless uint8 images [N, H, W, 3 or 1] (grey ones are repeated to RGB), N >= 2."""
  if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
    raise ValueError(f"{what}: expected uint8 images [N, H, W, 3] (or [N, H, W, 1]), got "
                     f"{dtype} {list(shape)}")
  if shape[0] < 2:
    raise ValueError(f"{what}: FID needs at least 2 images for a covariance, got {shape[0]}")


@functools.partial(jax.jit, static_argnums=0)
def _features(graphdef, state, images):
  images = jnp.broadcast_to(images, (*images.shape[:3], 3))  # grey -> RGB
  return nnx.merge(graphdef, state)(images.astype(jnp.float32) / 255.0)


def activations(model: inception.InceptionV3, images, batch_size: int = 100,
                desc: str = "inception") -> np.ndarray:
  """Pool features [N, 2048] (float64) of uint8 images [N, H, W, 3 or 1]: an array, or an
  NpzArray read batch by batch. Batches have one shape (the last one padded), so the network
  compiles once per image size."""
  check_images(images.dtype, images.shape, desc)
  graphdef, state = nnx.split(model)
  batch_size = min(batch_size, len(images))
  batches = (images.batches(batch_size) if isinstance(images, NpzArray) else
             (images[s:s + batch_size] for s in range(0, len(images), batch_size)))
  out = []
  for batch in tqdm.tqdm(batches, desc=desc, unit="batch", leave=False,
                         total=-(-len(images) // batch_size)):
    real = len(batch)
    if real < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
    out.append(np.asarray(_features(graphdef, state, batch), np.float64)[:real])
  return np.concatenate(out)


def statistics(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance (unbiased, as numpy's cov) of features [N, D]."""
  return acts.mean(axis=0), np.cov(acts, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Frechet distance between the Gaussians (mu1, sigma1) and (mu2, sigma2).

  tr((S1 S2)^(1/2)) is taken as tr((R S2 R)^(1/2)) with R = S1^(1/2): the same eigenvalues, but
  from two symmetric eigendecompositions (real, and 4x faster at 2048 dimensions than scipy's
  sqrtm of S1 S2, which pytorch-fid and ADM's evaluator use); singular covariances need no
  offset."""
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma "
                     f"{sigma1.shape} vs {sigma2.shape}")
  w, u = np.linalg.eigh(sigma1)
  root1 = (u * np.sqrt(np.clip(w, 0, None))) @ u.T
  product = root1 @ sigma2 @ root1
  tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)))
  diff = mu1 - mu2
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def npz_images(path: str, what: str) -> NpzArray:
  """The images (arr_0) of an npz, checked, to be read batch by batch."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what}={path}: no such file")
  try:
    images = NpzArray(path, "arr_0")
  except KeyError as e:
    raise ValueError(f"{what}: {e.args[0]}") from None
  check_images(images.dtype, images.shape, f"{what}={path}")
  return images


def reference_statistics(path: str, model, batch_size: int, use_stored: bool = False):
  """(mu, sigma, how they were obtained) for --ref: stored statistics or the images' own."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--ref={path}: no such file")
  with np.load(path) as f:
    keys = set(f.keys())
    stored = {"mu", "sigma"} <= keys
    if stored and (use_stored or "arr_0" not in keys):
      mu, sigma = f["mu"], f["sigma"]
      if mu.shape != (inception.FEATURES,) or sigma.shape != (inception.FEATURES,) * 2:
        raise ValueError(f"--ref={path}: mu {mu.shape} / sigma {sigma.shape}, expected "
                         f"({inception.FEATURES},) / {(inception.FEATURES,) * 2}")
      return mu, sigma, "stored mu / sigma"
    if "arr_0" not in keys:
      raise ValueError(f"--ref={path}: neither images (arr_0) nor statistics (mu, sigma); keys "
                       f"are {sorted(keys)}")
  images = npz_images(path, "--ref")
  mu, sigma = statistics(activations(model, images, batch_size, desc="reference"))
  return mu, sigma, f"{len(images)} images"


def fid_of_files(inception_path: str, npz: str, ref: str, *, batch_size: int = 100,
                 use_ref_stats: bool = False, save_ref_stats: str | None = None) -> dict:
  for flag, path in (("--inception", inception_path), ("--ref", ref)):
    if not os.path.isfile(path):  # before the slow steps
      raise FileNotFoundError(f"{flag}={path}: no such file")
  images = npz_images(npz, "--npz")
  model = inception.load_pytorch_fid(inception_path)
  mu, sigma = statistics(activations(model, images, batch_size, desc="samples"))
  ref_mu, ref_sigma, ref_from = reference_statistics(ref, model, batch_size, use_ref_stats)
  if save_ref_stats:
    np.savez(save_ref_stats, mu=ref_mu, sigma=ref_sigma)
  return {"fid": frechet_distance(mu, sigma, ref_mu, ref_sigma), "num_samples": len(images),
          "sample_size": list(images.shape[1:3]), "reference": ref, "reference_from": ref_from}


flags.DEFINE_string("inception", None, "pytorch-fid's Inception weights, "
                    "pt_inception-2015-12-05-6726825d.pth (read without torch).")
flags.DEFINE_string("npz", None, "Samples written by sample.py --npz (arr_0: uint8 images).")
flags.DEFINE_string("ref", None, "Reference: images (arr_0, uint8 [N, H, W, 3]) or statistics "
                    "(mu, sigma) saved by --save_ref_stats.")
flags.DEFINE_integer("batch_size", 100, "Images per Inception call.", lower_bound=1)
flags.DEFINE_bool("use_ref_stats", False, "Use the reference file's stored mu / sigma even "
                  "where it also holds images (e.g. ADM's TensorFlow statistics).")
flags.DEFINE_string("save_ref_stats", None, "Write the reference's mu / sigma to this .npz, "
                    "for later runs' --ref.")
flags.DEFINE_string("json", None, "Also write the result to this JSON file.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  missing = [f"--{n}" for n in ("inception", "npz", "ref") if not flags.FLAGS[n].value]
  if missing:
    sys.exit(f"error: {', '.join(missing)} required (see --help)")
  try:
    result = fid_of_files(flags.FLAGS.inception, flags.FLAGS.npz, flags.FLAGS.ref,
                          batch_size=flags.FLAGS.batch_size,
                          use_ref_stats=flags.FLAGS.use_ref_stats,
                          save_ref_stats=flags.FLAGS.save_ref_stats)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(f"FID {result['fid']:.4f} ({result['num_samples']} samples against "
        f"{result['reference_from']} of {result['reference']})")
  if flags.FLAGS.json:
    with open(flags.FLAGS.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)

"""Random Inception weights with pytorch-fid's names and shapes, the same for a seed everywhere.

Used by tests/test_fid.py and by scripts/check_inception_against_torch.py, which runs pytorch-fid
on these weights to make the golden features the tests compare with.
"""
from __future__ import annotations

import numpy as np

from dig_jax.evaluate.inception import InceptionV3, conv_paths

CLASSES = 1008  # pytorch-fid's classifier (unused for FID, but in the file)
# Golden image sets: name -> (seed, count, size); 64 px is upsampled to 299, 400 px downsampled.
IMAGE_SETS = {"small": (1, 3, 64), "large": (2, 2, 400)}


def random_inception_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """He-scaled conv weights and BatchNorm parameters far from the identity, so that a scale,
  shift or layout mix-up anywhere changes the features."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, conv in conv_paths(InceptionV3()).items():
    kh, kw, cin, cout = conv.kernel.shape
    fan_in = cin * kh * kw
    out[f"{name}.conv.weight"] = (rng.standard_normal((cout, cin, kh, kw)) *
                                  np.sqrt(2.0 / fan_in)).astype(np.float32)
    out[f"{name}.bn.weight"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
    out[f"{name}.bn.bias"] = rng.normal(0.0, 0.2, cout).astype(np.float32)
    out[f"{name}.bn.running_mean"] = rng.normal(0.0, 0.2, cout).astype(np.float32)
    out[f"{name}.bn.running_var"] = rng.uniform(0.5, 2.0, cout).astype(np.float32)
    out[f"{name}.bn.num_batches_tracked"] = np.array(int(rng.integers(1, 10**6)), np.int64)
  out["fc.weight"] = (rng.standard_normal((CLASSES, 2048)) * 0.02).astype(np.float32)
  out["fc.bias"] = rng.normal(0.0, 0.1, CLASSES).astype(np.float32)
  return out


def random_images(seed: int = 1, count: int = 3, size: int = 64) -> np.ndarray:
  """uint8 [count, size, size, 3] with smooth structure (not only noise), as samples have."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  images = []
  for _ in range(count):
    f = rng.uniform(1, 6, (3, 2))
    phase = rng.uniform(0, 2 * np.pi, 3)
    base = np.stack([np.sin(2 * np.pi * (f[c, 0] * yy + f[c, 1] * xx) + phase[c])
                     for c in range(3)], -1)
    noisy = 0.5 + 0.35 * base + 0.1 * rng.standard_normal((size, size, 3))
    images.append(np.clip(np.round(255 * noisy), 0, 255).astype(np.uint8))
  return np.stack(images)

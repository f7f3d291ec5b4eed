"""Compares dig_jax's FID Inception with pytorch-fid's on the same random weights, and writes the
golden features `tests/test_fid.py` checks against.

Not part of the test suite: it needs a separate virtualenv with torch and pytorch-fid, e.g.

  python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch torchvision pytorch-fid
  .venv/bin/python scripts/check_inception_against_torch.py --torch_python /tmp/torchenv/bin/python

The JAX side draws pytorch-fid-named random weights (`tests/fid_fixtures.py`) and test images.
The torch side (this file rerun under --torch_python) builds pytorch-fid's `InceptionV3` with
those weights (its strict `load_state_dict` checks every name and shape), saves them with
`torch.save` as pytorch-fid's weights file is saved, and stores its pool features. The JAX
side then reads that .pth with `load_pytorch_fid` and reports the features' errors.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "data", "inception_golden.npz")


def _import_torchvision() -> None:
  """A torchvision whose compiled ops do not match the installed torch (e.g. a CUDA build beside a
  CPU torch) fails on import while registering them; the Inception model needs none of them."""
  try:
    import torchvision  # noqa: F401
  except RuntimeError:
    for name in [m for m in sys.modules if m.startswith("torchvision")]:
      del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("ops not registered")


def torch_side(workdir: str) -> None:
  import torch
  _import_torchvision()
  from pytorch_fid import inception as pf

  with np.load(os.path.join(workdir, "weights.npz")) as f:
    weights = {k.replace("/", "."): torch.from_numpy(f[k]) for k in f.files}
  pf.load_state_dict_from_url = lambda *a, **k: weights  # no download: our random weights
  model = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  torch.save(weights, os.path.join(workdir, "inception.pth"))
  out = {}
  with np.load(os.path.join(workdir, "images.npz")) as f:
    for name in f.files:
      x = torch.from_numpy(f[name]).permute(0, 3, 1, 2).float() / 255.0
      with torch.no_grad():
        out[name] = model(x)[0].reshape(len(x), -1).numpy()
  np.savez(os.path.join(workdir, "torch_features.npz"), **out)
  print(f"torch {torch.__version__}: features written", flush=True)


def jax_side(torch_python: str, write_golden: bool) -> None:
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  sys.path.insert(0, ROOT)
  from fid_fixtures import IMAGE_SETS, random_images, random_inception_state_dict

  from dig_jax.evaluate import fid, inception

  with tempfile.TemporaryDirectory() as workdir:
    # npz keys cannot hold dots portably: slashes there, dots again on the torch side
    np.savez(os.path.join(workdir, "weights.npz"),
             **{k.replace(".", "/"): v for k, v in random_inception_state_dict(0).items()})
    images = {name: random_images(*args) for name, args in IMAGE_SETS.items()}
    np.savez(os.path.join(workdir, "images.npz"), **images)
    subprocess.run([torch_python, os.path.abspath(__file__), "--torch_side", workdir], check=True)
    model = inception.load_pytorch_fid(os.path.join(workdir, "inception.pth"))
    with np.load(os.path.join(workdir, "torch_features.npz")) as f:
      reference = {k: f[k] for k in f.files}
  for name, x in images.items():
    ours = fid.activations(model, x, batch_size=len(x))
    ref = reference[name].astype(np.float64)
    err = np.abs(ours - ref)
    print(f"{name} ({x.shape[1]} px): max abs error {err.max():.3g}, relative RMS "
          f"{np.sqrt(np.mean(err ** 2) / np.mean(ref ** 2)):.3g}, feature RMS "
          f"{np.sqrt(np.mean(ref ** 2)):.3g}, spread across images "
          f"{np.abs(ref - ref.mean(0)).max():.3g}")
  if write_golden:
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    np.savez_compressed(GOLDEN, **{k: v.astype(np.float32) for k, v in reference.items()})
    print(f"golden features written to {GOLDEN}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--torch_python", help="python of a virtualenv with torch and pytorch-fid")
  parser.add_argument("--write_golden", action="store_true",
                      help=f"store pytorch-fid's features as {os.path.relpath(GOLDEN, ROOT)}")
  parser.add_argument("--torch_side", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.torch_side:
    torch_side(args.torch_side)
  elif not args.torch_python:
    parser.error("--torch_python is required")
  else:
    jax_side(args.torch_python, args.write_golden)


if __name__ == "__main__":
  main()

"""Compares dig_jax's AutoencoderKL with diffusers' PyTorch original on the same random weights.

Not part of the test suite: it needs a separate virtualenv with torch and diffusers, e.g.

  python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch diffusers safetensors numpy
  .venv/bin/python scripts/check_vae_against_torch.py --torch_python /tmp/torchenv/bin/python

The torch side (this file rerun under --torch_python) builds a seeded, randomly initialised diffusers
AutoencoderKL with sd-vae-ft-ema's config, perturbs its GroupNorm affine parameters (initialised to 1 and
0, which would hide a scale/bias mix-up), writes it with `save_pretrained`, and stores its encode mean and
logvar and the decode of that mean for a batch of random images. The JAX side loads the directory with `load_vae`
and reports max abs and relative errors, then writes the model back with `save_diffusers` (old attention
names) and checks that diffusers' `from_pretrained` reads the same weights from it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

# The released sd-vae-ft-ema architecture.
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=256,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def torch_side(workdir: str, size: int, batch: int, seed: int) -> None:
  import diffusers
  import torch

  torch.manual_seed(seed)
  vae = diffusers.AutoencoderKL(**SD_VAE_CONFIG).eval()
  with torch.no_grad():
    for module in vae.modules():
      if isinstance(module, torch.nn.GroupNorm):
        module.weight.add_(0.2 * torch.randn_like(module.weight))
        module.bias.add_(0.2 * torch.randn_like(module.bias))
  vae.save_pretrained(os.path.join(workdir, "vae"), safe_serialization=True)

  image = torch.rand(batch, 3, size, size) * 2 - 1
  with torch.no_grad():
    posterior = vae.encode(image).latent_dist
    decoded = vae.decode(posterior.mean).sample
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  np.savez(os.path.join(workdir, "torch_outputs.npz"), image=nhwc(image), mean=nhwc(posterior.mean),
           logvar=nhwc(posterior.logvar), decoded=nhwc(decoded))
  print(f"torch {torch.__version__}, diffusers {diffusers.__version__}")


def jax_side(workdir: str) -> None:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from dig_jax.vae import load_vae, save_diffusers

  ref = np.load(os.path.join(workdir, "torch_outputs.npz"))
  model, config = load_vae(os.path.join(workdir, "vae"), dtype=jnp.float32)
  mean, logvar = nnx.jit(lambda m, x: m.encode(x))(model, ref["image"])
  decoded = nnx.jit(lambda m, z: m.decode(z))(model, ref["mean"])
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; config {config}")
  print(f"image {ref['image'].shape}, latent {ref['mean'].shape}")
  pairs = {"encode mean": (mean, ref["mean"]), "encode logvar": (logvar, ref["logvar"]),
           "decode(mean)": (decoded, ref["decoded"])}
  for name, (got, want) in pairs.items():
    err = np.abs(np.asarray(got, np.float64) - want)
    scale = np.abs(want).max()
    print(f"{name:14s} max|ref| {scale:.4g}  max abs err {err.max():.3e}  "
          f"relative (max abs err / max|ref|) {err.max() / scale:.3e}")
  save_diffusers(model, os.path.join(workdir, "vae_from_jax"), legacy_attention_names=True)


def torch_reload(workdir: str) -> None:
  """Checks that diffusers reads `save_diffusers` output back to the very weights it first saved."""
  from diffusers import AutoencoderKL

  load = lambda name: AutoencoderKL.from_pretrained(os.path.join(workdir, name),
                                                    low_cpu_mem_usage=False).state_dict()
  original, reloaded = load("vae"), load("vae_from_jax")
  assert reloaded.keys() == original.keys(), set(reloaded) ^ set(original)
  diff = max((reloaded[k] - original[k]).abs().max().item() for k in original)
  print(f"diffusers reloads save_diffusers output (old attention names): {len(original)} tensors, "
        f"max abs difference {diff}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--torch_python", help="python of a virtualenv with torch and diffusers")
  parser.add_argument("--size", type=int, default=256, help="image side in pixels")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--torch_side", metavar="WORKDIR", help=argparse.SUPPRESS)
  parser.add_argument("--torch_reload", metavar="WORKDIR", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.torch_side:
    torch_side(args.torch_side, args.size, args.batch, args.seed)
    return
  if args.torch_reload:
    torch_reload(args.torch_reload)
    return
  if not args.torch_python:
    parser.error("--torch_python is required")
  with tempfile.TemporaryDirectory() as workdir:
    subprocess.run([args.torch_python, __file__, "--torch_side", workdir, "--size", str(args.size),
                    "--batch", str(args.batch), "--seed", str(args.seed)], check=True)
    jax_side(workdir)
    subprocess.run([args.torch_python, __file__, "--torch_reload", workdir], check=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()

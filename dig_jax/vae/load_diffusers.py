"""Torch-free reading and writing of diffusers-format AutoencoderKL weights.

A diffusers VAE directory (e.g. the `vae/` folder of stabilityai/sd-vae-ft-ema) holds `config.json` and
`diffusion_pytorch_model.safetensors`. Tensors are read with `safetensors.numpy` and mapped one by one
onto the NNX model: names through `diffusers_key`, layouts through `_from_torch_layout`.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from dig_jax.vae.autoencoder_kl import AutoencoderKL, VAEConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# NNX attribute names that differ from diffusers' module names (the NNX model holds single modules
# where diffusers holds one-element ModuleLists).
_MODULE_RENAMES = {
    "downsample": "downsamplers.0",
    "upsample": "upsamplers.0",
    "attention": "attentions.0",
    "to_out": "to_out.0",
}
# Mid-block attention names in files from older diffusers versions (its deprecated AttentionBlock).
_LEGACY_ATTENTION_RENAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out": "proj_attn"}
# NNX parameter names -> PyTorch parameter names (GroupNorm's scale and conv/linear kernels are `weight`).
_LEAF_RENAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def diffusers_key(path: tuple, *, legacy_attention_names: bool = False) -> str:
  """NNX parameter path, e.g. ('encoder', 'down_blocks', 0, 'resnets', 1, 'conv1', 'kernel'),
  -> diffusers tensor name, e.g. 'encoder.down_blocks.0.resnets.1.conv1.weight'."""
  renames = _MODULE_RENAMES
  if legacy_attention_names:
    renames = {**renames, **_LEGACY_ATTENTION_RENAMES}
  *modules, leaf = path
  return ".".join([renames.get(str(m), str(m)) for m in modules] + [_LEAF_RENAMES[leaf]])


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """PyTorch shape of an NNX parameter: conv HWIO -> OIHW, linear (in, out) -> (out, in)."""
  if len(shape) == 4:
    h, w, i, o = shape
    return (o, i, h, w)
  return tuple(reversed(shape))


def _to_torch_layout(x: np.ndarray) -> np.ndarray:
  return x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T


def _from_torch_layout(x: np.ndarray) -> np.ndarray:
  return x.transpose(2, 3, 1, 0) if x.ndim == 4 else x.T


def _listing(title: str, items: list[str], limit: int = 20) -> str:
  more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
  return f"  {title} ({len(items)}):\n" + "\n".join(f"    {i}" for i in items[:limit]) + more


def from_diffusers_state_dict(config: VAEConfig, tensors: Mapping[str, np.ndarray], *,
                              dtype=jnp.float32) -> AutoencoderKL:
  """Builds an AutoencoderKL from diffusers-named, PyTorch-layout arrays; every tensor must match.

  Accepts both mid-block attention namings (`to_q/to_k/to_v/to_out.0` and the older
  `query/key/value/proj_attn`), and attention weights stored as [out, in, 1, 1] 1x1 convs.
  """
  abstract = nnx.eval_shape(
      lambda: AutoencoderKL(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
  graphdef, state = nnx.split(abstract)
  used, missing, misshaped, loaded = set(), [], [], []
  for path, v in nnx.to_flat_state(state):
    key = diffusers_key(path)
    if key not in tensors:
      key = diffusers_key(path, legacy_attention_names=True)
    if key not in tensors:
      missing.append(diffusers_key(path))
      continue
    used.add(key)
    x, want = tensors[key], _torch_shape(v.shape)
    if len(want) == 2 and x.shape == (*want, 1, 1):
      x = x[:, :, 0, 0]
    if x.shape != want:
      misshaped.append(f"{key}: expected {want}, file has {x.shape}")
      continue
    loaded.append((path, v.replace(jnp.asarray(_from_torch_layout(x), dtype))))
  unexpected = sorted(set(tensors) - used)
  if missing or unexpected or misshaped:
    problems = [_listing(title, items) for title, items in
                (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)) if items]
    raise ValueError(f"VAE weights do not match an AutoencoderKL with {config}:\n" + "\n".join(problems))
  return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def to_diffusers_state_dict(model: AutoencoderKL, *,
                            legacy_attention_names: bool = False) -> dict[str, np.ndarray]:
  """The model's parameters as float32 numpy arrays with diffusers' names and PyTorch layouts."""
  return {diffusers_key(path, legacy_attention_names=legacy_attention_names):
              np.ascontiguousarray(_to_torch_layout(np.asarray(v[...], np.float32)))
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def save_diffusers(model: AutoencoderKL, directory: str | os.PathLike, *,
                   legacy_attention_names: bool = False) -> None:
  """Writes `config.json` and `diffusion_pytorch_model.safetensors` as diffusers' `save_pretrained` does."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_NAME), "w") as f:
    json.dump(model.config.to_diffusers_dict(), f, indent=2)
  safetensors.numpy.save_file(
      to_diffusers_state_dict(model, legacy_attention_names=legacy_attention_names),
      os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})


def load_vae(path: str | os.PathLike, dtype=jnp.float32) -> tuple[AutoencoderKL, VAEConfig]:
  """Loads a diffusers VAE directory; `dtype` is used for both parameters and computation."""
  config_file, weights_file = (os.path.join(path, n) for n in (CONFIG_NAME, WEIGHTS_NAME))
  absent = [f for f in (config_file, weights_file) if not os.path.isfile(f)]
  if absent:
    raise FileNotFoundError(
        f"No diffusers VAE at {os.fspath(path)!r}: missing {', '.join(absent)}. Expected a directory "
        f"with {CONFIG_NAME} and {WEIGHTS_NAME}, i.e. the `vae/` folder of stabilityai/sd-vae-ft-ema "
        f"(a `.bin` checkpoint must be converted to safetensors first).")
  config = VAEConfig.from_json(config_file)
  model = from_diffusers_state_dict(config, safetensors.numpy.load_file(weights_file), dtype=dtype)
  return model, config

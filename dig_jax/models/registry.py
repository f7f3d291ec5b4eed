"""`create_model("DiG-S/2", ...)`: the named sizes of DiG and DiT."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dig_jax.models.dig import DiG
from dig_jax.models.dit import DiT

# size -> (depth, hidden, DiT heads); DiG heads follow from d_k = 32 (hidden / 64).
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCHES = (2, 4, 8)
MODEL_NAMES = tuple(f"{family}-{size}/{patch}" for family in ("DiG", "DiT")
                    for size in SIZES for patch in PATCHES)

_DIG_OVERRIDES = {"depth", "hidden_size", "num_heads", "mlp_hidden", "dtype", "gla_backend",
                  "conv_backend", "elementwise_backend", "pallas_interpret", "remat"}
_DIT_OVERRIDES = {"depth", "hidden_size", "num_heads", "mlp_ratio", "dtype", "attention_impl",
                  "elementwise_backend", "pallas_interpret", "remat"}


def swiglu_hidden(hidden: int) -> int:
  """DiG's SwiGLU width: 2/3 of 4D rounded up to a multiple of 256."""
  return 256 * math.ceil(int(hidden * 4 * 2 / 3) / 256)


def parse_model_name(name: str) -> tuple[str, str, int]:
  if name not in MODEL_NAMES:
    raise ValueError(f"unknown model name {name!r}; expected one of {', '.join(MODEL_NAMES)}")
  family, rest = name.split("-")
  size, patch = rest.split("/")
  return family, size, int(patch)


def create_model(name: str, *, input_size, in_channels: int, num_classes: int,
                 learn_sigma: bool = True, rngs: nnx.Rngs, **overrides):
  """Builds a named DiG or DiT. Overrides (e.g. depth=2, dtype=jnp.bfloat16) shrink or tune it.

  DiG accepts depth, hidden_size, num_heads, mlp_hidden, dtype, gla_backend, conv_backend;
  DiT accepts depth, hidden_size, num_heads, mlp_ratio, dtype, attention_impl; both accept
  elementwise_backend (the adaLN norm kernels, and in DiG the one-pass backward of SwiGLU and
  of GLA's gated output), pallas_interpret (the Pallas kernels in interpret mode, for CPU
  tests) and remat ("none", "full" or "dots": what each block keeps for the backward pass).
  """
  family, size, patch = parse_model_name(name)
  allowed = _DIG_OVERRIDES if family == "DiG" else _DIT_OVERRIDES
  unknown = set(overrides) - allowed
  if unknown:
    raise ValueError(f"unknown override(s) {sorted(unknown)} for {name}; "
                     f"expected some of {sorted(allowed)}")
  if num_classes < 1 or in_channels < 1:
    raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
  depth, hidden, dit_heads = SIZES[size]
  hidden = overrides.pop("hidden_size", hidden)
  common = dict(input_size=input_size, patch_size=patch, in_channels=in_channels,
                hidden_size=hidden, depth=overrides.pop("depth", depth), num_classes=num_classes,
                learn_sigma=learn_sigma, rngs=rngs)
  if "dtype" in overrides:
    overrides["dtype"] = jnp.dtype(overrides["dtype"])
  if family == "DiG":
    overrides.setdefault("num_heads", max(1, hidden // 64))
    overrides.setdefault("mlp_hidden", swiglu_hidden(hidden))
    return DiG(**common, **overrides)
  overrides.setdefault("num_heads", dit_heads)
  return DiT(**common, **overrides)


def count_parameters(model) -> int:
  """Trainable parameters plus the fixed position table (the convention of the reference code)."""
  params = nnx.state(model, nnx.Param)
  trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  return trainable + model.grid[0] * model.grid[1] * model.hidden_size


def create_model_from_config(config, *, rngs: nnx.Rngs):
  """The model a training config describes (config.model and config.data)."""
  m, d = config.model, config.data
  overrides = {key: m[key] for key in ("depth", "hidden_size", "num_heads") if m.get(key) is not None}
  overrides["dtype"] = m.dtype
  overrides["remat"] = m.get("remat", "none")  # runs saved before the option existed
  if parse_model_name(m.name)[0] == "DiG":
    overrides["gla_backend"] = m.gla_backend
    # .get: runs saved before these options existed
    overrides["conv_backend"] = m.get("conv_backend", "auto")
  overrides["elementwise_backend"] = m.get("elementwise_backend", "auto")
  return create_model(m.name, input_size=d.image_size, in_channels=d.channels,
                      num_classes=d.num_classes, learn_sigma=m.learn_sigma, rngs=rngs, **overrides)

"""Pure-jnp adaLN normalisation, as DiT and DiG compute it: the path on CPU and TPU, and what the
GPU kernels are tested against."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def layer_norm(x, eps=1e-6):
  """LayerNorm over the last axis without affine parameters, float32 statistics, x's dtype out."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x, shift, scale):
  """adaLN modulation; shift/scale are per example [N, D], x is [N, ..., D]."""
  expand = (slice(None),) + (None,) * (x.ndim - 2)
  return x * (1 + scale[expand]) + shift[expand]


def layer_norm_modulate(x, shift, scale, eps=1e-6):
  return modulate(layer_norm(x, eps), shift, scale)

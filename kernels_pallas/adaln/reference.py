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


def _per_example(v, x):
  """v [N, D] broadcast against x [N, ..., D]."""
  return v[(slice(None),) + (None,) * (x.ndim - 2)]


def modulate(x, shift, scale):
  """adaLN modulation; shift/scale are per example [N, D], x is [N, ..., D]."""
  return x * (1 + _per_example(scale, x)) + _per_example(shift, x)


def layer_norm_modulate(x, shift, scale, eps=1e-6):
  return modulate(layer_norm(x, eps), shift, scale)


def residual_layer_norm_modulate(x, gate, branch, shift, scale, eps=1e-6):
  """(h, layer_norm_modulate(h)) with h = x + gate * branch, gate [N, D] per example."""
  h = x + _per_example(gate, x) * branch
  return h, layer_norm_modulate(h, shift, scale, eps)

"""Pure-jnp SwiGLU product and its backward: the path on CPU and TPU, and what the GPU kernel is
tested against (tests also check both against autodiff of the plain formula)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def swiglu_product(ab):
  """swish(a) * b for ab = [a, b] (halves of the last axis), float32 arithmetic, ab's dtype."""
  a, b = (y.astype(f32) for y in jnp.split(ab, 2, axis=-1))
  return (a * jax.nn.sigmoid(a) * b).astype(ab.dtype)


def swiglu_product_backward(ab, dh):
  """(d ab, h) for h = swiglu_product(ab) and dh = dL/dh: the gradient and the product itself
  (the backward's weight gradient of the projection after it needs h)."""
  # The gradient as one elementwise expression over all 2 * inner lanes, each lane reading a,
  # b and dh of its column (i % inner), so XLA writes it in one pass: written as two halves,
  # XLA copied them into one array afterwards (a GPU profile: 2 copies per layer).
  a, b = (jnp.concatenate([y, y], axis=-1).astype(f32) for y in jnp.split(ab, 2, axis=-1))
  dh2 = jnp.concatenate([dh, dh], axis=-1).astype(f32)
  sig = jax.nn.sigmoid(a)
  first = jax.lax.broadcasted_iota(jnp.int32, ab.shape, ab.ndim - 1) < ab.shape[-1] // 2
  # d/da swish(a) * b = b (sig + a sig (1 - sig)); d/db = swish(a)
  grad = jnp.where(first, dh2 * b * sig * (1.0 + a * (1.0 - sig)), dh2 * a * sig)
  return grad.astype(ab.dtype), swiglu_product(ab)

"""Pure-jnp gated output of GLA and its backward: the path on CPU and TPU, and what the GPU kernel
is tested against (tests also check both against autodiff of the plain formula)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def gate_columns(y, offset, width):
  return y[..., offset:offset + width]


def gated_norm(o, z, scale, eps):
  """RMSNorm_per_head(o) * scale, rounded to o's dtype, times swish(z).

  o [..., H, Vh] (one RMSNorm per head over Vh), z [..., H * Vh], scale [Vh]: [..., H * Vh] in
  o's dtype, float32 arithmetic."""
  o32 = o.astype(f32)
  n = o32 * jax.lax.rsqrt(jnp.mean(jnp.square(o32), axis=-1, keepdims=True) + eps) * scale
  n = n.astype(o.dtype).astype(f32).reshape(z.shape)
  z32 = z.astype(f32)
  return (n * z32 * jax.nn.sigmoid(z32)).astype(o.dtype)


def gated_norm_backward(o, z, du, scale, eps):
  """(do, dz, dscale, u): gradients of sum(u * du) for u = gated_norm(o, z, scale), and u (the
  output projection's weight gradient needs it). The rounding of the norm to o's dtype counts
  as identity, as autodiff of a cast does."""
  o32 = o.astype(f32)
  z32 = z.astype(f32).reshape(o.shape)
  du32 = du.astype(f32).reshape(o.shape)
  r = jax.lax.rsqrt(jnp.mean(jnp.square(o32), axis=-1, keepdims=True) + eps)
  n = (o32 * r * scale).astype(o.dtype).astype(f32)
  sig = jax.nn.sigmoid(z32)
  swish = z32 * sig
  dn = du32 * swish
  dz = du32 * n * sig * (1.0 + z32 * (1.0 - sig))
  dscale = jnp.sum(dn * o32 * r, axis=tuple(range(o.ndim - 1)))
  g = dn * scale
  # y = o r with r = (mean(o^2) + eps)^-1/2: do = r g - o r^3 mean(g o)
  do = r * g - o32 * r ** 3 * jnp.mean(g * o32, axis=-1, keepdims=True)
  flat = lambda x: x.reshape(z.shape)
  return (do.astype(o.dtype), flat(dz).astype(z.dtype), dscale,
          flat(n * swish).astype(o.dtype))

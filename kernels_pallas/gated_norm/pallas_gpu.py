"""GLA's gated output backward as one Pallas (Triton) pass for GPUs: reads o, the output gate z
(in place, from the projection output y) and du once; writes do, dz, the gated output u (the
output projection's weight gradient needs it) and per-block shares of dscale (summed by XLA).

Why: XLA ran the recomputed norm and gate and their backward as five fusions, with float32
row statistics and partial sums between them: about 4.8 ms of a DiG-XL/2 step at 256 px (a
profile, BENCHMARKS.md), against about 2 ms for one pass at the HBM rate.

Blocks: BLOCK_M rows by one head's Vh columns (the RMSNorm's extent, a power of two), so each
program holds whole norm rows; grid (M / rows, heads).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.tiling import largest_pow2_divisor

BLOCK_M = 64
MIN_BLOCK_M = 16
NUM_WARPS = 4
f32 = jnp.float32


def block_rows(m):
  return largest_pow2_divisor(m, BLOCK_M)


def supports(m, head_dim, gate_offset):
  pow2 = head_dim >= 16 and head_dim & (head_dim - 1) == 0
  return pow2 and gate_offset % head_dim == 0 and block_rows(m) >= MIN_BLOCK_M


def _bwd_kernel(o_ref, z_ref, du_ref, scale_ref, do_ref, dz_ref, u_ref, share_ref, *, eps):
  o = o_ref[...].astype(f32)
  z = z_ref[...].astype(f32)
  du = du_ref[...].astype(f32)
  scale = scale_ref[...]
  r = jax.lax.rsqrt(jnp.mean(o * o, axis=1, keepdims=True) + eps)
  n = (o * r * scale).astype(u_ref.dtype).astype(f32)  # rounded as the forward rounds it
  sig = 1.0 / (1.0 + jnp.exp(-z))
  swish = z * sig
  u_ref[...] = (n * swish).astype(u_ref.dtype)
  dz_ref[...] = (du * n * sig * (1.0 + z * (1.0 - sig))).astype(dz_ref.dtype)
  dn = du * swish
  share_ref[...] = jnp.sum(dn * o * r, axis=0, keepdims=True)
  g = dn * scale
  # y = o r with r = (mean(o^2) + eps)^-1/2: do = r g - o r^3 mean(g o)
  do_ref[...] = (r * g - o * (r * r * r) * jnp.mean(g * o, axis=1, keepdims=True)).astype(
      do_ref.dtype)


def gated_norm_backward(o, y, du, scale, *, gate_offset, eps, dz_in_y_layout=False,
                        interpret=False):
  """(do, dz, dscale, u) as reference.gated_norm_backward, for o [..., H, Vh], the gate
  z = y[..., gate_offset : gate_offset + H * Vh] read in place, du [..., H * Vh].

  dz_in_y_layout: dz is returned as [..., W] like y, written only in the gate's columns (the
  others are left unwritten, for a later kernel to fill: `kernels_pallas.gla.layer`)."""
  heads, vh = o.shape[-2:]
  m = o.size // (heads * vh)
  bm = block_rows(m)
  gate_block = gate_offset // vh
  head_block = pl.BlockSpec((bm, vh), lambda r, h: (r, h))
  gate_spec = pl.BlockSpec((bm, vh), lambda r, h: (r, gate_block + h))
  rows, share_shape = (m, heads * vh), (m // bm, heads * vh)
  dz_spec, dz_rows = (gate_spec, (m, y.shape[-1])) if dz_in_y_layout else (head_block, rows)
  do, dz, u, shares = pl.pallas_call(
      lambda *refs: _bwd_kernel(*refs, eps=eps), grid=(m // bm, heads),
      in_specs=[head_block, gate_spec, head_block, pl.BlockSpec((1, vh), lambda r, h: (0, 0))],
      out_specs=[head_block, dz_spec, head_block, pl.BlockSpec((1, vh), lambda r, h: (r, h))],
      out_shape=[jax.ShapeDtypeStruct(rows, o.dtype), jax.ShapeDtypeStruct(dz_rows, y.dtype),
                 jax.ShapeDtypeStruct(rows, o.dtype), jax.ShapeDtypeStruct(share_shape, f32)],
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret, name="gated_norm_bwd",
  )(o.reshape(m, heads * vh), y.reshape(m, y.shape[-1]), du.reshape(m, heads * vh),
    scale.astype(f32).reshape(1, vh))
  dscale = jnp.sum(shares.reshape(-1, vh), axis=0)
  dz = dz.reshape(y.shape if dz_in_y_layout else du.shape)
  return do.reshape(o.shape), dz, dscale, u.reshape(du.shape)

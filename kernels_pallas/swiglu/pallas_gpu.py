"""SwiGLU's backward as one Pallas (Triton) pass for GPUs: reads [a, b] and dh once, writes
the gradient of [a, b] and the product swish(a) * b.

Why: with the product recomputed for the backward (nothing [T, inner] kept from the forward),
XLA ran the recompute and the gradient as two passes, the second reading a, b and dh twice
(one output lane per column of [a, b]): 340 us of memory traffic per DiG-XL/2 layer at 256 px,
batch 64, against about 180 us for one pass at the HBM rate (BENCHMARKS.md).

Layout: [a, b] is viewed as [M, 2, inner] (a free reshape of [..., 2 * inner]), so each
program's block holds its columns of both halves and the gradient is written as the same one
array the backward's input-gradient matmul reads. Blocks: BLOCK_M rows by BLOCK_INNER columns
(the largest power of two dividing each, at most these: `supports`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.tiling import largest_pow2_divisor

# 4,096 elements per 4-warp program: 233 us at DiG-XL/2's shape on an H100 against 312 us for
# twice that (BENCHMARKS.md; 8-16 rows by 128-512 columns measured the same).
BLOCK_M = 32
BLOCK_INNER = 128
MIN_BLOCK = 16
NUM_WARPS = 4
f32 = jnp.float32


def blocks(m, inner):
  """(rows, columns) per program for M rows of `inner` columns per half."""
  return largest_pow2_divisor(m, BLOCK_M), largest_pow2_divisor(inner, BLOCK_INNER)


def supports(m, inner):
  return min(blocks(m, inner)) >= MIN_BLOCK


def _bwd_kernel(ab_ref, dh_ref, dab_ref, h_ref):
  a = ab_ref[:, 0, :].astype(f32)
  b = ab_ref[:, 1, :].astype(f32)
  dh = dh_ref[...].astype(f32)
  sig = 1.0 / (1.0 + jnp.exp(-a))
  swish = a * sig
  h_ref[...] = (swish * b).astype(h_ref.dtype)
  # d/da swish(a) * b = b (sig + a sig (1 - sig)); d/db = swish(a)
  dab_ref[:, 0, :] = (dh * b * sig * (1.0 + a * (1.0 - sig))).astype(dab_ref.dtype)
  dab_ref[:, 1, :] = (dh * swish).astype(dab_ref.dtype)


def swiglu_product_backward(ab, dh, interpret=False):
  """(d ab, h): ab [..., 2 * inner], dh [..., inner] -> the gradient [..., 2 * inner] and the
  product swish(a) * b [..., inner], both in ab's dtype (float32 arithmetic)."""
  inner = dh.shape[-1]
  m = dh.size // inner
  bm, bi = blocks(m, inner)
  pair = pl.BlockSpec((bm, 2, bi), lambda r, c: (r, 0, c))
  half = pl.BlockSpec((bm, bi), lambda r, c: (r, c))
  dab, h = pl.pallas_call(
      _bwd_kernel, grid=(m // bm, inner // bi),
      in_specs=[pair, half], out_specs=[pair, half],
      out_shape=[jax.ShapeDtypeStruct((m, 2, inner), ab.dtype),
                 jax.ShapeDtypeStruct((m, inner), ab.dtype)],
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret, name="swiglu_bwd",
  )(ab.reshape(m, 2, inner), dh.reshape(m, inner))
  return dab.reshape(ab.shape), h.reshape(dh.shape)

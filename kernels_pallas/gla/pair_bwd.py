"""GLA backward for short sequences on GPUs, in pair form: tiles of 64 tokens meet in pairs, with
no walk over chunk states.

Why: at T <= 256 (DiG at 256 px) the walk (`pallas_gpu.gla_bwd`) is one program per (batch,
head) stepping through 16 chunks of 16 rows, each step a long dependent instruction stream at
2 programs per SM, after a pass that recomputes every chunk's state (BENCHMARKS.md). In pair
form, a query tile I meets each earlier key tile J directly: scores (q_I fq)(k_J fk)^T with
fq = exp(G_i - G_a) and fk = exp(G_a - G_j) anchored at the boundary a just before tile I (both
<= 1, `chunk_math.pair_dkv` / `pair_dq`), and each tile meets itself through chunk_math's in-chunk
scheme (`diagonal_dkv` / `diagonal_dq`). Pairs are independent, on 64-row tiles, and need no
states, so the state pass goes too. Work grows as T^2 / 64^2 pairs: for longer sequences the
walk over states wins.

Two kernels:
1. `gla_bwd_pair_dkv`, one program per (batch, head, key tile J): dk_J (float32, for kernel 2)
   and dv_J from J itself, from every later query tile, and from the final state's gradient.
2. `gla_bwd_pair_dq`, one program per (batch, head), visiting query tiles last to first: dq_I
   from I itself, every earlier key tile and the initial state; then the gate gradient, the
   suffix sum of q * dq - k * dk in scan order (carried across tiles, so one program walks the
   tiles of a sequence), dk cast to the output dtype, and the initial state's gradient.
Layouts are `pallas_gpu`'s (caller's [B, T, H, D], or packed q, k, v read in place with the
gradient written into the packed buffer). `reverse` only changes which memory tile a scan tile
is and the direction of the in-tile scans. Gates are raised to `chunk_math.gate_floor(DIAG)` on
load, as in the walk.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.gla import chunk_math
from kernels_pallas.gla import pallas_gpu as walk

TILE = 64  # tokens per tile: the in-tile scheme's 64-row chunks (chunk_math, diag 16)
f32 = jnp.float32


# Input dtypes the pair form takes. Not float32: there the walk's exact-fp32 contract (1e-4)
# holds under strong gates because its in-chunk sums span 16 rows; over 64-row tiles the
# float32 rounding of the gates' partial sums (up to 64 x 10 in magnitude) reaches the decay
# factors' exponents, and the gate gradient (q dq - k dk, which cancel) was off by up to 2e-3.
# With 16-bit inputs the TF32 products dominate either way (BENCHMARKS.md).
INPUT_DTYPES = (jnp.bfloat16, jnp.float16)


def applies(t, column_scan, max_tokens, dtype):
  """Whether the pair form runs for T tokens: whole tiles, at most `max_tokens`, raster scan,
  16-bit inputs."""
  return (column_scan is None and t % TILE == 0 and TILE <= t <= max_tokens
          and dtype in INPUT_DTYPES)


class _Tiles:
  """Scan tile n of a sequence of `count` tiles: its token rows in memory, and its gates."""

  def __init__(self, count, reverse):
    self.count, self.reverse = count, reverse
    self.floor = chunk_math.gate_floor(walk.DIAG)

  def rows(self, n):
    idx = self.count - 1 - n if self.reverse else n
    return pl.ds(pl.multiple_of(idx * TILE, TILE), TILE)

  def gates(self, g_ref, rows):
    g = g_ref[rows, :]
    return g if self.floor is None else jnp.maximum(g, self.floor)

  def cumsum(self, g):
    return chunk_math.tile_cumsum(g, reverse=self.reverse, ops=walk.OPS)


def _dkv_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, dht_ref, *rest, count, scale, reverse,
                dv_first, stride):
  """rest: (the aliased packed gradient, if given,) dk (float32) and dv refs. dv goes to
  columns dv_first + head * stride (packed) of its ref."""
  dk_ref, dv_ref = rest[-2:]
  tiles, ops = _Tiles(count, reverse), walk.OPS
  jn = pl.program_id(2)  # the key tile, in scan order
  rows = tiles.rows(jn)
  k, v, g = k_ref[rows, :], v_ref[rows, :], tiles.gates(g_ref, rows)
  dof = scale * do_ref[rows, :].astype(f32)
  dk, dv = chunk_math.diagonal_dkv(q_ref[rows, :], k, v, g, dof, reverse=reverse, ops=ops,
                                   diag=walk.DIAG)
  cum, total = tiles.cumsum(g)
  fk_own = jnp.exp(total - cum)  # decay from each key to the end of its tile

  def later_tile(i, carry):  # query tile i > jn; `between`: log-decay of the tiles in between
    dk, dv, between = carry
    rows_i = tiles.rows(i)
    g_i = tiles.gates(g_ref, rows_i)
    cum_i, total_i = tiles.cumsum(g_i)
    dk_i, dv_i = chunk_math.pair_dkv(q_ref[rows_i, :], scale * do_ref[rows_i, :].astype(f32),
                                     jnp.exp(cum_i), k, v, fk_own * jnp.exp(between), ops=ops)
    return dk + dk_i, dv + dv_i, between + total_i

  dk, dv, between = jax.lax.fori_loop(jn + 1, count, later_tile,
                                      (dk, dv, jnp.zeros_like(total)))
  dk_s, dv_s = chunk_math.state_dkv(k, v, fk_own * jnp.exp(between), dht_ref[...], ops=ops)
  dk_ref[rows, :] = dk + dk_s
  cols = pl.ds(dv_first + pl.program_id(1) * stride, v.shape[-1])
  dv_ref[rows, cols] = (dv + dv_s).astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, h0_ref, dht_ref, dgc_ref, dkf_ref, *rest,
               count, scale, reverse, dq_first, dk_first, stride, packed):
  """rest: dq, dk, dg, dh0 refs; packed: the aliased packed gradient (holding dv), then that
  gradient's output ref (for dq and dk), dg and dh0."""
  if packed:
    _, grad_ref, dg_ref, dh0_ref = rest
    dq_ref = dk_ref = grad_ref
  else:
    dq_ref, dk_ref, dg_ref, dh0_ref = rest
  tiles, ops = _Tiles(count, reverse), walk.OPS
  h0 = h0_ref[...]
  kd = h0.shape[0]
  head = pl.program_id(1) * stride
  dq_cols, dk_cols = pl.ds(dq_first + head, kd), pl.ds(dk_first + head, kd)

  def query_tile(step, carry):  # scan tiles last to first
    dg_carry, dh0, total_col = carry
    n = count - 1 - step
    rows = tiles.rows(n)
    q, k, v, g = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], tiles.gates(g_ref, rows)
    dof = scale * do_ref[rows, :].astype(f32)
    dq = chunk_math.diagonal_dq(q, k, v, g, dof, reverse=reverse, ops=ops, diag=walk.DIAG)
    cum, _ = tiles.cumsum(g)
    fq = jnp.exp(cum)

    def earlier_tile(s, carry):  # key tile n - 1 - s; `between`: the tiles in between
      dq, between = carry
      rows_j = tiles.rows(n - 1 - s)
      cum_j, total_j = tiles.cumsum(tiles.gates(g_ref, rows_j))
      dq += chunk_math.pair_dq(dof, fq, k_ref[rows_j, :], v_ref[rows_j, :],
                               jnp.exp(total_j - cum_j + between), ops=ops)
      return dq, between + total_j

    dq, before = jax.lax.fori_loop(0, n, earlier_tile, (dq, jnp.zeros_like(dg_carry)))
    dq_s, dh0_n = chunk_math.state_dq(q, dof, jnp.exp(cum + before), h0, ops=ops)
    dq += dq_s
    dk = dkf_ref[rows, :]
    x = q.astype(f32) * dq - k.astype(f32) * dk  # dL/dG per token; dg: its suffix sum
    dg_ref[rows, :] = ops.cumsum(x, TILE, not reverse) + dg_carry
    dq_ref[rows, dq_cols] = dq.astype(dq_ref.dtype)
    dk_ref[rows, dk_cols] = dk.astype(dk_ref.dtype)
    return (dg_carry + jnp.sum(x, axis=0, keepdims=True), dh0 + dh0_n,
            total_col + jnp.sum(g.T, axis=1, keepdims=True))

  _, dh0, total_col = jax.lax.fori_loop(
      0, count, query_tile, (dgc_ref[...], jnp.zeros_like(h0), jnp.zeros((kd, 1), f32)))
  dh0_ref[...] = dh0 + jnp.exp(total_col) * dht_ref[...]


def backward(q, k, v, g, do, h0, dht, dgc, into, *, scale, reverse, packed, interpret):
  """Gradients as `pallas_gpu._backward` returns them ((dq, dk, dv, dg, dh0), or (dqkv, dg,
  dh0) packed, written into `into` when given), for T a whole number of tiles. h0, dht
  [B, H, K, V]: the initial state and the final state's gradient; dgc [B, H, 1, 1, K]: the gate
  gradient's carry at the end, sum_V(ht * dht)."""
  b, t, h, kd, vd = walk._dims(g, v, packed)
  common = dict(count=t // TILE, scale=scale, reverse=reverse)
  qk, vs = walk._seq_spec(t, kd), walk._seq_spec(t, vd)
  state = pl.BlockSpec((None, None, kd, vd), lambda b, h, j: (b, h, 0, 0))
  carry = pl.BlockSpec((None, None, None, 1, kd), lambda b, h, j: (b, h, 0, 0, 0))
  qkv_specs = walk._qkv_specs(t, kd, vd, packed)
  dkf_shape = jax.ShapeDtypeStruct(g.shape, f32)
  dh0_shape = jax.ShapeDtypeStruct((b, h, kd, vd), f32)
  dkv_inputs, dkv_specs, aliases = [q, k, v, g, do, dht], [*qkv_specs, qk, vs, state], {}
  if packed:  # program (b, i, j) writes head i's columns of the batch row's packed gradient
    width = h * (2 * kd + vd) if into is None else into.shape[-1]
    grad_spec = pl.BlockSpec((None, t, width), lambda b, i, j: (b, 0, 0))
    grad_shape = jax.ShapeDtypeStruct((b, t, width), v.dtype if into is None else into.dtype)
    if into is not None:
      dkv_inputs.append(into)
      dkv_specs.append(grad_spec)
      aliases = {len(dkv_inputs) - 1: 1}
    dv_spec, dv_shape, dv_cols = grad_spec, grad_shape, dict(dv_first=2 * h * kd, stride=vd)
  else:
    dv_spec, dv_shape = vs, jax.ShapeDtypeStruct(v.shape, v.dtype)
    dv_cols = dict(dv_first=0, stride=0)
  dkf, dv = walk._call(
      functools.partial(_dkv_kernel, **dv_cols, **common), (b, h, t // TILE), dkv_specs,
      [qk, dv_spec], [dkf_shape, dv_shape], "gla_bwd_pair_dkv", interpret, aliases,
  )(*dkv_inputs)
  dq_inputs = [q, k, v, g, do, h0, dht, dgc, dkf]
  dq_specs = [*qkv_specs, qk, vs, state, state, carry, qk]
  if packed:  # dq and dk into the packed gradient that holds dv (aliased)
    dqkv, dg, dh0 = walk._call(
        functools.partial(_dq_kernel, dq_first=0, dk_first=h * kd, stride=kd, packed=True,
                          **common),
        (b, h, 1), [*dq_specs, grad_spec], [grad_spec, qk, state],
        [grad_shape, jax.ShapeDtypeStruct(g.shape, f32), dh0_shape], "gla_bwd_pair_dq",
        interpret, {len(dq_inputs): 0})(*dq_inputs, dv)
    return dqkv, dg, dh0
  dq, dk, dg, dh0 = walk._call(
      functools.partial(_dq_kernel, dq_first=0, dk_first=0, stride=0, packed=False, **common),
      (b, h, 1), dq_specs, [qk, qk, qk, state],
      [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
       jax.ShapeDtypeStruct(g.shape, f32), dh0_shape], "gla_bwd_pair_dq", interpret,
  )(*dq_inputs)
  return dq, dk, dv, dg, dh0

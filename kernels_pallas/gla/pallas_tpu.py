"""GLA forward and backward kernels for TPUs, in Pallas (Mosaic TPU).

Grid (batch x heads [parallel], chunks [arbitrary]); the state (forward) or its gradient
(backward) lives in VMEM scratch across the chunk axis. Blocks are [CHUNK, D] with the full
head dimension, so any K and V from 16 to 256 are legal block shapes; the inputs are moved to
heads-first [B*H, T, D] outside the kernel because a [B, T, H, D] block with one head is not.
Mosaic has no cumsum: in-chunk cumulative and segment sums are exact fp32 matmuls with 0/1
masks on the MXU. `reverse=True` maps grid step n to chunk N-1-n in the index maps.
No TPU is reachable here: correctness comes from interpret mode and cross-lowering only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.gla import chunk_math

CHUNK = 128  # the MXU is 128 wide


def _segment_mask(c, h, reverse=None):
  i = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  j = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  shift = h.bit_length() - 1
  mask = (i >> shift) == (j >> shift)
  if reverse is not None:
    mask &= (j >= i) if reverse else (j <= i)
  return mask.astype(jnp.float32)


def _masked_sum(mask, x):
  return jax.lax.dot(mask, x, precision=jax.lax.Precision.HIGHEST,
                     preferred_element_type=jnp.float32)


def _cumsum(x, h, reverse):
  return x if h == 1 else _masked_sum(_segment_mask(x.shape[0], h, reverse), x)


def _segsum(x, h):
  return x if h == 1 else _masked_sum(_segment_mask(x.shape[0], h), x)


OPS = chunk_math.Ops(cumsum=_cumsum, segsum=_segsum,
                     sum_precision=jax.lax.Precision.HIGHEST)  # Mosaic: DEFAULT or HIGHEST


def _heads_first(x):  # [B, T, H, D] -> [B*H, T, D]
  b, t, h, d = x.shape
  return jnp.swapaxes(x, 1, 2).reshape(b * h, t, d)


def _heads_last(x, b):  # [B*H, T, D] -> [B, T, H, D]
  bh, t, d = x.shape
  return jnp.swapaxes(x.reshape(b, bh // b, t, d), 1, 2)


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, h0_ref, o_ref, ht_ref, states_ref, state_scr, *,
                scale, reverse):
  n = pl.program_id(1)

  @pl.when(n == 0)
  def _():
    state_scr[...] = h0_ref[...]

  states_ref[...] = state_scr[...]
  o, state = chunk_math.forward(q_ref[...], k_ref[...], v_ref[...], g_ref[...], state_scr[...],
                                scale=scale, reverse=reverse, ops=OPS)
  o_ref[...] = o.astype(o_ref.dtype)
  state_scr[...] = state

  @pl.when(n == pl.num_programs(1) - 1)
  def _():
    ht_ref[...] = state


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, states_ref, dht_ref, dg0_ref,
                dq_ref, dk_ref, dv_ref, dg_ref, dh0_ref, dstate_scr, dg_carry_scr, *,
                scale, reverse):
  n = pl.program_id(1)

  @pl.when(n == 0)
  def _():
    dstate_scr[...] = dht_ref[...]
    dg_carry_scr[...] = dg0_ref[...]

  dq, dk, dv, dg, dstate, dg_carry = chunk_math.backward(
      q_ref[...], k_ref[...], v_ref[...], g_ref[...], do_ref[...], states_ref[...],
      dstate_scr[...], dg_carry_scr[...], scale=scale, reverse=reverse, ops=OPS)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  dg_ref[...] = dg
  dstate_scr[...] = dstate
  dg_carry_scr[...] = dg_carry

  @pl.when(n == pl.num_programs(1) - 1)
  def _():
    dh0_ref[...] = dstate


def _chunk_map(n_chunks, backwards):
  """Index map of chunk blocks: grid step n reads chunk n, or N-1-n when walking backwards."""
  if backwards:
    return lambda i, n: (i, n_chunks - 1 - n, 0)
  return lambda i, n: (i, n, 0)


def _params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


@functools.partial(jax.jit, static_argnames=("scale", "reverse", "chunk", "interpret"))
def forward(q, k, v, g, h0, *, scale, reverse, chunk=CHUNK, interpret=False):
  """Same contract as pallas_gpu.forward."""
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  n_chunks = t // chunk
  blocks = _chunk_map(n_chunks, reverse)
  qk = pl.BlockSpec((None, chunk, kd), blocks)
  vs = pl.BlockSpec((None, chunk, vd), blocks)
  state = pl.BlockSpec((None, kd, vd), lambda i, n: (i, 0, 0))
  per_chunk = pl.BlockSpec((None, None, kd, vd), lambda i, n: (*blocks(i, n)[:2], 0, 0))
  o, ht, states = pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, reverse=reverse),
      grid=(b * h, n_chunks),
      in_specs=[qk, qk, vs, qk, state],
      out_specs=[vs, state, per_chunk],
      out_shape=[jax.ShapeDtypeStruct((b * h, t, vd), v.dtype),
                 jax.ShapeDtypeStruct((b * h, kd, vd), jnp.float32),
                 jax.ShapeDtypeStruct((b * h, n_chunks, kd, vd), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((kd, vd), jnp.float32)],
      compiler_params=_params(),
      interpret=interpret,
      name="gla_fwd",
  )(*map(_heads_first, (q, k, v, g)), h0.reshape(b * h, kd, vd))
  return (_heads_last(o, b), ht.reshape(b, h, kd, vd),
          states.reshape(b, h, n_chunks, kd, vd))


@functools.partial(jax.jit, static_argnames=("scale", "reverse", "chunk", "interpret"))
def backward(q, k, v, g, do, states, dht, dg0, *, scale, reverse, chunk=CHUNK,
             interpret=False):
  """Same contract as pallas_gpu.backward."""
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  n_chunks = t // chunk
  blocks = _chunk_map(n_chunks, not reverse)  # reverse scan order
  qk = pl.BlockSpec((None, chunk, kd), blocks)
  vs = pl.BlockSpec((None, chunk, vd), blocks)
  state = pl.BlockSpec((None, kd, vd), lambda i, n: (i, 0, 0))
  per_chunk = pl.BlockSpec((None, None, kd, vd), lambda i, n: (*blocks(i, n)[:2], 0, 0))
  dq, dk, dv, dg, dh0 = pl.pallas_call(
      functools.partial(_bwd_kernel, scale=scale, reverse=reverse),
      grid=(b * h, n_chunks),
      in_specs=[qk, qk, vs, qk, vs, per_chunk, state,
                pl.BlockSpec((None, 1, kd), lambda i, n: (i, 0, 0))],
      out_specs=[qk, qk, vs, qk, state],
      out_shape=[jax.ShapeDtypeStruct((b * h, t, kd), q.dtype),
                 jax.ShapeDtypeStruct((b * h, t, kd), k.dtype),
                 jax.ShapeDtypeStruct((b * h, t, vd), v.dtype),
                 jax.ShapeDtypeStruct((b * h, t, kd), jnp.float32),
                 jax.ShapeDtypeStruct((b * h, kd, vd), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((kd, vd), jnp.float32), pltpu.VMEM((1, kd), jnp.float32)],
      compiler_params=_params(),
      interpret=interpret,
      name="gla_bwd",
  )(*map(_heads_first, (q, k, v, g, do)), states.reshape(b * h, n_chunks, kd, vd),
    dht.reshape(b * h, kd, vd), dg0.reshape(b * h, 1, kd))
  dq, dk, dv, dg = (_heads_last(x, b) for x in (dq, dk, dv, dg))
  return dq, dk, dv, dg, dh0.reshape(b, h, kd, vd)

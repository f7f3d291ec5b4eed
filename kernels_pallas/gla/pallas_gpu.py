"""GLA forward and backward kernels for GPUs, in Pallas on the Triton backend.

Why Triton and not Mosaic GPU: the Triton backend runs these kernels on CPU in interpret mode
and lowers them for CUDA on a CPU-only jaxlib, so every case is tested in CI; Mosaic GPU has
only a private CPU interpreter. This was chosen for testability, not by a measured race
between the two backends (none was run). Measured on an H100 (BENCHMARKS.md) the kernels are
correct but latency-bound: one program walks all chunks of a (batch, head) in sequence, and a
chunk step costs 10-30 us instead of the 1-2 us planned. They beat the jnp reference only at
T=256; a sequence-split state pass or a Mosaic GPU port is the next step.
(JAX 0.11 deprecates Pallas-Triton; a Mosaic GPU port would keep chunk_math.py as it is.)

Layout: the kernels read q, k, v, g and write o in the caller's [B, T, H, D] layout (no
transposes). One program per (batch, head, V tile) walks the chunks in scan order with the
state in registers; `reverse=True` only changes which chunk index a step reads and the
direction of the in-chunk masks. The forward also stores the state entering each chunk
(float32, 8 K V / C bytes per token) so the backward can walk the chunks in reverse scan order
with the state gradient in registers, never recomputing states. Scores, their gradient and
gate cumulative sums stay on chip.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.gla import chunk_math

CHUNK = 32  # measured on H100: 32 beats 64 (BENCHMARKS.md)
NUM_WARPS = 4


def _seg_view(x, h):
  return x.reshape(x.shape[0] // h, h, x.shape[1])


def _cumsum(x, h, reverse):
  if h == 1:
    return x
  y = _seg_view(x, h)
  c = jnp.cumsum(y, axis=1)
  if reverse:  # Triton has no reverse scan: suffix sum = total - prefix sum + self
    c = jnp.sum(y, axis=1, keepdims=True) - c + y
  return c.reshape(x.shape)


def _segsum(x, h):
  if h == 1:
    return x
  y = _seg_view(x, h)
  return jnp.broadcast_to(jnp.sum(y, axis=1, keepdims=True), y.shape).reshape(x.shape)


OPS = chunk_math.Ops(cumsum=_cumsum, segsum=_segsum,
                     sum_precision=jax.lax.Precision.DEFAULT)  # TF32 in Triton


def _chunk_rows(n, n_chunks, chunk, reverse):
  idx = n_chunks - 1 - n if reverse else n
  return idx, pl.ds(pl.multiple_of(idx * chunk, chunk), chunk)


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, h0_ref, o_ref, ht_ref, states_ref, *, chunk,
                n_chunks, scale, reverse):
  def step(n, state):
    idx, rows = _chunk_rows(n, n_chunks, chunk, reverse)
    states_ref[idx] = state
    o, state = chunk_math.forward(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :],
                                  g_ref[rows, :], state, scale=scale, reverse=reverse, ops=OPS)
    o_ref[rows, :] = o.astype(o_ref.dtype)
    return state

  ht_ref[...] = jax.lax.fori_loop(0, n_chunks, step, h0_ref[...])


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, states_ref, dht_ref, dg0_ref,
                dq_ref, dk_ref, dv_ref, dg_ref, dh0_ref, *, chunk, n_chunks, scale, reverse):
  def step(n, carry):
    dstate, dg_carry = carry
    # Backward visits chunks in reverse scan order.
    idx, rows = _chunk_rows(n, n_chunks, chunk, not reverse)
    dq, dk, dv, dg, dstate, dg_carry = chunk_math.backward(
        q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], g_ref[rows, :], do_ref[rows, :],
        states_ref[idx], dstate, dg_carry, scale=scale, reverse=reverse, ops=OPS)
    dq_ref[rows, :] = dq.astype(dq_ref.dtype)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    dg_ref[rows, :] = dg
    return dstate, dg_carry

  dh0_ref[...], _ = jax.lax.fori_loop(0, n_chunks, step, (dht_ref[...], dg0_ref[...]))


def _spec(d):  # one (batch, head) slice of a [B, T, H, D] array, all of T
  return lambda t: pl.BlockSpec((None, t, None, d), lambda b, h, j: (b, 0, h, 0))


def _v_spec(t, bv):
  return pl.BlockSpec((None, t, None, bv), lambda b, h, j: (b, 0, h, j))


def _state_spec(kd, bv):
  return pl.BlockSpec((None, None, kd, bv), lambda b, h, j: (b, h, 0, j))


def _compiler_params():
  return pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1)


def v_tiles(batch_heads, vd):
  """Split V so that small batch x heads still gives the GPU enough programs."""
  tiles = 1
  while batch_heads * tiles < 128 and vd // (2 * tiles) >= 32:
    tiles *= 2
  return tiles


@functools.partial(jax.jit, static_argnames=("scale", "reverse", "chunk", "interpret"))
def forward(q, k, v, g, h0, *, scale, reverse, chunk=CHUNK, interpret=False):
  """q, k, g [B, T, H, K]; v [B, T, H, V]; h0 [B, H, K, V] f32; T a multiple of `chunk`.

  Returns (o, final state, states entering each chunk [B, H, N, K, V] f32).
  """
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  n_chunks = t // chunk
  nv = v_tiles(b * h, vd)
  bv = vd // nv
  kernel = functools.partial(_fwd_kernel, chunk=chunk, n_chunks=n_chunks, scale=scale,
                             reverse=reverse)
  qk = _spec(kd)(t)
  return pl.pallas_call(
      kernel,
      grid=(b, h, nv),
      in_specs=[qk, qk, _v_spec(t, bv), qk, _state_spec(kd, bv)],
      out_specs=[_v_spec(t, bv), _state_spec(kd, bv),
                 pl.BlockSpec((None, None, n_chunks, kd, bv), lambda b, h, j: (b, h, 0, 0, j))],
      out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct((b, h, kd, vd), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, n_chunks, kd, vd), jnp.float32)],
      compiler_params=_compiler_params(),
      interpret=interpret,
      name="gla_fwd",
  )(q, k, v, g, h0)


@functools.partial(jax.jit, static_argnames=("scale", "reverse", "chunk", "interpret"))
def backward(q, k, v, g, do, states, dht, dg0, *, scale, reverse, chunk=CHUNK,
             interpret=False):
  """Returns (dq, dk, dv, dg, dh0). dg0 [B, H, 1, K]: the final-state term of dg."""
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  n_chunks = t // chunk
  kernel = functools.partial(_bwd_kernel, chunk=chunk, n_chunks=n_chunks, scale=scale,
                             reverse=reverse)
  qk, vs = _spec(kd)(t), _spec(vd)(t)
  full_state = _state_spec(kd, vd)
  return pl.pallas_call(
      kernel,
      grid=(b, h, 1),
      in_specs=[qk, qk, vs, qk, vs,
                pl.BlockSpec((None, None, n_chunks, kd, vd), lambda b, h, j: (b, h, 0, 0, 0)),
                full_state, pl.BlockSpec((None, None, 1, kd), lambda b, h, j: (b, h, 0, 0))],
      out_specs=[qk, qk, vs, qk, full_state],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(g.shape, jnp.float32),
                 jax.ShapeDtypeStruct((b, h, kd, vd), jnp.float32)],
      compiler_params=_compiler_params(),
      interpret=interpret,
      name="gla_bwd",
  )(q, k, v, g, do, states, dht, dg0)

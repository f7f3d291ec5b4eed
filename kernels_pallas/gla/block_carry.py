"""The GLA state carried across sequence blocks, as one small Pallas (Triton) kernel per pass.

When `pallas_gpu` splits a sequence into NB blocks, each block's walk needs the state entering
it (forward) and the gradient of the state leaving it (backward). With U_n the state block n
makes on its own from a zero state and lam_n its total log-decay (per key row), the carry is

  S_in[0] = h0,   S_in[n + 1] = exp(lam_n) S_in[n] + U_n
  dS_out[NB - 1] = dht,   dS_out[n - 1] = exp(lam_n) dS_out[n] + W_n

(W_n: block n's queries' share of the gradient of the state entering it). Each key row k of a
(batch, head) is independent, so one program per (b, h, k) computes all NB blocks at once as a
masked matrix product over pairs of blocks, with every exponent <= 0:

  S_in[n] = exp(P_n) h0 + sum_{m < n} exp(P_n - Q_m) U_m
  dS_out[n] = exp(Q_last - Q_n) dht + sum_{m > n} exp(P_m - Q_n) W_m

Q and P are the inclusive and exclusive prefix sums of lam over blocks. The backward pass also
gives the forget gate's carry at each block's end, sum_V(S_out * dS_out), so no XLA reduction
follows it.

Why a kernel: the same products in XLA (prefix sums as a triangular matmul, the masked weights,
a batched float32 matmul, the h0 term, the gate carry's reduction) were 8-10 small fusions per
layer and pass, about 0.4 ms of a DiG-S/2 training step at 1792 px (BENCHMARKS.md). A walk
over blocks in order (one dependent step per block) was tried before and was as slow as the
XLA form; this kernel has no serial chain. Measured on an H100 (BENCHMARKS.md, session 13):
the two kernels take about 0.3 ms of that step, and whole DiG-S/2 steps run 1.2-1.8 % faster at
1024-2048 px (no change at 512 px, nor for DiG-XL/2 at 2048 px).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_HIGHEST = jax.lax.Precision.HIGHEST  # float32 products (IEEE in Triton, not TF32)


def _tile_blocks(nb):
  """Blocks per tile: a power of two (Triton tiles), at least 16 (Triton's smallest dot)."""
  return max(16, 1 << (nb - 1).bit_length())


def _rows(nb, nbp):
  """Block indices 0 .. nbp - 1 (Triton tiles are powers of two) and which of them exist."""
  n = jax.lax.broadcasted_iota(jnp.int32, (nbp,), 0)
  return n, n < nb


def _load_blocks(ref, nb, nbp):  # [NB, V] ref -> [nbp, V] float32, zero past NB
  n, ok = _rows(nb, nbp)
  v = jax.lax.broadcasted_iota(jnp.int32, (1, ref.shape[1]), 1)
  mask = jnp.broadcast_to(ok[:, None], (nbp, ref.shape[1]))
  return pltriton.load(ref.at[n[:, None], v], mask=mask, other=0.0)


def _store_blocks(ref, value, nb, nbp):
  n, ok = _rows(nb, nbp)
  v = jax.lax.broadcasted_iota(jnp.int32, (1, ref.shape[1]), 1)
  pltriton.store(ref.at[n[:, None], v], value,
                 mask=jnp.broadcast_to(ok[:, None], value.shape))


def _prefix_sums(lam_ref, nb, nbp):
  """(Q, P, Q of the last block): inclusive and exclusive prefix sums over blocks of this key
  row's log-decays, and their total."""
  n, ok = _rows(nb, nbp)
  lam = pltriton.load(lam_ref.at[n], mask=ok, other=0.0)
  q = jnp.cumsum(lam, axis=0)
  return q, q - lam, jnp.sum(lam, axis=0, keepdims=True)


def _entering_kernel(lam_ref, u_ref, h0_ref, s_in_ref, *, nb, nbp):
  q, p, _ = _prefix_sums(lam_ref, nb, nbp)
  n = jax.lax.broadcasted_iota(jnp.int32, (nbp, nbp), 0)
  m = jax.lax.broadcasted_iota(jnp.int32, (nbp, nbp), 1)
  w = jnp.exp(jnp.where(m < n, p[:, None] - q[None, :], -jnp.inf))
  s_in = jnp.dot(w, _load_blocks(u_ref, nb, nbp), precision=_HIGHEST)
  s_in += jnp.exp(p)[:, None] * h0_ref[...][None, :]
  _store_blocks(s_in_ref, s_in, nb, nbp)


def _leaving_kernel(lam_ref, w_ref, dht_ref, s_out_ref, ds_out_ref, dgc_ref, *, nb, nbp):
  q, p, q_last = _prefix_sums(lam_ref, nb, nbp)
  n = jax.lax.broadcasted_iota(jnp.int32, (nbp, nbp), 0)
  m = jax.lax.broadcasted_iota(jnp.int32, (nbp, nbp), 1)
  w = jnp.exp(jnp.where(m > n, p[None, :] - q[:, None], -jnp.inf))
  ds_out = jnp.dot(w, _load_blocks(w_ref, nb, nbp), precision=_HIGHEST)
  ds_out += jnp.exp(q_last - q)[:, None] * dht_ref[...][None, :]
  _store_blocks(ds_out_ref, ds_out, nb, nbp)
  ni, ok = _rows(nb, nbp)
  dgc = jnp.sum(_load_blocks(s_out_ref, nb, nbp) * ds_out, axis=1)
  pltriton.store(dgc_ref.at[ni], dgc, mask=ok)


def _specs(kd, nb, vd):
  """Block specs over (b, h, k): a key row's [NB, V] blocks of a [B, H, K, NB, V] array, its
  [NB] log-decays of [B, H, NB, 1, K], and its [V] row of a [B, H, K, V] state."""
  blocks = pl.BlockSpec((None, None, None, nb, vd), lambda b, h, k: (b, h, k, 0, 0))
  per_block = pl.BlockSpec((None, None, nb, None, None), lambda b, h, k: (b, h, 0, 0, k))
  row = pl.BlockSpec((None, None, None, vd), lambda b, h, k: (b, h, k, 0))
  return blocks, per_block, row


# 8 warps: measured on an H100 at DiG's shapes (16-64 blocks), faster than 4 by 4-11 us a
# launch and than 2 by more; float32 products on tensor cores (TF32 x 3) were no faster.
NUM_WARPS = 8


def _params():
  return pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1)


@functools.partial(jax.jit, static_argnames=("interpret",))
def states_entering(u, lam, h0, *, interpret=False):
  """u [B, H, K, NB, V] (each block's own state), lam [B, H, NB, 1, K] (its log-decay), h0
  [B, H, K, V], all float32 -> the state entering each block, [B, H, K, NB, V]."""
  b, h, kd, nb, vd = u.shape
  blocks, per_block, row = _specs(kd, nb, vd)
  return pl.pallas_call(
      functools.partial(_entering_kernel, nb=nb, nbp=_tile_blocks(nb)), grid=(b, h, kd),
      in_specs=[per_block, blocks, row], out_specs=blocks,
      out_shape=jax.ShapeDtypeStruct(u.shape, jnp.float32),
      compiler_params=_params(),
      interpret=interpret, name="gla_states_entering")(lam, u, h0)


@functools.partial(jax.jit, static_argnames=("interpret",))
def dstates_leaving(w_local, lam, dht, s_out, *, interpret=False):
  """w_local [B, H, K, NB, V] (each block's queries' gradient share), lam [B, H, NB, 1, K],
  dht [B, H, K, V], s_out [B, H, K, NB, V] (the state leaving each block), all float32 ->
  (the gradient of the state leaving each block [B, H, K, NB, V], the gate carry at each
  block's end sum_V(s_out * ds_out) [B, H, NB, 1, K])."""
  b, h, kd, nb, vd = w_local.shape
  blocks, per_block, row = _specs(kd, nb, vd)
  return pl.pallas_call(
      functools.partial(_leaving_kernel, nb=nb, nbp=_tile_blocks(nb)), grid=(b, h, kd),
      in_specs=[per_block, blocks, row, blocks], out_specs=[blocks, per_block],
      out_shape=[jax.ShapeDtypeStruct(w_local.shape, jnp.float32),
                 jax.ShapeDtypeStruct(lam.shape, jnp.float32)],
      compiler_params=_params(),
      interpret=interpret, name="gla_dstates_leaving")(lam, w_local, dht, s_out)

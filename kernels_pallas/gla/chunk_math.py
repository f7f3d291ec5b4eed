"""GLA math for one chunk, shared by the GPU and TPU kernels (values in, values out).

Rows of a chunk are in memory order; `reverse=True` means the scan visits them last to first.
Within a chunk, G = cumulative log-gate in scan order. The intra-chunk scores
A[i, j] = sum_c q_ic k_jc exp(G_ic - G_jc) (j at or before i in scan order) are built by
recursive halving: for a block of 2h rows, queries in its second half see keys in its first
half through one matmul anchored at the boundary between the halves, so the query factor
exp(G_i - G_mid) and the key factor exp(G_mid - G_j) are both <= 1 whatever the gates.
Both exponents are sums of g over a segment of h rows, so no gather of G is needed, and one
exponential per element serves both sides (queries use the second half, keys the first).
The halving stops at blocks of `diag` rows:
- diag = 1: down to single rows; the diagonal is q_i . k_i. Exact for any gates, but
  log2(C) masked [C, C] matmuls (three each in the backward).
- diag = d > 1: each d-row diagonal block is one matmul anchored at its middle row: one side's
  factor is then >= 1, up to exp(d/2 * |g|), which is finite in float32 while every per-step
  log-decay is above -160 / d (-10 for d = 16); `gate_floor(d)` is that bound and the GPU kernels
  raise g to it on load (a decay of e^-10 per step already wipes the state). Fewer matmuls and
  exponentials per chunk.

Matmul precision: scores and outputs take q, k, v, do (q and k scaled by gate factors) in the
input dtype; matmuls that make or use the state, its gradient or the score gradient stay
float32 with `ops.sum_precision` (TF32 on GPU, fp32 on TPU). With those in bf16, the gate
gradient (a suffix sum of q*dq - k*dk, which cancel) was off by up to 1e-2 under strong gates.
do goes into every product unscaled (exact in its 16-bit dtype), `scale` onto the other
factor: a 16-bit copy of scale * do had cost dq, dk and dg 0.6-2.3e-3 of relative error.
Float32 inputs use exact fp32 everywhere.

`ops` supplies what the Pallas backends lower differently: `cumsum(x, h, reverse)`
(inclusive, within segments of h rows), `segsum(x, h)` (each row gets its segment's total)
and `sum_precision`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

f32 = jnp.float32


class Ops(NamedTuple):
  cumsum: Callable  # (x [C, D], h, reverse) -> [C, D]
  segsum: Callable  # (x [C, D], h) -> [C, D]
  sum_precision: jax.lax.Precision  # fp32 matmuls of sums when inputs are 16-bit


class _Precision(NamedTuple):
  """How the matmuls of one chunk take their operands."""
  inputs: jnp.dtype  # operand dtype for scaled inputs (bf16 MMA for bf16 inputs)
  sums: object       # precision of float32 matmuls with a sum as operand

  @classmethod
  def of(cls, dtype, ops):
    if dtype == f32:
      return cls(f32, jax.lax.Precision.HIGHEST)
    return cls(dtype, ops.sum_precision)


def _dot(a, b, contract, prec, sums=False):
  """fp32-accumulated matmul; `sums`: an operand is a float32 sum, not a scaled input."""
  dtype = f32 if sums else prec.inputs
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (contract, ((), ())),
                             precision=prec.sums if dtype == f32 else None,
                             preferred_element_type=f32)


def _nn(a, b, dt, sums=False):  # a @ b
  return _dot(a, b, ((1,), (0,)), dt, sums)


def _nt(a, b, dt, sums=False):  # a @ b.T
  return _dot(a, b, ((1,), (1,)), dt, sums)


def _tn(a, b, dt, sums=False):  # a.T @ b
  return _dot(a, b, ((0,), (0,)), dt, sums)


def _levels(c, diag):
  h = c // 2
  while h >= diag and h >= 1:
    yield h
    h //= 2


def gate_floor(diag):
  """Smallest per-step log-decay the `diag` scheme keeps finite (None: no limit)."""
  return None if diag == 1 else -160.0 / diag


def _iotas(c):
  """Row index [C, 1] and column index [1, C]: masks broadcast, no [C, C] int tensors live."""
  return (jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0),
          jax.lax.broadcasted_iota(jnp.int32, (1, c), 1))


def _second_half(i, h, reverse):
  """Rows in the second half (scan order) of their 2h-row block."""
  bit = (i >> (h.bit_length() - 1)) & 1
  return bit == (0 if reverse else 1)


def _level_mask(i, j, h, reverse):
  """Queries in the second half (scan order) of each 2h block x keys in its first half."""
  if reverse:
    i, j = j, i
  shift = h.bit_length() - 1
  bi, bj = i >> shift, j >> shift
  return ((bi & 1) == 1) & (bj == bi - 1)


def _diag_mask(i, j, d, reverse):
  """Pairs in the same d-row block, key at or before query in scan order."""
  shift = d.bit_length() - 1
  return ((i >> shift) == (j >> shift)) & ((j >= i) if reverse else (j <= i))


def _offsets_from_mid(g, h, reverse, ops, i):
  """G_r - G_mid for every row r, mid = last row (scan order) of the first half of r's
  2h-row block: <= 0 in the second half, >= 0 in the first."""
  cum = ops.cumsum(g, h, reverse)
  return jnp.where(_second_half(i, h, reverse), cum, cum - ops.segsum(g, h))


def _score_terms(g, reverse, diag, ops):
  """[(query factor [C, K], key factor [C, K], mask [C, C])]: A = sum of the masked
  (q * fq) @ (k * fk).T over the terms (plus q_i . k_i on the diagonal when diag == 1)."""
  c = g.shape[0]
  i, j = _iotas(c)
  terms = []
  for h in _levels(c, diag):
    # Query rows use exp(G_i - G_mid) (second half), key rows exp(G_mid - G_j) (first half):
    # both <= 1, and one array holds both since the mask never pairs the other halves.
    off = _offsets_from_mid(g, h, reverse, ops, i)
    f = jnp.exp(jnp.where(_second_half(i, h, reverse), off, -off))
    terms.append((f, f, _level_mask(i, j, h, reverse)))
  if diag > 1:
    e = jnp.exp(_offsets_from_mid(g, diag // 2, reverse, ops, i))
    terms.append((e, 1.0 / e, _diag_mask(i, j, diag, reverse)))
  return terms


def _scores(qf, kf, terms, dt, diag):
  """The masked in-chunk scores A [C, C] from `_score_terms` (float32 q and k)."""
  a = 0.0
  if diag == 1:  # the diagonal q_i . k_i, outside the matmul terms
    i, j = _iotas(qf.shape[0])
    a = jnp.where(i == j, jnp.sum(qf * kf, axis=1, keepdims=True), 0.0)
  for fq, fk, mask in terms:
    a += jnp.where(mask, _nt(qf * fq, kf * fk, dt), 0.0)
  return a


def _chunk_decays(g, reverse, ops):
  """exp(G) for queries, exp(gamma - G) for keys, exp(gamma) as a [K, 1] column."""
  cum = ops.cumsum(g, g.shape[0], reverse)
  total = jnp.sum(g, axis=0, keepdims=True)
  total_col = jnp.sum(g.T, axis=1, keepdims=True)
  return jnp.exp(cum), jnp.exp(total - cum), jnp.exp(total_col)


def forward(q, k, v, g, state, *, scale, reverse, ops, diag=1):
  """One chunk. q, k [C, K], v [C, V] (input dtype), g [C, K] and state [K, V] float32.

  Returns (o [C, V] float32, state after the chunk).
  """
  dt = _Precision.of(q.dtype, ops)
  qf, kf = q.astype(f32), k.astype(f32)
  eq, ek, decay = _chunk_decays(g, reverse, ops)
  a = _scores(qf, kf, _score_terms(g, reverse, diag, ops), dt, diag)
  o = scale * (_nn(qf * eq, state, dt, sums=True) + _nn(a, v, dt))
  state = decay * state + _tn(kf * ek, v, dt, sums=True)
  return o, state


def backward(q, k, v, g, do, state, dstate, dg_carry, *, scale, reverse, ops, diag=1):
  """Gradients of one chunk, visited in reverse scan order.

  state: state entering the chunk; dstate: gradient of the state leaving it; dg_carry [1, K]:
  sum over later tokens of q*dq - k*dk plus the final-state term (see api.py).
  Returns (dq, dk, dv, dg, dstate entering the chunk, dg_carry), all float32.
  """
  dt = _Precision.of(q.dtype, ops)
  c = q.shape[0]
  qf, kf = q.astype(f32), k.astype(f32)
  dof = do.astype(f32)  # unscaled, `scale` on the other factors (module docstring)
  eq, ek, decay = _chunk_decays(g, reverse, ops)
  eq = scale * eq
  i, j = _iotas(c)
  # Ordered so that few [C, C] and [C, D] values are live at once (register pressure on GPUs):
  # the output-side terms first (v dies), then the scores and dv (A dies), then dq and dk.
  vf = v.astype(f32)
  da = jnp.where((j >= i) if reverse else (j <= i), scale * _nt(dof, vf, dt), 0.0)
  dk = ek * _nt(vf, dstate, dt, sums=True)
  terms = _score_terms(g, reverse, diag, ops)
  a = _scores(qf, kf, terms, dt, diag)
  dv = _tn(scale * a, dof, dt) + _nn(kf * ek, dstate, dt, sums=True)
  dq = eq * _nt(dof, state, dt, sums=True)
  if diag == 1:  # the diagonal q_i . k_i, outside the matmul terms
    da_diag = jnp.sum(jnp.where(i == j, da, 0.0), axis=1, keepdims=True)
    dq += da_diag * kf
    dk += da_diag * qf
  for fq, fk, mask in terms:
    da_h = jnp.where(mask, da, 0.0)
    dq += fq * _nn(da_h, kf * fk, dt, sums=True)
    dk += fk * _tn(da_h, qf * fq, dt, sums=True)

  x = qf * dq - kf * dk  # dL/dG per token; dg is its suffix sum in scan order
  dg = ops.cumsum(x, c, not reverse) + dg_carry
  dg_carry = dg_carry + jnp.sum(x, axis=0, keepdims=True)
  dstate = decay * dstate + _tn(qf * eq, dof, dt, sums=True)
  return dq, dk, dv, dg, dstate, dg_carry


def state_update(k, v, g, state, *, reverse, ops):
  """State after one chunk (forward state pass: no outputs). Same arithmetic as `forward`."""
  dt = _Precision.of(k.dtype, ops)
  _, ek, decay = _chunk_decays(g, reverse, ops)
  return decay * state + _tn(k.astype(f32) * ek, v, dt, sums=True)


def dstate_update(q, g, do, dstate, *, scale, reverse, ops):
  """Gradient of the state entering one chunk from that of the state leaving it, counting
  only this chunk's queries (backward state pass). Same arithmetic as `backward`."""
  dt = _Precision.of(q.dtype, ops)
  eq, _, decay = _chunk_decays(g, reverse, ops)
  return decay * dstate + _tn(q.astype(f32) * (scale * eq), do.astype(f32), dt, sums=True)


def states_pass_update(q, k, v, g, do, state, dstate, decay_before, *, scale, reverse, ops):
  """One chunk of the backward's pass over a block in scan order: the state after the chunk
  (as `state_update`), and this chunk's queries' share of the gradient of the state entering
  the block, summed in scan order: dstate + decay_before * (q * exp(G)).T @ do, decay_before
  [K, 1] being the block's decay before this chunk (returned times the chunk's). Summed that
  way, the share equals `dstate_update` walked over the block in reverse from zero."""
  dt = _Precision.of(q.dtype, ops)
  eq, ek, decay = _chunk_decays(g, reverse, ops)
  state = decay * state + _tn(k.astype(f32) * ek, v, dt, sums=True)
  share = _tn(q.astype(f32) * (scale * eq), do.astype(f32), dt, sums=True)
  return state, dstate + decay_before * share, decay_before * decay


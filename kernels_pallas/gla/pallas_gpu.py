"""GLA forward and backward kernels for GPUs, in Pallas on the Triton backend, split over the sequence.

Why Triton and not Mosaic GPU: the Triton backend runs these kernels on CPU in interpret mode
and lowers them for CUDA on a CPU-only jaxlib, so every case is tested in CI; Mosaic GPU has
only a private CPU interpreter. (JAX 0.11 deprecates Pallas-Triton.) What a Mosaic GPU port
would find, probed on JAX 0.10.2 on CPU: kernels with wgmma lower for CUDA (bf16 operands in
SMEM need tiling (8, 64) and 128-byte swizzle transforms; A may come from registers, B
transposed through `transpose_ref`, scores through SMEM into a second wgmma; iota masks and
exp lower); the private interpreter (`jax._src.pallas.mosaic_gpu.interpret`) runs wgmma only
on plain SMEM refs: not on refs with those transforms, not with A from registers or B through
`transpose_ref`, and not with layout casts (an iota with a layout), so an interpreted kernel
would differ from the compiled one exactly where the layouts are; `jnp.cumsum` has no lowering
(a wgmma with a triangular 0/1 matrix does, which chunk_math's `ops.cumsum` could be), and a
row or column sum broadcast back over the tile needs explicit layouts. A direct port (one
warpgroup per sequence over 64-row wgmma chunks, exponents as constant-matrix products on the
tensor cores) ran correctly on an H100 but 1.8x (forward) to 4x (backward) slower than these
kernels: one program per SM, each product waited on (BENCHMARKS.md, session 20).

Design (sequence split, as fla's chunk_h_split): the scan-ordered chunks of one (batch, head)
are grouped into blocks of L chunks (L = `block_chunks_for`: 192-256 tokens, up to 512 where
that makes the backward one wave, sized by waves of backward programs, longer for very long
sequences), and every
kernel runs one program per (batch, head, block), so a long sequence gives the GPU many short
serial chains instead of one long one (the first version walked all T/C chunks of a head in
one program: at T = 4096 that left most SMs idle, BENCHMARKS.md).

Forward, when there is more than one block:
1. `gla_fwd_states`: each block's own contribution to the state (walking its L chunks from a
   zero state, no outputs) and its total log-decay.
2. `gla_states_entering` (block_carry.py): the state entering each block, S_in[n] =
   exp(P_n) h0 + sum_{m<n} exp(P_n - P_{m+1}) U_m with P the exclusive prefix sum of block
   log-decays: one masked product over pairs of blocks per key row (every exponent <= 0), no
   sequential loop.
3. `gla_fwd`: outputs, from S_in, walking the block's chunks with chunk_math.forward (the
   intra-chunk scores: see "In-chunk scheme" below), and the state leaving the block. The
   backward needs the state entering every chunk: by default (RECOMPUTE_STATES) it recomputes
   them from S_in with `gla_chunk_states` (a state-only walk over k, v, g; with several blocks
   the same walk inside `gla_states_pass`, below), so that all layers'
   residuals hold S_in (1/L of the states) rather than 4 K V / C bytes per token; with
   RECOMPUTE_STATES = False `gla_fwd` stores them instead.
Backward, likewise: each block's queries' contribution to the gradient of the state entering
it, from `gla_states_pass` (one walk in scan order that also recomputes the chunk states:
two short serial chains in one stream, measured 22-33 % less kernel time than the two walks
apart, BENCHMARKS.md) or, with stored states, from `gla_bwd_states` (a reverse walk over q, g,
do); `gla_dstates_leaving` for the gradient of the state leaving each block
(the same masked product, reversed) and the gate's carry at each block's end, then `gla_bwd`,
walking each block's chunks in reverse scan order with chunk_math.backward. The gate
gradient's carry from later tokens needs no pass over the sequence: at a block's end it equals
sum_V(S_leave * dS_leave) (state leaving the block times the gradient reaching it from later
tokens; for the last block that is sum_V(ht * dht)).
With one block (short sequences, or `block_chunks >= T / C`) steps 1-2 are skipped and this is
the single-pass design of the first version. Its backward may still walk halves of the block
(`backward_block_chunks`: where the sequences take more than one wave of backward programs,
as DiG-S/2's 384 at 256 px do): `gla_states_pass` then also takes each half's share and
joins the halves (the gradient of the state leaving each, and the gate's carry at its end),
as `block_carry.dstates_leaving` does for many blocks (measured on an H100: fwd+bwd -19 % at
DiG-S/2 256 px, BENCHMARKS.md).

In-chunk scheme: chunks of 16 rows (CHUNK), each one matmul anchored at its middle row
(chunk_math with diag = 16, DIAG). Chunks of 16 measured 11-24 % faster fwd+bwd than chunks of
32 (one anchored matmul for the two halves plus one for the two diagonal blocks) on an H100:
every per-chunk value is half the size, and the backward walk, which holds them all in
registers, spills less (BENCHMARKS.md). The scheme's price is a floor on the gates: per-step
log-decays below -10 are raised to -10 when g is loaded (values and gradients are then those of
the floored gates; a decay of e^-10 per token already erases the state). DIAG = 1 keeps the
exact scheme (recursive halving down to single rows) for any gates.

Layout: the kernels read q, k, v, g and write o in the caller's [B, T, H, D] layout (no
transposes). Packed (`packed_vd`, api.chunk_gla_packed), q, k and v are the column blocks of
one [B, T, W] array (a projection matmul's output) and each program's BlockSpecs pick its
head's blocks along the last axis, so nothing is sliced out of it; the backward then writes
dq, dk and dv into one packed gradient, every program of a batch row writing its head's
columns of the row's shared block. `reverse=True` only changes which chunk index a step
reads and the direction of the in-chunk masks; blocks and per-block arrays are numbered in
scan order. `column_scan=(h, w)` (DiG's column layers) likewise only changes which token rows
a chunk reads: `chunk` tokens down one column of the raster grid, a slice with stride w.
Measured on an H100 (BENCHMARKS.md): the same step time as transposing the activations around
the layer (XLA had fused most of those copies into the neighbouring norms), so it is kept for
the two copies per column layer it removes, not for speed.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas import register_cap
from kernels_pallas.gla import block_carry, chunk_math

CHUNK = 16  # measured on H100: 16 beats 32, which beat 64 (BENCHMARKS.md)
DIAG = 16  # chunk_math scheme: mid-anchored diagonal blocks of 16 rows (BENCHMARKS.md)
NUM_WARPS = 4  # warps per program: an int, or {kernel name or "default": warps}
# Triton software-pipelining stages of the chunk loops (loads of the next chunks issued while
# this one computes), same form as NUM_WARPS. 3 for every walk, by measurement on an H100
# (BENCHMARKS.md): at chunk 32 (ncu) 3 stages took 3-18 % off the backward walks but slowed the
# forward walks; at chunk 16 they also speed up the forward walks (forward -11 to -19 % at
# T >= 4096, fwd+bwd -3 to -8 % in two runs).
NUM_STAGES = 3
# Registers per thread a kernel may use (None: the compiler's choice), same form as NUM_WARPS;
# Triton's `ttg.maxnreg`, set by kernels_pallas.register_cap (a capped kernel's name ends in
# `_maxnreg<cap>`). None by measurement: capping the backward walk at 168 (3 programs per SM)
# made whole DiG steps 0.4-2 % slower on an H100 (spills; BENCHMARKS.md, session 16).
MAX_REGISTERS = None
# Chunks per sequence block; None: `block_chunks_for` below. Tests set it to force many blocks.
BLOCK_CHUNKS = None
# Chunks per backward block where the forward keeps each sequence whole (one block); None:
# `backward_block_chunks`. Tests set it to force the split.
BWD_BLOCK_CHUNKS = None
# Backward-walk programs (`gla_bwd`: 255 registers x 4 warps) an SM runs at once (ncu on an
# H100); `block_chunks_for` sizes blocks so that their last wave is not mostly idle.
BWD_PROGRAMS_PER_SM = 2
# True: the backward recomputes the state entering each chunk from the state entering each
# block (one light pass over k, v, g) instead of keeping them from the forward: the residuals
# per token and head shrink by 4 K V / C bytes (15/16 of it with 16-chunk blocks; 0.6 GB for
# DiG-S/2 at 16k tokens a step). Measured cost: 8-11 % of the kernel's fwd+bwd time on an H100
# (BENCHMARKS.md). False keeps the forward's states.
RECOMPUTE_STATES = True
# The forward and chunk-state walks split V into tiles while batch x heads x blocks is below
# this many programs (`v_tiles`).
V_TILE_PROGRAMS = 128


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


def block_chunks_for(n_chunks, sequences, chunk=CHUNK, slots=None):
  """Chunks per sequence block for `sequences` (batch x heads) sequences of `n_chunks` chunks.

  Base size: 256 tokens (one block, so no state passes, up to 256 tokens), doubled while there
  would be more than 128 blocks (the pass over blocks, block_carry, is quadratic in their
  number). Past one block, the size is the one in [3/4 base, base] (and at most 64 blocks, or
  base's count) that minimises waves x chunks per program: the backward walk runs `slots`
  programs at a time (BWD_PROGRAMS_PER_SM per SM), each as long as its chunks, so 294
  programs of 16 chunks on 264 slots take two full waves (32 chunk steps) where 366 of 13
  take 26 (ties: the larger). Sizes up to 2 base compete too where they make the backward
  one wave: 264 programs of 18 take 18 steps. (Longer blocks that still leave several waves
  lose what they save to the forward walks, whose waves they lengthen: DiG-XL/2 at 2048 px.)
  Measured on an H100 (BENCHMARKS.md): a DiG-S/2 training step -5 % at 1792 px, -2 % at 512 px,
  -1 % at 1024 px against 16-chunk blocks; blocks below 3/4 base, or more than 64 of them, lost
  to the longer pass over blocks (measured when that pass was XLA's; block_carry.py has since
  replaced it); one wave of longer blocks (session 17): -2.4 % at 1792 px, -2.7 % at 2048 px."""
  base = max(1, 256 // chunk)
  while -(-n_chunks // base) > 128:
    base *= 2
  if n_chunks <= base:
    return base
  slots = slots or BWD_PROGRAMS_PER_SM * _sm_count()

  def chunk_steps(size):
    return -(-sequences * -(-n_chunks // size) // slots) * size

  most = max(64, -(-n_chunks // base))  # more blocks: the pass costs what the waves save
  sizes = [s for s in range(base, -(-3 * base // 4) - 1, -1) if -(-n_chunks // s) <= most]
  one_wave = [s for s in range(base + 1, 2 * base + 1) if sequences * -(-n_chunks // s) <= slots]
  return min(sizes + one_wave[:1], key=chunk_steps)  # ties: the first


def backward_block_chunks(n_chunks, sequences, slots=None):
  """Chunks per backward block when the forward runs each sequence as one block of n_chunks:
  all of them, or half where the sequences take more than one wave of backward programs and
  halves take at least a fifth off the walk's waves x chunks per program (384 sequences of
  16 chunks on 264 slots: two waves of 16 chunk steps, or three of 8). The halves cost a
  share of the block gradient state in the chunk-state walk and a carry between them, both
  in `gla_states_pass`; measured on an H100: BENCHMARKS.md."""
  slots = slots or BWD_PROGRAMS_PER_SM * _sm_count()
  half = -(-n_chunks // 2)

  def chunk_steps(size):
    return -(-sequences * -(-n_chunks // size) // slots) * size

  if sequences > slots and n_chunks >= 2 and chunk_steps(half) <= 0.8 * chunk_steps(n_chunks):
    return half
  return n_chunks


def _sm_count():
  """SMs of the first GPU; an H100's 132 where there is none (lowering for CUDA on a CPU)."""
  try:
    return getattr(jax.devices("gpu")[0], "core_count", None) or 132
  except RuntimeError:
    return 132


def _blocks(n_chunks, sequences, block_chunks, chunk):
  size = block_chunks or BLOCK_CHUNKS or block_chunks_for(n_chunks, sequences, chunk)
  size = max(1, min(size, n_chunks))
  return size, -(-n_chunks // size)


def column_scan_ok(column_scan, t, chunk=CHUNK):
  """Whether the kernels can scan T tokens column by column of an (h, w) raster grid: h * w = T
  and whole chunks in each column (h a multiple of the chunk)."""
  h, w = column_scan
  return h * w == t and h % chunk == 0


class _Walk:
  """Chunks of one sequence block: scan positions n0 .. n0 + count - 1.

  column_scan = (h, w): the tokens are stored as an h x w raster grid and scanned column by
  column, so a chunk is `chunk` tokens down one column: a slice of the token axis with stride
  w (h a multiple of the chunk). That is the transposed scan of DiG's layers 4k+2 and 4k+3,
  read in place instead of from a transposed copy of the activations."""

  def __init__(self, blk, n_chunks, size, chunk, reverse, diag, column_scan=None):
    self.n0 = blk * size
    self.count = jnp.minimum(size, n_chunks - self.n0)
    self.n_chunks, self.chunk, self.reverse = n_chunks, chunk, reverse
    self.column_scan = column_scan
    self.floor = chunk_math.gate_floor(diag)

  def rows(self, n):
    """Memory chunk index (in scan order) and the token rows of scan position n."""
    idx = self.n_chunks - 1 - n if self.reverse else n
    if self.column_scan is None:
      return idx, pl.ds(pl.multiple_of(idx * self.chunk, self.chunk), self.chunk)
    h, w = self.column_scan
    per_column = h // self.chunk
    # idx >= 0, so truncating division serves; jnp's floor `%` and `//` (their sign fix-ups)
    # failed to lower for Triton on a bare loop index (`gla_states_pass` walking halves)
    per_column = jnp.int32(per_column)
    first_row = jax.lax.rem(idx, per_column) * self.chunk
    return idx, pl.ds(first_row * w + jax.lax.div(idx, per_column), self.chunk, stride=w)

  def gates(self, g_ref, rows):
    """Log-gates of the rows, raised to the scheme's floor (chunk_math.gate_floor): done on
    load, so no extra pass over g, and every kernel of a call sees the same gates."""
    g = g_ref[rows, :]
    return g if self.floor is None else jnp.maximum(g, self.floor)

  def forward(self, body, init):  # body(scan position, carry) -> carry
    return jax.lax.fori_loop(0, self.count, lambda i, c: body(self.n0 + i, c), init)

  def backward(self, body, init):  # the block's chunks in reverse scan order
    last = self.n0 + self.count - 1
    return jax.lax.fori_loop(0, self.count, lambda i, c: body(last - i, c), init)


def _fwd_states_kernel(k_ref, v_ref, g_ref, u_ref, lam_ref, *, chunk, n_chunks, size,
                       reverse, diag, column_scan):
  walk = _Walk(pl.program_id(2), n_chunks, size, chunk, reverse, diag, column_scan)

  def step(n, carry):
    state, lam = carry
    _, rows = walk.rows(n)
    g = walk.gates(g_ref, rows)
    state = chunk_math.state_update(k_ref[rows, :], v_ref[rows, :], g, state,
                                    reverse=reverse, ops=OPS)
    return state, lam + jnp.sum(g, axis=0, keepdims=True)

  kd, vd = u_ref.shape
  state, lam = walk.forward(step, (jnp.zeros((kd, vd), jnp.float32),
                                   jnp.zeros((1, kd), jnp.float32)))
  u_ref[...] = state
  lam_ref[...] = lam


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, s_in_ref, o_ref, s_out_ref, *states_ref, chunk,
                n_chunks, size, nv, scale, reverse, diag, column_scan):
  """states_ref: optional output of the state entering every chunk (RECOMPUTE_STATES off)."""
  walk = _Walk(pl.program_id(2) // nv, n_chunks, size, chunk, reverse, diag, column_scan)

  def step(n, state):
    idx, rows = walk.rows(n)
    if states_ref:
      states_ref[0][idx] = state
    o, state = chunk_math.forward(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :],
                                  walk.gates(g_ref, rows), state, scale=scale, reverse=reverse,
                                  ops=OPS, diag=diag)
    o_ref[rows, :] = o.astype(o_ref.dtype)
    return state

  s_out_ref[...] = walk.forward(step, s_in_ref[...])


def _chunk_states_kernel(k_ref, v_ref, g_ref, s_in_ref, states_ref, *, chunk, n_chunks, size,
                         nv, reverse, diag, column_scan):
  """The state entering every chunk of a block, from the state entering the block."""
  walk = _Walk(pl.program_id(2) // nv, n_chunks, size, chunk, reverse, diag, column_scan)

  def step(n, state):
    idx, rows = walk.rows(n)
    states_ref[idx] = state
    return chunk_math.state_update(k_ref[rows, :], v_ref[rows, :], walk.gates(g_ref, rows),
                                   state, reverse=reverse, ops=OPS)

  walk.forward(step, s_in_ref[...])


def _states_pass_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, s_in_ref, *refs, chunk, n_chunks,
                        size, nv, scale, reverse, diag, column_scan, half=None):
  """`_chunk_states_kernel` and `_bwd_states_kernel` as one walk in scan order: the state
  entering every chunk, and the block's queries' share of the gradient of the state entering
  the block (summed forward, chunk_math.states_pass_update; refs: states_ref, w_ref). Both
  walks are short serial chains at these sizes; one stream of both costs less than two.

  half (one block of all n_chunks only): the backward runs it as blocks of `half` chunks.
  The kernel then also joins them (refs: dht_ref [K, V] in; states_ref; out the gradient of
  the state leaving each such block [K, NB, V] and the gate's carry at its end [NB, K]):
  walked in reverse from dht, dS_leave[j - 1] = decay_j dS_leave[j] + share_j, and the carry
  is sum_V(S_leave[j] * dS_leave[j]). Joined here, the backward needs no XLA passes over the
  shares, decays and leaving states between this kernel and `gla_bwd`."""
  kd, vd = k_ref.shape[-1], do_ref.shape[-1]
  if half is None:
    states_ref, w_ref = refs
  else:
    dht_ref, states_ref, ds_out_ref, dgc_ref = refs

  def step(n, carry):
    idx, rows = walk.rows(n)
    states_ref[idx] = carry[0]
    return chunk_math.states_pass_update(
        q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], walk.gates(g_ref, rows),
        do_ref[rows, :], *carry, scale=scale, reverse=reverse, ops=OPS)

  def fresh(state):  # (state, share, decay before the chunk) at a block's start
    return state, jnp.zeros((kd, vd), jnp.float32), jnp.ones((kd, 1), jnp.float32)

  if half is None:
    walk = _Walk(pl.program_id(2) // nv, n_chunks, size, chunk, reverse, diag, column_scan)
    w_ref[...] = walk.forward(step, fresh(s_in_ref[...]))[1]
    return
  state, blocks = s_in_ref[...], []
  for j in range(-(-n_chunks // half)):  # static: a few blocks of one sequence
    walk = _Walk(j, n_chunks, half, chunk, reverse, diag, column_scan)
    state, share, decay = walk.forward(step, fresh(state))
    blocks.append((share, decay, state))
  ds = dht_ref[...]
  for j in reversed(range(len(blocks))):
    share, decay, s_leave = blocks[j]
    ds_out_ref[:, j, :] = ds
    dgc_ref[pl.ds(j, 1), :] = jnp.sum(s_leave * ds, axis=1)[None, :]
    ds = decay * ds + share


def _bwd_states_kernel(q_ref, g_ref, do_ref, w_ref, *, chunk, n_chunks, size, scale, reverse,
                       diag, column_scan):
  walk = _Walk(pl.program_id(2), n_chunks, size, chunk, reverse, diag, column_scan)

  def step(n, dstate):
    _, rows = walk.rows(n)
    return chunk_math.dstate_update(q_ref[rows, :], walk.gates(g_ref, rows), do_ref[rows, :],
                                    dstate, scale=scale, reverse=reverse, ops=OPS)

  w_ref[...] = walk.backward(step, jnp.zeros(w_ref.shape, jnp.float32))


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, states_ref, ds_ref, dgc_ref,
                dq_ref, dk_ref, dv_ref, dg_ref, ds_in_ref, *, chunk, n_chunks, size, scale,
                reverse, diag, column_scan, grad_cols=(0, 0, 0), gate_normalizer=None):
  """grad_cols: the first columns of dq, dk and dv in their refs (the packed gradient).
  gate_normalizer: see `backward`."""
  walk = _Walk(pl.program_id(2), n_chunks, size, chunk, reverse, diag, column_scan)
  kd, vd = q_ref.shape[-1], v_ref.shape[-1]
  dq_cols, dk_cols, dv_cols = (pl.ds(c, d) for c, d in zip(grad_cols, (kd, kd, vd)))

  def step(n, carry):
    dstate, dg_carry = carry
    idx, rows = walk.rows(n)
    g = walk.gates(g_ref, rows)
    dq, dk, dv, dg, dstate, dg_carry = chunk_math.backward(
        q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], g, do_ref[rows, :], states_ref[idx],
        dstate, dg_carry, scale=scale, reverse=reverse, ops=OPS, diag=diag)
    dq_ref[rows, dq_cols] = dq.astype(dq_ref.dtype)
    dk_ref[rows, dk_cols] = dk.astype(dk_ref.dtype)
    dv_ref[rows, dv_cols] = dv.astype(dv_ref.dtype)
    if gate_normalizer is not None:
      dg = preactivation_grad(g, dg, gate_normalizer)
    dg_ref[rows, :] = dg.astype(dg_ref.dtype)
    return dstate, dg_carry

  ds_in_ref[...], _ = walk.backward(step, (ds_ref[...], dgc_ref[...]))


def preactivation_grad(g, dg, normalizer):
  """dL/dz from dL/dg for g = log_sigmoid(z) / normalizer (float32): needs only g, since
  d/dz log_sigmoid(z) = 1 - sigmoid(z) = -expm1(log_sigmoid(z)). In the kernel g is the gate
  raised to the scheme's floor (-10): with DiG's normalizer 16 that changes nothing (16 g <=
  -160 either way, where expm1 is -1 in float32); with a smaller one, the gradient of a
  floored gate is taken at the floor, as its dg is."""
  return dg / normalizer * -jnp.expm1(g * normalizer)


def _seq_spec(t, d, nv=1):  # one (batch, head[, V tile]) slice of [B, T, H, D], all of T
  return pl.BlockSpec((None, t, None, d // nv), lambda b, h, j: (b, 0, h, j % nv))


def _dims(g, v, packed):
  """(B, T, H, K, V): from g [B, T, H, K] and v [B, T, H, V], or packed = (H, V)."""
  b, t, h, kd = g.shape
  return b, t, h, kd, (packed[1] if packed else v.shape[-1])


def _qkv_specs(t, kd, vd, packed, nv=1):
  """Block specs of q, k and v (v in `nv` V tiles): one (batch, head) slice each, all of T.
  Packed (packed = (H, V)), the three are one [B, T, W >= H * (2K + V)] array starting
  [q heads | k heads | v heads] and each spec picks its head's columns as a block index along
  the last axis (blocks of K for q and k, of V / nv for v), so the kernels read them in place."""
  if not packed:
    return _seq_spec(t, kd), _seq_spec(t, kd), _seq_spec(t, vd, nv)
  h = packed[0]

  def spec(first, width, tiles=1):  # head i's block: first + i, in blocks of width * tiles
    return pl.BlockSpec((None, t, width // tiles),
                        lambda b, i, j: (b, 0, (first + i) * tiles + j % tiles))
  # v starts at column 2 H K, a whole number of V-blocks (`packed_layout_ok`)
  return spec(0, kd), spec(h, kd), spec(2 * h * kd // vd, vd, nv)


def packed_layout_ok(heads, kd, vd):
  """Whether the packed layout's v columns start on a V boundary (2 H K a multiple of V)."""
  return (2 * heads * kd) % vd == 0


def _block_spec(d1, d2, nv=1):  # per-block [B, H, NB, d1, d2] arrays, one block each
  return pl.BlockSpec((None, None, None, d1, d2 // nv),
                      lambda b, h, j: (b, h, j // nv, 0, j % nv))


def _state_spec(kd, vd, nv=1):  # per-block states [B, H, K, NB, V], one block each
  return pl.BlockSpec((None, None, kd, None, vd // nv),
                      lambda b, h, j: (b, h, 0, j // nv, j % nv))


def _for_kernel(setting, name, default):
  """An int setting, or one given per kernel name as {name or "default": value}."""
  if isinstance(setting, dict):
    return setting.get(name, setting.get("default", default))
  return setting


def _tuning():
  """The settings the kernels read while traced (warps, stages, V tiles, register caps), as a
  hashable value. `_forward` and `_backward` take it as a static argument, so jit's cache
  tells settings apart: without it, a variant traced after the default at the same shapes
  silently reused the default's kernels (a bench or test setting these changed nothing)."""
  freeze = lambda x: tuple(sorted(x.items())) if isinstance(x, dict) else x
  return freeze(NUM_WARPS), freeze(NUM_STAGES), V_TILE_PROGRAMS, freeze(MAX_REGISTERS)


def _compiler_params(name):
  return pltriton.CompilerParams(num_warps=_for_kernel(NUM_WARPS, name, 4),
                                 num_stages=_for_kernel(NUM_STAGES, name, 1))


def v_tiles(programs, vd):
  """Split V so that few programs (batch x heads x blocks) still fill the GPU."""
  tiles = 1
  while programs * tiles < V_TILE_PROGRAMS and vd // (2 * tiles) >= 32:
    tiles *= 2
  return tiles


def _call(kernel, grid, in_specs, out_specs, out_shape, name, interpret, aliases=None):
  cap = _for_kernel(MAX_REGISTERS, name, None)
  if cap is not None:
    register_cap.install()
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, compiler_params=_compiler_params(name),
                        input_output_aliases=aliases or {}, interpret=interpret,
                        name=register_cap.capped_name(name, cap))


# Per-block states are kept as [B, H, K, NB, V] (blocks next to V): the carry across blocks
# (block_carry.py) reads a key row's [NB, V] blocks as one tile.


def _fwd_block_states(k, v, g, *, chunk, n_chunks, size, reverse, diag, column_scan, packed,
                      interpret):
  """Each block's own state contribution [B, H, K, NB, V] and log-decay [B, H, NB, 1, K]."""
  b, t, h, kd, vd = _dims(g, v, packed)
  nb = -(-n_chunks // size)
  f32 = jnp.float32
  _, k_spec, v_spec = _qkv_specs(t, kd, vd, packed)
  return _call(
      functools.partial(_fwd_states_kernel, chunk=chunk, n_chunks=n_chunks, size=size,
                        reverse=reverse, diag=diag, column_scan=column_scan), (b, h, nb),
      [k_spec, v_spec, _seq_spec(t, kd)],
      [_state_spec(kd, vd), _block_spec(1, kd)],
      [jax.ShapeDtypeStruct((b, h, kd, nb, vd), f32),
       jax.ShapeDtypeStruct((b, h, nb, 1, kd), f32)], "gla_fwd_states", interpret)(k, v, g)


def _bwd_block_states(q, g, do, *, chunk, n_chunks, size, scale, reverse, diag, column_scan,
                      packed, interpret):
  """Each block's queries' contribution to the gradient of the state entering it."""
  b, t, h, kd, vd = _dims(g, do, False)
  nb = -(-n_chunks // size)
  q_spec = _qkv_specs(t, kd, vd, packed)[0]
  return _call(
      functools.partial(_bwd_states_kernel, chunk=chunk, n_chunks=n_chunks, size=size,
                        scale=scale, reverse=reverse, diag=diag, column_scan=column_scan),
      (b, h, nb),
      [q_spec, _seq_spec(t, kd), _seq_spec(t, vd)],
      _state_spec(kd, vd), jax.ShapeDtypeStruct((b, h, kd, nb, vd), jnp.float32),
      "gla_bwd_states", interpret)(q, g, do)


def forward(q, k, v, g, h0, *, scale, reverse, chunk=None, diag=None, block_chunks=None,
            packed_vd=None, column_scan=None, interpret=False):
  """q, k, g [B, T, H, K]; v [B, T, H, V]; h0 [B, H, K, V] f32; T a multiple of `chunk`
  (default CHUNK); `diag`: chunk_math's scheme (default DIAG). `packed_vd` = V: q, k and v are
  all the one array [B, T, W] whose first H * (2K + V) columns are [q heads | k heads |
  v heads] (`packed_layout_ok`), read in place; later columns are not read.
  column_scan = (h, w): the T tokens are an h x w raster grid, scanned column by column
  (`column_scan_ok`; o comes back in the raster order of the inputs); `backward` must be given
  the same.

  Returns (o, final state, residuals for `backward`).
  """
  chunk, diag = chunk or CHUNK, diag or DIAG
  column_scan = _checked_column_scan(column_scan, g.shape[1], chunk)
  size, _ = _blocks(g.shape[1] // chunk, g.shape[0] * g.shape[2], block_chunks, chunk)
  return _forward(q, k, v, g, h0, scale=scale, reverse=reverse, chunk=chunk, size=size,
                  diag=diag, column_scan=column_scan, store=not RECOMPUTE_STATES,
                  packed=_packed(g, packed_vd), interpret=interpret, tuning=_tuning())


def _checked_column_scan(column_scan, t, chunk):
  if column_scan is None:
    return None
  column_scan = tuple(int(n) for n in column_scan)
  if not column_scan_ok(column_scan, t, chunk):
    raise ValueError(f"gla pallas_gpu: column_scan={column_scan} needs h * w = T = {t} and h a "
                     f"multiple of the chunk ({chunk})")
  return column_scan


def _packed(g, packed_vd):
  return None if packed_vd is None else (g.shape[2], packed_vd)


_STATIC = ("scale", "reverse", "chunk", "size", "diag", "column_scan", "store", "packed",
           "interpret", "tuning")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _forward(q, k, v, g, h0, *, scale, reverse, chunk, size, diag, column_scan, store, packed,
             interpret, tuning):
  del tuning  # a cache key only (`_tuning`): the kernels read the module settings
  b, t, h, kd, vd = _dims(g, v, packed)
  n_chunks = t // chunk
  nb = -(-n_chunks // size)
  common = dict(chunk=chunk, n_chunks=n_chunks, size=size, reverse=reverse, diag=diag,
                column_scan=column_scan)
  f32 = jnp.float32
  if nb == 1:
    s_in, lam = h0[:, :, :, None], jnp.zeros((b, h, 1, 1, kd), f32)
  else:
    u, lam = _fwd_block_states(k, v, g, **common, packed=packed, interpret=interpret)
    s_in = block_carry.states_entering(u, lam, h0, interpret=interpret)
  nv = v_tiles(b * h * nb, vd)
  out_specs = [_seq_spec(t, vd, nv), _state_spec(kd, vd, nv)]
  out_shape = [jax.ShapeDtypeStruct((b, t, h, vd), v.dtype),
               jax.ShapeDtypeStruct((b, h, kd, nb, vd), f32)]
  if store:
    out_specs.append(_chunk_states_spec(n_chunks, kd, vd, nv))
    out_shape.append(jax.ShapeDtypeStruct((b, h, n_chunks, kd, vd), f32))
  q_spec, k_spec, v_spec = _qkv_specs(t, kd, vd, packed, nv)
  o, s_out, *states = _call(
      functools.partial(_fwd_kernel, nv=nv, scale=scale, **common), (b, h, nb * nv),
      [q_spec, k_spec, v_spec, _seq_spec(t, kd), _state_spec(kd, vd, nv)], out_specs, out_shape,
      "gla_fwd", interpret,
  )(q, k, v, g, s_in)
  # The block size, chunk, scheme and state keeping travel in the residuals' shapes (an empty
  # [size, chunk, diag, 1 + store, 0] array), so the backward matches the forward whatever the
  # module settings are when it is traced. Without stored states the residual is the state
  # entering each block (1 / size of them).
  marker = jnp.zeros((size, chunk, diag, 1 + store, 0), jnp.int8)
  return o, s_out[:, :, :, -1], (states[0] if store else s_in, s_out, lam, marker)


def _chunk_states_spec(n_chunks, kd, vd, nv):  # [B, H, NC, K, V]: all chunks of a (b, h)
  return pl.BlockSpec((None, None, n_chunks, kd, vd // nv), lambda b, h, j: (b, h, 0, 0, j % nv))


def _chunk_states(k, v, g, s_in, *, chunk, n_chunks, size, reverse, diag, column_scan, packed,
                  interpret):
  """State entering every chunk [B, H, NC, K, V], recomputed from those entering each block."""
  b, t, h, kd, vd = _dims(g, v, packed)
  nb = -(-n_chunks // size)
  nv = v_tiles(b * h * nb, vd)
  _, k_spec, v_spec = _qkv_specs(t, kd, vd, packed, nv)
  return _call(
      functools.partial(_chunk_states_kernel, chunk=chunk, n_chunks=n_chunks, size=size, nv=nv,
                        reverse=reverse, diag=diag, column_scan=column_scan), (b, h, nb * nv),
      [k_spec, v_spec, _seq_spec(t, kd), _state_spec(kd, vd, nv)],
      _chunk_states_spec(n_chunks, kd, vd, nv),
      jax.ShapeDtypeStruct((b, h, n_chunks, kd, vd), jnp.float32), "gla_chunk_states",
      interpret)(k, v, g, s_in)


def _states_pass(q, k, v, g, do, s_in, *, chunk, n_chunks, size, scale, reverse, diag,
                 column_scan, packed, interpret, half=None, dht=None):
  """(state entering every chunk [B, H, NC, K, V], each block's queries' share of the
  gradient of the state entering it [B, H, K, NB, V]) in one kernel, `gla_states_pass`.
  half (one forward block; dht [B, H, K, V] given): the backward's blocks of `half` chunks,
  joined in the kernel: (states, the gradient of the state leaving each such block
  [B, H, K, NB, V], the gate's gradient carry at each one's end [B, H, NB, 1, K])."""
  b, t, h, kd, vd = _dims(g, v, packed)
  nb = -(-n_chunks // size)
  # Whole V when joining halves (the carry sums over V); halves only run with more sequences
  # than backward slots, where there would be no V tiles anyway.
  nv = 1 if half is not None else v_tiles(b * h * nb, vd)
  q_spec, k_spec, v_spec = _qkv_specs(t, kd, vd, packed, nv)
  f32 = jnp.float32
  out_specs = [_chunk_states_spec(n_chunks, kd, vd, nv), _state_spec(kd, vd, nv)]
  out_shape = [jax.ShapeDtypeStruct((b, h, n_chunks, kd, vd), f32),
               jax.ShapeDtypeStruct((b, h, kd, nb, vd), f32)]
  in_specs = [q_spec, k_spec, v_spec, _seq_spec(t, kd), _seq_spec(t, vd, nv),
              _state_spec(kd, vd, nv)]
  inputs = [q, k, v, g, do, s_in]
  if half is not None:
    nbb = -(-n_chunks // half)
    out_specs = [out_specs[0],
                 pl.BlockSpec((None, None, kd, nbb, vd), lambda b, h, j: (b, h, 0, 0, 0)),
                 pl.BlockSpec((None, None, nbb, None, kd), lambda b, h, j: (b, h, 0, 0, 0))]
    out_shape = [out_shape[0], jax.ShapeDtypeStruct((b, h, kd, nbb, vd), f32),
                 jax.ShapeDtypeStruct((b, h, nbb, 1, kd), f32)]
    in_specs.append(pl.BlockSpec((None, None, kd, vd), lambda b, h, j: (b, h, 0, 0)))
    inputs.append(dht)
  return _call(
      functools.partial(_states_pass_kernel, chunk=chunk, n_chunks=n_chunks, size=size, nv=nv,
                        scale=scale, reverse=reverse, diag=diag, column_scan=column_scan,
                        half=half),
      (b, h, nb * nv), in_specs, out_specs, out_shape, "gla_states_pass", interpret)(*inputs)


def backward(q, k, v, g, do, residuals, dht, dg0, *, scale, reverse, packed_vd=None,
             column_scan=None, into=None, gate_normalizer=None, interpret=False):
  """Returns (dq, dk, dv, dg, dh0); with `packed_vd` (as in `forward`): (dqkv, dg, dh0), dqkv
  [B, T, H * (2K + V)] in the packed layout, written by the kernel (no concatenation).
  into (packed only): a [B, T, W >= H * (2K + V)] array the kernel writes dq, dk and dv into
  (aliased, no copy; its other columns keep their values), returned as dqkv.
  gate_normalizer: where g = log_sigmoid(z) / gate_normalizer (DiG's forget gate), the
  gradient of z instead of dg, in q's dtype (`preactivation_grad`, as the gate's own backward
  would compute it from dg): the kernel writes it in place of dg, so no float32 dg is written
  and read back by a separate pass.
  column_scan: as given to `forward`.
  dg0 = sum_V(ht * dht) is recomputed per block from the residuals (it is the last block's
  carry) and not used."""
  del dg0
  if into is not None and packed_vd is None:
    raise ValueError("gla backward: `into` needs the packed layout (packed_vd)")
  *residuals, marker = residuals
  size, chunk, diag, stored, _ = marker.shape
  n_chunks = g.shape[1] // chunk
  half = None
  if stored == 1 and size >= n_chunks:  # one forward block: the backward may halve it
    half = min(BWD_BLOCK_CHUNKS or backward_block_chunks(n_chunks, g.shape[0] * g.shape[2]),
               n_chunks)
    half = None if half >= n_chunks else half
  return _backward(q, k, v, g, do, tuple(residuals), dht, into, scale=scale, reverse=reverse,
                   chunk=chunk, size=size, half=half, diag=diag,
                   column_scan=_checked_column_scan(column_scan, g.shape[1], chunk),
                   store=stored == 2,
                   packed=_packed(g, packed_vd), interpret=interpret,
                   tuning=_tuning(),
                   gate_normalizer=None if gate_normalizer is None else float(gate_normalizer))


def _packed_bwd_kernel(*refs, heads, kd, vd, into, **kw):
  """`_bwd_kernel` writing dq, dk and dv into their columns of one packed gradient (every
  program of a batch row shares that row's block; each writes only its head's columns).
  into: the last input is the aliased gradient buffer (written through the output ref)."""
  *ins, dqkv_ref, dg_ref, ds_in_ref = refs
  if into:
    ins = ins[:-1]
  i = pl.program_id(1)
  cols = (i * kd, (heads + i) * kd, 2 * heads * kd + i * vd)
  _bwd_kernel(*ins, dqkv_ref, dqkv_ref, dqkv_ref, dg_ref, ds_in_ref, grad_cols=cols, **kw)


@functools.partial(jax.jit, static_argnames=_STATIC + ("half", "gate_normalizer"))
def _backward(q, k, v, g, do, residuals, dht, into, *, scale, reverse, chunk, size, diag,
              column_scan, store, packed, interpret, tuning, half=None, gate_normalizer=None):
  """half: the backward's blocks when the forward's one block is split in its backward
  (`backward_block_chunks`); gate_normalizer: as in `backward`."""
  del tuning  # a cache key only (`_tuning`)
  states, s_out, lam = residuals  # states: entering each chunk if stored, else each block
  b, t, h, kd, vd = _dims(g, v, packed)
  n_chunks = t // chunk
  nb = -(-n_chunks // size)
  common = dict(chunk=chunk, n_chunks=n_chunks, size=size, scale=scale, reverse=reverse,
                diag=diag, column_scan=column_scan)
  f32 = jnp.float32
  qk, vs = _seq_spec(t, kd), _seq_spec(t, vd)
  w_local = None  # each block's queries' share of the gradient of the state entering it
  if half is not None:  # one forward block, walked backward as blocks of `half` chunks
    states, ds_out, dgc = _states_pass(q, k, v, g, do, states, **common, packed=packed,
                                       interpret=interpret, half=half, dht=dht)
    size, nb = half, -(-n_chunks // half)
    common["size"] = size
  elif not store and nb > 1:
    states, w_local = _states_pass(q, k, v, g, do, states, **common, packed=packed,
                                   interpret=interpret)
  elif not store:
    states = _chunk_states(k, v, g, states, chunk=chunk, n_chunks=n_chunks, size=size,
                           reverse=reverse, diag=diag, column_scan=column_scan, packed=packed,
                           interpret=interpret)
  # ds_out: the gradient of the state leaving each block; dgc: the gate's gradient carry at
  # each block's end, sum_V(s_out * ds_out), [B, H, NB, 1, K] (halves: both made above)
  if half is None and nb == 1:
    ds_out = dht[:, :, :, None]
    dgc = jnp.sum(s_out * ds_out, axis=-1).transpose(0, 1, 3, 2)[:, :, :, None, :]
  elif half is None:
    if w_local is None:
      w_local = _bwd_block_states(q, g, do, **common, packed=packed, interpret=interpret)
    ds_out, dgc = block_carry.dstates_leaving(w_local, lam, dht, s_out, interpret=interpret)
  if packed:
    kernel = functools.partial(_packed_bwd_kernel, heads=h, kd=kd, vd=vd,
                               into=into is not None, gate_normalizer=gate_normalizer, **common)
    width = h * (2 * kd + vd) if into is None else into.shape[-1]
    grad_specs = [pl.BlockSpec((None, t, width), lambda b, i, j: (b, 0, 0))]
    grad_shapes = [jax.ShapeDtypeStruct((b, t, width), v.dtype if into is None else into.dtype)]
  else:
    kernel = functools.partial(_bwd_kernel, gate_normalizer=gate_normalizer, **common)
    grad_specs = [qk, qk, vs]
    grad_shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
  inputs = [q, k, v, g, do, states, ds_out, dgc]
  in_specs = [*_qkv_specs(t, kd, vd, packed), qk, vs,
              pl.BlockSpec((None, None, n_chunks, kd, vd), lambda b, h, j: (b, h, 0, 0, 0)),
              _state_spec(kd, vd), _block_spec(1, kd)]
  aliases = {}
  if into is not None:  # the last input, written in place as the packed gradient (output 0)
    inputs.append(into)
    in_specs.append(grad_specs[0])
    aliases = {len(inputs) - 1: 0}
  dg_dtype = f32 if gate_normalizer is None else q.dtype
  *grads, dg, ds_in = _call(
      kernel, (b, h, nb), in_specs, [*grad_specs, qk, _state_spec(kd, vd)],
      [*grad_shapes, jax.ShapeDtypeStruct(g.shape, dg_dtype),
       jax.ShapeDtypeStruct((b, h, kd, nb, vd), f32)], "gla_bwd", interpret, aliases,
  )(*inputs)
  return (*grads, dg, ds_in[:, :, :, 0])

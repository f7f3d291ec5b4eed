"""Pure-jnp Gated Linear Attention: the ground truth the kernels are tested against.

Per (batch, head), with state S_t of shape [K, V]:
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,      o_t = scale * q_t S_t.

`recurrent_gla` runs that recurrence token by token (slow, obviously right).
`chunked_gla` is the chunkwise-parallel form: matmuls inside chunks of CHUNK tokens and a
recurrence across chunks. Inside a chunk every exponent of the cumulative log-gates is taken
relative to a point between the query and key positions, so every factor is <= 1 and strong
gates (log-decay of -7 per step and below) never overflow, whatever the precision.

Both compute in float32 and return `o` in v's dtype and the final state in float32.
Layout: q, k, g [B, T, H, K]; v [B, T, H, V]; states [B, H, K, V].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

CHUNK = 64       # tokens per chunk (matmul granularity)
SUB_CHUNK = 8    # tokens per sub-chunk (granularity of the elementwise log-space diagonal)
_HI = jax.lax.Precision.HIGHEST


def _to_heads_first(x):
  return jnp.swapaxes(x, 1, 2).astype(jnp.float32)  # [B, T, H, D] -> [B, H, T, D]


def _init_state(initial_state, q, v):
  b, _, h, kd = q.shape
  if initial_state is None:
    return jnp.zeros((b, h, kd, v.shape[-1]), jnp.float32)
  return initial_state.astype(jnp.float32)


def recurrent_gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
                  reverse=False):
  """Token-by-token GLA (lax.scan over tokens). Returns (o, final_state or None)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  qh, kh, vh, gh = (_to_heads_first(x) for x in (q, k, v, g))
  s0 = _init_state(initial_state, q, v)

  def step(s, xs):
    q_t, k_t, v_t, g_t = xs  # [B, H, K] / [B, H, V]
    s = jnp.exp(g_t)[..., None] * s + k_t[..., :, None] * v_t[..., None, :]
    o_t = jnp.einsum("bhk,bhkv->bhv", q_t * scale, s, precision=_HI)
    return s, o_t

  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (qh, kh, vh, gh))  # time-major
  s_final, o = jax.lax.scan(step, s0, xs, reverse=reverse)
  o = jnp.moveaxis(o, 0, 1).astype(v.dtype)  # [T, B, H, V] -> [B, T, H, V]
  return o, (s_final if output_final_state else None)


def _intra_chunk_scores(q, k, cum_g):
  """Causal gated scores A[i, j] = sum_c q_ic k_jc exp(G_ic - G_jc), j <= i, per chunk.

  q, k, cum_g: [..., C, K] (cum_g = inclusive cumulative log-gate within the chunk).
  Between sub-chunks I > J the decay splits into three factors, each <= 1: from the first row of
  I to the query, from the key to the last row of J, and the bridge from the end of J to the start
  of I; so the block is one matmul. Diagonal sub-chunk blocks are computed elementwise in log space.
  """
  *lead, c, kd = q.shape
  n_sub, s = c // SUB_CHUNK, SUB_CHUNK
  qs, ks, gs = (x.reshape(*lead, n_sub, s, kd) for x in (q, k, cum_g))
  first, last = gs[..., :1, :], gs[..., -1:, :]                          # [..., NS, 1, K]
  q_from_first = qs * jnp.exp(gs - first)
  k_to_last = ks * jnp.exp(last - gs)
  # exp(first_I - last_J) <= 1 for J < I; the clamp only touches blocks that are masked out.
  bridge = jnp.exp(jnp.minimum(first[..., :, None, 0, :] - last[..., None, :, 0, :], 0.0))
  off = jnp.einsum("...ixk,...ijk,...jyk->...ixjy", q_from_first, bridge, k_to_last,
                   precision=_HI)                                        # [..., NS, s, NS, s]
  sub = jnp.arange(n_sub)
  off = jnp.where((sub[None, :] < sub[:, None])[:, None, :, None], off, 0.0)

  causal = jnp.arange(s)[:, None] >= jnp.arange(s)[None, :]
  log_decay = jnp.where(causal[..., None], gs[..., :, None, :] - gs[..., None, :, :], -jnp.inf)
  diag = jnp.einsum("...nik,...njk,...nijk->...nij", qs, ks, jnp.exp(log_decay), precision=_HI)
  diag = jnp.einsum("...nij,nm->...nimj", diag, jnp.eye(n_sub, dtype=diag.dtype))
  return (off + diag).reshape(*lead, c, c)


def chunked_gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
                reverse=False):
  """Chunkwise-parallel GLA in plain jnp. Same arguments and results as `recurrent_gla`."""
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  scale = kd ** -0.5 if scale is None else scale
  qh, kh, vh, gh = (_to_heads_first(x) for x in (q, k, v, g))
  if reverse:  # the reference may flip; the kernels scan backwards by index mapping instead
    qh, kh, vh, gh = (jnp.flip(x, axis=2) for x in (qh, kh, vh, gh))
  pad = -t % CHUNK
  if pad:  # zero keys and zero log-gates after the end change neither outputs nor the state
    qh, kh, vh, gh = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (qh, kh, vh, gh))
  n = (t + pad) // CHUNK
  qc, kc, gc = (x.reshape(b, h, n, CHUNK, kd) for x in (qh, kh, gh))
  vc = vh.reshape(b, h, n, CHUNK, vd)

  cum_g = jnp.cumsum(gc, axis=3)                       # G, inclusive, <= 0
  last = cum_g[..., -1:, :]                            # gamma: total log-decay of each chunk
  k_to_end = kc * jnp.exp(last - cum_g)                # factors <= 1
  chunk_update = jnp.einsum("bhnck,bhncv->bhnkv", k_to_end, vc, precision=_HI)
  chunk_decay = jnp.exp(last[..., 0, :])               # [B, H, N, K]

  def carry_state(s, xs):
    decay, update = xs
    return decay[..., None] * s + update, s            # emit the state entering the chunk

  s0 = _init_state(initial_state, q, v)
  s_final, s_in = jax.lax.scan(
      carry_state, s0, (jnp.moveaxis(chunk_decay, 2, 0), jnp.moveaxis(chunk_update, 2, 0)))
  s_in = jnp.moveaxis(s_in, 0, 2)                      # [B, H, N, K, V]

  o_inter = jnp.einsum("bhnck,bhnkv->bhncv", qc * jnp.exp(cum_g), s_in, precision=_HI)
  scores = _intra_chunk_scores(qc, kc, cum_g)
  o_intra = jnp.einsum("bhnij,bhnjv->bhniv", scores, vc, precision=_HI)
  o = (scale * (o_inter + o_intra)).reshape(b, h, n * CHUNK, vd)[:, :, :t]
  if reverse:
    o = jnp.flip(o, axis=2)
  o = jnp.swapaxes(o, 1, 2).astype(v.dtype)
  return o, (s_final if output_final_state else None)

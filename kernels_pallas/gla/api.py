"""`chunk_gla`: the one entry point the model calls; checks inputs, picks a backend, and
wraps the Pallas kernels in a custom_vjp (the backward kernel needs the per-chunk states the
forward kernel saves; Pallas calls have no autodiff of their own)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas import batch_sharding
from kernels_pallas.gla import pallas_gpu, pallas_tpu, reference
from kernels_pallas.platform import platform_of

BACKENDS = ("auto", "reference", "pallas_gpu", "pallas_tpu")
_INPUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _check_inputs(q, k, v, g, initial_state):
  for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
    if x.ndim != 4:
      raise ValueError(f"chunk_gla: {name} must have rank 4 [B, T, H, D], got shape {x.shape}")
  if k.shape != q.shape or g.shape != q.shape:
    raise ValueError(f"chunk_gla: q, k and g must have the same shape [B, T, H, K], got "
                     f"q {q.shape}, k {k.shape}, g {g.shape}")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"chunk_gla: v must be [B, T, H, V] with B, T, H of q {q.shape[:3]}, "
                     f"got {v.shape}")
  if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _INPUT_DTYPES:
    raise ValueError(f"chunk_gla: q, k, v must share one dtype of float32/bfloat16/float16, got "
                     f"{q.dtype}, {k.dtype}, {v.dtype}")
  if g.dtype != jnp.float32:
    raise ValueError(f"chunk_gla: g (log-decay) must be float32, got {g.dtype}")
  if initial_state is not None:
    b, _, h, kd = q.shape
    want = (b, h, kd, v.shape[-1])
    if initial_state.shape != want:
      raise ValueError(f"chunk_gla: initial_state must have shape [B, H, K, V] = {want}, "
                       f"got {initial_state.shape}")


_KERNEL_DIMS = (16, 256)  # head dims (K and V) the Pallas kernels accept


def _check_kernel_limits(q, v, backend):
  for name, d in (("K", q.shape[-1]), ("V", v.shape[-1])):
    if not _KERNEL_DIMS[0] <= d <= _KERNEL_DIMS[1]:
      raise ValueError(f"chunk_gla: backend {backend!r} supports head dims {name} from "
                       f"{_KERNEL_DIMS[0]} to {_KERNEL_DIMS[1]}, got {name}={d}; "
                       f"use backend='reference'")


def resolve_backend(backend: str, x) -> str:
  """Maps "auto" to the backend for the platform of `x`; validates explicit choices.

  GPU rule, by measurement (BENCHMARKS.md, one H100): "auto" is pallas_gpu, which beat the jnp
  reference at all four anchor shapes (4.0x to 7.7x fwd+bwd). pallas_gpu picks its own sequence
  split (`pallas_gpu.block_chunks_for`: 256 tokens per block, so one block and no state passes
  when T <= 256, where one block measured fastest)."""
  if backend not in BACKENDS:
    raise ValueError(f"chunk_gla: unknown backend {backend!r}; expected one of {BACKENDS}")
  if backend != "auto":
    return backend
  return {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(
      platform_of(x), "reference")


def _next_pow2(n):
  return 1 << (n - 1).bit_length()


def _pad_axis(x, axis, size):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _pallas_gla(q, k, v, g, h0, scale, reverse, backend, interpret):
  o, ht, _ = _KERNELS[backend].forward(q, k, v, g, h0, scale=scale, reverse=reverse,
                                       interpret=interpret)
  return o, ht


def _pallas_gla_fwd(q, k, v, g, h0, scale, reverse, backend, interpret):
  o, ht, states = _KERNELS[backend].forward(q, k, v, g, h0, scale=scale, reverse=reverse,
                                            interpret=interpret)
  return (o, ht), (q, k, v, g, states, ht)


def _pallas_gla_bwd(scale, reverse, backend, interpret, residuals, cotangents):
  # The barrier ties the residuals to the cotangents, so nothing of the backward that needs only
  # residuals (the GPU kernel's recomputed chunk states) can be scheduled early, during the
  # forward: XLA did that, and every layer's states were then live at once (+0.6 GiB for
  # DiG-S/2 at 16k tokens, BENCHMARKS.md).
  residuals, cotangents = jax.lax.optimization_barrier((residuals, cotangents))
  q, k, v, g, states, ht = residuals
  do, dht = cotangents
  # The final state is exp(sum of all g) times everything, so dL/dht . ht reaches every g_t.
  dg0 = jnp.sum(ht * dht, axis=-1)[:, :, None, :]
  return _KERNELS[backend].backward(q, k, v, g, do.astype(v.dtype), states, dht, dg0,
                                    scale=scale, reverse=reverse, interpret=interpret)


_pallas_gla.defvjp(_pallas_gla_fwd, _pallas_gla_bwd)
_KERNELS = {"pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _packed_gpu_gla(qkv, g, h0, vd, scale, reverse, interpret):
  """The GPU kernels on packed q, k, v (`chunk_gla_packed`): the same three refs of one array."""
  return _packed_gpu_gla_fwd(qkv, g, h0, vd, scale, reverse, interpret)[0]


def _packed_gpu_gla_fwd(qkv, g, h0, vd, scale, reverse, interpret):
  o, ht, states = pallas_gpu.forward(qkv, qkv, qkv, g, h0, scale=scale, reverse=reverse,
                                     packed_vd=vd, interpret=interpret)
  return (o, ht), (qkv, g, states)


def _packed_gpu_gla_bwd(vd, scale, reverse, interpret, residuals, cotangents):
  # As in _pallas_gla_bwd: the barrier keeps the backward's work out of the forward.
  (qkv, g, states), (do, dht) = jax.lax.optimization_barrier((residuals, cotangents))
  dqkv, dg, dh0 = pallas_gpu.backward(qkv, qkv, qkv, g, do.astype(qkv.dtype), states, dht,
                                      None, scale=scale, reverse=reverse, packed_vd=vd,
                                      interpret=interpret)
  # Columns after the packed q, k, v are not read: zero gradient (a pad XLA fuses into the
  # consumer, e.g. the sum with the other columns' gradients).
  return _pad_axis(dqkv, 2, qkv.shape[-1]), dg, dh0


_packed_gpu_gla.defvjp(_packed_gpu_gla_fwd, _packed_gpu_gla_bwd)


def _run_pallas(q, k, v, g, initial_state, scale, reverse, backend, interpret):
  """Pads T to whole chunks (zero keys and log-gates change nothing) and, for the GPU
  (Triton needs power-of-two tiles), K and V to powers of two; then runs the kernels."""
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  kernels = _KERNELS[backend]
  tp = -(-t // kernels.CHUNK) * kernels.CHUNK
  kp, vp = (_next_pow2(kd), _next_pow2(vd)) if backend == "pallas_gpu" else (kd, vd)
  if initial_state is None:
    h0 = jnp.zeros((b, h, kp, vp), jnp.float32)
  else:
    h0 = _pad_axis(_pad_axis(initial_state.astype(jnp.float32), 2, kp), 3, vp)
  q, k, g = (_pad_axis(_pad_axis(x, 1, tp), 3, kp) for x in (q, k, g))
  v = _pad_axis(_pad_axis(v, 1, tp), 3, vp)
  o, ht = _pallas_gla(q, k, v, g, h0, scale, reverse, backend, interpret)
  return o[:, :t, :, :vd], ht[:, :, :kd, :vd]


def chunk_gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
              reverse=False, backend="auto", interpret=False):
  """Gated Linear Attention, chunkwise. See the module docstring of `reference` for the math.

  Args:
    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K] float32 log-decay (<= 0). The GPU
      kernel raises per-step log-decays below -10 to -10 (decay e^-10 = 4.5e-5 per token
      already erases the state; `chunk_math.gate_floor`); the reference and TPU kernel do not.
    scale: query scale, default K ** -0.5.
    initial_state: optional [B, H, K, V] state before the first token (first scanned token).
    output_final_state: also return the [B, H, K, V] float32 state after the last token.
    reverse: scan from the last token to the first.
    backend: "auto", "reference", "pallas_gpu" or "pallas_tpu".
    interpret: run a Pallas backend in interpret mode (CPU testing); True, or for the TPU
      kernel a `pltpu.InterpretParams`.
  Under a multi-device mesh set with `jax.set_mesh` (the trainer's), the Pallas kernels run on
  each device's share of the batch (split over every mesh axis) when B divides evenly.
  Returns:
    (o [B, T, H, V] in v's dtype, final_state or None).
  """
  _check_inputs(q, k, v, g, initial_state)
  chosen = resolve_backend(backend, q)
  if chosen == "reference":
    return reference.chunked_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                                 output_final_state=output_final_state, reverse=reverse)
  _check_kernel_limits(q, v, chosen)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  run = functools.partial(_run_pallas, scale=scale, reverse=reverse, backend=chosen,
                          interpret=interpret)
  mesh = batch_sharding.ambient_mesh(q.shape[0])
  if mesh is None:
    o, ht = run(q, k, v, g, initial_state)
  elif initial_state is None:
    o, ht = batch_sharding.batch_sharded(lambda *a: run(*a, None), mesh, (True,) * 4, 2)(
        q, k, v, g)
  else:
    o, ht = batch_sharding.batch_sharded(run, mesh, (True,) * 5, 2)(q, k, v, g, initial_state)
  return o, (ht if output_final_state else None)


def unpack_qkv(qkv, heads, kd, vd):
  """q, k [B, T, H, K] and v [B, T, H, V] sliced out of `chunk_gla_packed`'s layout."""
  b, t, _ = qkv.shape
  q, k, v = (qkv[..., a:e] for a, e in ((0, heads * kd), (heads * kd, 2 * heads * kd),
                                        (2 * heads * kd, heads * (2 * kd + vd))))
  return (q.reshape(b, t, heads, kd), k.reshape(b, t, heads, kd),
          v.reshape(b, t, heads, vd))


def _packed_kernel_takes(g, heads, kd, vd):
  """Whether the GPU kernels read this packed array in place: whole chunks, power-of-two head
  dims (Triton tiles; `_run_pallas` pads otherwise) and v starting on a V boundary."""
  pow2 = lambda d: d == _next_pow2(d) and _KERNEL_DIMS[0] <= d <= _KERNEL_DIMS[1]
  return (g.shape[1] % pallas_gpu.CHUNK == 0 and pow2(kd) and pow2(vd)
          and pallas_gpu.packed_layout_ok(heads, kd, vd))


def chunk_gla_packed(qkv, g, *, value_dim=None, scale=None, initial_state=None,
                     output_final_state=False, reverse=False, backend="auto", interpret=False):
  """`chunk_gla` with q, k and v packed in one array, as one projection matmul writes them.

  Args:
    qkv: [B, T, W]: its first H * (2K + V) columns are [q (H heads of K) | k (H heads of K) |
      v (H heads of V)]; later columns (other projections of the same matmul) are not read
      and get a zero gradient.
    g: [B, T, H, K] float32 log-decay; gives H and K.
    value_dim: V; default: W / H - 2K (no later columns).
    The other arguments are `chunk_gla`'s.
  The GPU kernels read q, k and v in place, so no copies of them are sliced out of the packed
  array; their gradient comes back in the same layout (padded with the zero columns, which XLA
  fuses into the sum with the later columns' gradients). They take whole chunks (T a multiple
  of `pallas_gpu.CHUNK`), power-of-two K and V, and 2 H K a multiple of V; other shapes and
  backends slice the array and run `chunk_gla` (same results).
  Returns:
    (o [B, T, H, V] in qkv's dtype, final_state or None).
  """
  if qkv.ndim != 3 or g.ndim != 4 or qkv.shape[:2] != g.shape[:2]:
    raise ValueError(f"chunk_gla_packed: qkv must be [B, T, W] and g [B, T, H, K] with the "
                     f"same B, T; got qkv {qkv.shape}, g {g.shape}")
  heads, kd = g.shape[2:]
  vd = qkv.shape[-1] // heads - 2 * kd if value_dim is None else value_dim
  if vd < 1 or heads * (2 * kd + vd) > qkv.shape[-1] or (
      value_dim is None and qkv.shape[-1] % heads):
    raise ValueError(f"chunk_gla_packed: qkv width {qkv.shape[-1]} cannot hold H * (2K + V) "
                     f"columns for H={heads}, K={kd} (from g) and V={value_dim or 'W / H - 2K'}")
  chosen = resolve_backend(backend, qkv)
  if chosen != "pallas_gpu" or not _packed_kernel_takes(g, heads, kd, vd):
    return chunk_gla(*unpack_qkv(qkv, heads, kd, vd), g, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, reverse=reverse, backend=chosen,
                     interpret=interpret)
  b, t = qkv.shape[:2]
  views = (jax.ShapeDtypeStruct((b, t, heads, d), qkv.dtype) for d in (kd, kd, vd))
  _check_inputs(*views, g, initial_state)
  scale = kd ** -0.5 if scale is None else float(scale)
  run = lambda qkv, g, h0: _packed_gpu_gla(qkv, g, h0, vd, scale, reverse, interpret)
  h0 = (jnp.zeros((b, heads, kd, vd), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  o, ht = batch_sharding.per_batch_shard(run, b, (True,) * 3, 2)(qkv, g, h0)
  return o, (ht if output_final_state else None)

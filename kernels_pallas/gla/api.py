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

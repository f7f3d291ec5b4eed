"""`chunk_gla`: the one entry point the model calls; checks inputs and picks a backend."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.gla import reference

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


def _platform(x) -> str:
  try:
    return next(iter(x.devices())).platform
  except Exception:  # a tracer under jit: use the default backend
    return jax.default_backend()


def resolve_backend(backend: str, x) -> str:
  """Maps "auto" to the backend for the platform of `x`; validates explicit choices."""
  if backend not in BACKENDS:
    raise ValueError(f"chunk_gla: unknown backend {backend!r}; expected one of {BACKENDS}")
  if backend != "auto":
    return backend
  # The Pallas kernels are a separate piece of work; until they land, every platform uses the
  # pure-jnp chunked form.
  del x
  return "reference"


def chunk_gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
              reverse=False, backend="auto", interpret=False):
  """Gated Linear Attention, chunkwise. See the module docstring of `reference` for the math.

  Args:
    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K] float32 log-decay (<= 0).
    scale: query scale, default K ** -0.5.
    initial_state: optional [B, H, K, V] state before the first token (first scanned token).
    output_final_state: also return the [B, H, K, V] float32 state after the last token.
    reverse: scan from the last token to the first.
    backend: "auto", "reference", "pallas_gpu" or "pallas_tpu".
    interpret: run a Pallas backend in interpret mode (CPU testing).
  Returns:
    (o [B, T, H, V] in v's dtype, final_state or None).
  """
  _check_inputs(q, k, v, g, initial_state)
  chosen = resolve_backend(backend, q)
  kwargs = dict(scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, reverse=reverse)
  if chosen == "reference":
    return reference.chunked_gla(q, k, v, g, **kwargs)
  raise NotImplementedError(f"chunk_gla: backend {chosen!r} is not available yet; "
                            f"use backend='reference'")

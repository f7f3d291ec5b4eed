"""`layer_norm_modulate`: adaLN's LayerNorm (no affine parameters) and per-example shift and
scale, checked and dispatched: one-pass Pallas kernels on GPUs, the jnp form elsewhere."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas import batch_sharding
from kernels_pallas.adaln import pallas_gpu, reference
from kernels_pallas.platform import platform_of

BACKENDS = ("auto", "reference", "pallas_gpu")


def resolve_backend(backend: str, x) -> str:
  """"auto": pallas_gpu on GPUs when the shape suits its blocks (`pallas_gpu.supports`), else
  the jnp reference (which XLA fuses well enough on CPU and TPU)."""
  if backend not in BACKENDS:
    raise ValueError(f"layer_norm_modulate: unknown backend {backend!r}; expected one of "
                     f"{BACKENDS}")
  if backend != "auto":
    return backend
  t, d = x.size // (x.shape[0] * x.shape[-1]), x.shape[-1]
  on_gpu = platform_of(x) in ("gpu", "cuda")
  return "pallas_gpu" if on_gpu and pallas_gpu.supports(t, d) else "reference"


def layer_norm_modulate(x, shift, scale, *, eps: float = 1e-6, backend: str = "auto",
                        interpret: bool = False):
  """LayerNorm(x) * (1 + scale) + shift: x [N, ..., D], shift and scale [N, D].

  The norm's statistics are float32; the result has the promoted dtype of x, shift and scale,
  as the jnp form's. Under a multi-device mesh set with `jax.set_mesh` (the trainer's), the
  Pallas kernels run on each device's share of the batch when N divides evenly."""
  if x.ndim < 2 or shift.shape != (x.shape[0], x.shape[-1]) or scale.shape != shift.shape:
    raise ValueError(f"layer_norm_modulate: x must be [N, ..., D] and shift, scale [N, D]; got "
                     f"x {x.shape}, shift {shift.shape}, scale {scale.shape}")
  backend = resolve_backend(backend, x)
  if backend == "reference":
    return reference.layer_norm_modulate(x, shift, scale, eps)
  n, d = x.shape[0], x.shape[-1]
  t = x.size // (n * d)
  if not pallas_gpu.supports(t, d):
    raise ValueError(f"layer_norm_modulate: pallas_gpu needs D >= 16 and {pallas_gpu.MIN_ROWS} "
                     f"rows per block (tokens per example with a power-of-two factor >= "
                     f"{pallas_gpu.MIN_ROWS}); got {t} tokens of D = {d}; use "
                     f"backend='reference'")
  y = _pallas(x.reshape(n, t, d), shift, scale, eps, interpret)
  return y.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _pallas(x, shift, scale, eps, interpret):
  out_dtype = jnp.result_type(x.dtype, shift.dtype, scale.dtype)
  run = lambda x, shift, scale: (pallas_gpu.forward(x, shift, scale, eps=eps,
                                                    out_dtype=out_dtype, interpret=interpret),)
  return _per_shard(run, x, (True, True, True), 1)(x, shift, scale)[0]


def _fwd(x, shift, scale, eps, interpret):
  return _pallas(x, shift, scale, eps, interpret), (x, shift, scale)  # shift: [N, D], for its dtype


def _bwd(eps, interpret, residuals, dy):
  x, shift, scale = residuals
  run = lambda x, scale, dy: pallas_gpu.backward(x, scale, dy, eps=eps, interpret=interpret)
  dx, dshift, dscale = _per_shard(run, x, (True, True, True), 3)(x, scale, dy)
  return dx, dshift.astype(shift.dtype), dscale.astype(scale.dtype)


def _per_shard(run, x, batched, n_out):
  """`run` itself, or per batch shard under the trainer's mesh (every output is per example)."""
  mesh = batch_sharding.ambient_mesh(x.shape[0])
  return run if mesh is None else batch_sharding.batch_sharded(run, mesh, batched, n_out)


_pallas.defvjp(_fwd, _bwd)

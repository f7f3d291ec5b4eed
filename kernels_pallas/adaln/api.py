"""`layer_norm_modulate`: adaLN's LayerNorm (no affine parameters) and per-example shift and
scale; `layer_norm_modulate_with_input`: the same returning its input too, for an input that
also feeds a residual path; `residual_layer_norm_modulate`: the same after a gated residual add.
Checked and dispatched: one-pass Pallas kernels on GPUs, the jnp form elsewhere."""
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
  n, t, d = _check_blocks("layer_norm_modulate", x)
  y = _pallas(x.reshape(n, t, d), shift, scale, eps, interpret)
  return y.reshape(x.shape)


def layer_norm_modulate_with_input(x, shift, scale, *, eps: float = 1e-6,
                                   backend: str = "auto", interpret: bool = False):
  """(x, layer_norm_modulate(x, shift, scale)): a block's first norm, whose input x also goes
  on along the residual path. Used through the returned x, x's gradient from that path comes
  back to this function's backward, and on GPUs the norm's backward kernel adds it to the
  norm's own (no XLA pass summing the two)."""
  if resolve_backend(backend, x) == "pallas_gpu":
    return _with_input_pallas(x, shift, scale, eps, interpret)
  return x, layer_norm_modulate(x, shift, scale, eps=eps, backend=backend, interpret=interpret)


def residual_layer_norm_modulate(x, gate, branch, shift, scale, *, eps: float = 1e-6,
                                 backend: str = "auto", interpret: bool = False):
  """(h, layer_norm_modulate(h, shift, scale)) with h = x + gate * branch: x and branch [N, ...,
  D], gate, shift and scale [N, D] (a DiT or DiG block's first gated residual add and the norm
  after it). h has the promoted dtype of x, gate and branch, as the jnp form's; on GPUs the add
  runs inside the norm's kernels, and its gradients inside the norm's backward."""
  if branch.shape != x.shape or gate.shape != (x.shape[0], x.shape[-1]):
    raise ValueError(f"residual_layer_norm_modulate: branch must be shaped like x {x.shape} and "
                     f"gate [{x.shape[0]}, {x.shape[-1]}]; got {branch.shape} and {gate.shape}")
  if shift.shape != gate.shape or scale.shape != gate.shape:
    raise ValueError(f"residual_layer_norm_modulate: shift and scale must be [{x.shape[0]}, "
                     f"{x.shape[-1]}]; got {shift.shape} and {scale.shape}")
  backend = resolve_backend(backend, x)
  if backend == "reference":
    return reference.residual_layer_norm_modulate(x, gate, branch, shift, scale, eps)
  n, t, d = _check_blocks("residual_layer_norm_modulate", x)
  dtype = jnp.result_type(x, gate, branch)
  h, y = _residual_pallas(x.reshape(n, t, d).astype(dtype), gate.astype(dtype),
                          branch.reshape(n, t, d).astype(dtype), shift, scale, eps, interpret)
  return h.reshape(x.shape), y.reshape(x.shape)


def _check_blocks(name, x):
  """(N, T, D) of x, after checking that pallas_gpu's blocks suit them."""
  n, d = x.shape[0], x.shape[-1]
  t = x.size // (n * d)
  if not pallas_gpu.supports(t, d):
    raise ValueError(f"{name}: pallas_gpu needs D >= 16 and {pallas_gpu.MIN_ROWS} "
                     f"rows per block (tokens per example with a power-of-two factor >= "
                     f"{pallas_gpu.MIN_ROWS}); got {t} tokens of D = {d}; use "
                     f"backend='reference'")
  return n, t, d


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _pallas(x, shift, scale, eps, interpret):
  out_dtype = jnp.result_type(x.dtype, shift.dtype, scale.dtype)
  run = lambda x, shift, scale: (pallas_gpu.forward(x, shift, scale, eps=eps,
                                                    out_dtype=out_dtype, interpret=interpret),)
  return _per_shard(run, x, 3, 1)(x, shift, scale)[0]


def _fwd(x, shift, scale, eps, interpret):
  return _pallas(x, shift, scale, eps, interpret), (x, shift, scale)  # shift: [N, D], for its dtype


def _bwd(eps, interpret, residuals, dy):
  x, shift, scale = residuals
  run = lambda x, scale, dy: pallas_gpu.backward(x, scale, dy, eps=eps, interpret=interpret)
  dx, dshift, dscale = _per_shard(run, x, 3, 3)(x, scale, dy)
  return dx, dshift.astype(shift.dtype), dscale.astype(scale.dtype)


def _per_shard(run, x, n_in, n_out):
  """`run` per batch shard of x under the trainer's mesh; every input and output is per example."""
  return batch_sharding.per_batch_shard(run, x.shape[0], (True,) * n_in, n_out)


_pallas.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _with_input_pallas(x, shift, scale, eps, interpret):
  return x, layer_norm_modulate(x, shift, scale, eps=eps, backend="pallas_gpu",
                                interpret=interpret)


def _with_input_fwd(x, shift, scale, eps, interpret):
  return _with_input_pallas(x, shift, scale, eps, interpret), (x, shift, scale)


def _with_input_bwd(eps, interpret, residuals, cotangents):
  x, shift, scale = residuals
  dpass, dy = cotangents  # dpass: x's gradient from its other uses
  n, t, d = _check_blocks("layer_norm_modulate_with_input", x)
  run = lambda x, scale, dy, dpass: pallas_gpu.backward(x, scale, dy, eps=eps, dpass=dpass,
                                                        interpret=interpret)
  dx, dshift, dscale = _per_shard(run, x, 4, 3)(
      x.reshape(n, t, d), scale, dy.reshape(n, t, d), dpass.reshape(n, t, d).astype(x.dtype))
  return dx.reshape(x.shape), dshift.astype(shift.dtype), dscale.astype(scale.dtype)


_with_input_pallas.defvjp(_with_input_fwd, _with_input_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _residual_pallas(x, gate, branch, shift, scale, eps, interpret):
  out_dtype = jnp.result_type(x.dtype, shift.dtype, scale.dtype)
  run = lambda *args: tuple(pallas_gpu.residual_forward(*args, eps=eps, out_dtype=out_dtype,
                                                        interpret=interpret))
  return tuple(_per_shard(run, x, 5, 2)(x, gate, branch, shift, scale))


def _residual_fwd(x, gate, branch, shift, scale, eps, interpret):
  h, y = _residual_pallas(x, gate, branch, shift, scale, eps, interpret)
  return (h, y), (h, gate, branch, shift, scale)


def _residual_bwd(eps, interpret, residuals, cotangents):
  h, gate, branch, shift, scale = residuals
  dh, dy = cotangents  # dh: what reaches h along the residual path
  run = lambda *args: pallas_gpu.residual_backward(*args, eps=eps, interpret=interpret)
  dx, dbranch, dgate, dshift, dscale = _per_shard(run, h, 6, 5)(
      h, gate, branch, scale, dy, dh)
  return (dx, dgate.astype(gate.dtype), dbranch, dshift.astype(shift.dtype),
          dscale.astype(scale.dtype))


_residual_pallas.defvjp(_residual_fwd, _residual_bwd)

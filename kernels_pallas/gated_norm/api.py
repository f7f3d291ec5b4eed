"""`gated_norm_linear`: GLA's output stage, (RMSNorm_per_head(o) * scale * swish(z)) @ kernel,
whose backward keeps only o and the projection output y the gate z is read from, and does the
elementwise work in one pass (the Pallas kernel on GPUs, the jnp form elsewhere)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas import batch_sharding
from kernels_pallas.gated_norm import pallas_gpu, reference
from kernels_pallas.platform import platform_of

BACKENDS = ("auto", "reference", "pallas_gpu")


def resolve_backend(backend: str, o, gate_offset: int) -> str:
  """"auto": pallas_gpu on GPUs when the shape suits its blocks (`pallas_gpu.supports`), else
  the jnp reference."""
  if backend not in BACKENDS:
    raise ValueError(f"gated_norm_linear: unknown backend {backend!r}; expected one of "
                     f"{BACKENDS}")
  if backend != "auto":
    return backend
  heads, vh = o.shape[-2:]
  fits = pallas_gpu.supports(o.size // (heads * vh), vh, gate_offset)
  return "pallas_gpu" if platform_of(o) in ("gpu", "cuda") and fits else "reference"


def gated_norm_linear(o, y, scale, kernel, *, gate_offset: int, eps: float = 1e-6,
                      backend: str = "auto", interpret: bool = False):
  """o [..., H, Vh] (the GLA output), y [..., W] holding the output gate z in columns
  gate_offset .. gate_offset + H * Vh, scale [Vh], kernel [H * Vh, D] -> [..., D] in o's dtype.

  The norm is computed in float32 and rounded to o's dtype before the gate, as the reference
  GLA layer does. Under a multi-device mesh set with `jax.set_mesh` (the trainer's), the Pallas
  kernel runs on each device's share of the batch (first axis) when it divides evenly."""
  heads, vh = o.shape[-2:]
  if y.shape[:-1] != o.shape[:-2] or not 0 <= gate_offset <= y.shape[-1] - heads * vh:
    raise ValueError(f"gated_norm_linear: y must be [..., W] with o's leading axes "
                     f"{o.shape[:-2]} and the gate's {heads * vh} columns from gate_offset "
                     f"{gate_offset} inside it, got y {y.shape}")
  if scale.shape != (vh,) or kernel.ndim != 2 or kernel.shape[0] != heads * vh:
    raise ValueError(f"gated_norm_linear: scale must be [{vh}] and kernel [{heads * vh}, D] for "
                     f"o {o.shape}, got {scale.shape} and {kernel.shape}")
  return _gated_norm_linear(o, y, scale, kernel, gate_offset, eps,
                            choose_backend(backend, o, gate_offset), interpret)


def choose_backend(backend: str, o, gate_offset: int) -> str:
  """The backend that runs: `resolve_backend`'s, or the reference when "auto" picked the kernel
  but each device's share of the rows (under the trainer's mesh) does not suit its blocks."""
  chosen = resolve_backend(backend, o, gate_offset)
  if chosen != "pallas_gpu":
    return chosen
  heads, vh = o.shape[-2:]
  mesh = batch_sharding.ambient_mesh(o.shape[0])
  rows = o.size // (heads * vh) // (mesh.size if mesh is not None else 1)
  if pallas_gpu.supports(rows, vh, gate_offset):
    return chosen
  if backend == "auto":
    return "reference"
  raise ValueError(
      f"gated_norm_linear: pallas_gpu needs a power-of-two head size >= 16 dividing "
      f"gate_offset and rows with a power-of-two factor >= {pallas_gpu.MIN_BLOCK_M}; got "
      f"head size {vh}, gate_offset {gate_offset}, rows {rows}; use backend='reference'")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _gated_norm_linear(o, y, scale, kernel, gate_offset, eps, backend, interpret):
  z = reference.gate_columns(y, gate_offset, kernel.shape[0])
  return jnp.dot(reference.gated_norm(o, z, scale, eps), kernel)


def _fwd(o, y, scale, kernel, gate_offset, eps, backend, interpret):
  out = _gated_norm_linear(o, y, scale, kernel, gate_offset, eps, backend, interpret)
  return out, (o, y, scale, kernel)


def _backward_pass(o, y, du, scale, gate_offset, eps, backend, interpret):
  if backend == "reference":
    z = reference.gate_columns(y, gate_offset, du.shape[-1])
    return reference.gated_norm_backward(o, z, du, scale, eps)
  run = functools.partial(pallas_gpu.gated_norm_backward, gate_offset=gate_offset, eps=eps,
                          interpret=interpret)
  mesh = batch_sharding.ambient_mesh(o.shape[0])
  if mesh is None:
    return run(o, y, du, scale)

  def per_shard(o, y, du, scale):  # dscale as a [1, Vh] row per shard, summed below
    do, dz, dscale, u = run(o, y, du, scale)
    return do, dz, dscale[None], u

  do, dz, dscale, u = batch_sharding.batch_sharded(per_shard, mesh, (True, True, True, False),
                                                   4)(o, y, du, scale)
  return do, dz, jnp.sum(dscale, axis=0), u


def _bwd(gate_offset, eps, backend, interpret, residuals, dout):
  o, y, scale, kernel = residuals
  if backend == "reference":
    # Ties o and y to the cotangent, so the jnp backward's gated output is not computed (or
    # merged with the forward's) before the backward and kept from the forward.
    o, y, dout = jax.lax.optimization_barrier((o, y, dout))
  du = jnp.dot(dout, kernel.T).astype(o.dtype)
  do, dz, dscale, u = _backward_pass(o, y, du, scale, gate_offset, eps, backend, interpret)
  rows = lambda x: x.reshape(-1, x.shape[-1])
  dkernel = jnp.dot(rows(u).T, rows(dout).astype(u.dtype))
  after = y.shape[-1] - gate_offset - dz.shape[-1]
  dy = jnp.pad(dz.astype(y.dtype), [(0, 0)] * (y.ndim - 1) + [(gate_offset, after)])
  return do, dy, dscale.astype(scale.dtype), dkernel.astype(kernel.dtype)


_gated_norm_linear.defvjp(_fwd, _bwd)

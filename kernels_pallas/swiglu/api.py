"""`swiglu_linear`: swish(a) * b followed by a matmul, whose backward recomputes nothing from
the forward but [a, b] and does the elementwise work in one pass (`swiglu_product_backward`:
the Pallas kernel on GPUs, the jnp form elsewhere)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas import batch_sharding
from kernels_pallas.platform import platform_of
from kernels_pallas.swiglu import pallas_gpu, reference

BACKENDS = ("auto", "reference", "pallas_gpu")


def _check(ab, dh=None):
  if ab.ndim < 2 or ab.shape[-1] % 2:
    raise ValueError(f"swiglu: [a, b] must have an even last axis (a and b side by side), got "
                     f"shape {ab.shape}")
  want = ab.shape[:-1] + (ab.shape[-1] // 2,)
  if dh is not None and dh.shape != want:
    raise ValueError(f"swiglu: dh must have shape {want} for [a, b] of shape {ab.shape}, got "
                     f"{dh.shape}")


def resolve_backend(backend: str, ab) -> str:
  """"auto": pallas_gpu on GPUs when the shape suits its blocks (`pallas_gpu.supports`), else
  the jnp reference."""
  if backend not in BACKENDS:
    raise ValueError(f"swiglu: unknown backend {backend!r}; expected one of {BACKENDS}")
  if backend != "auto":
    return backend
  inner = ab.shape[-1] // 2
  fits = pallas_gpu.supports(ab.size // ab.shape[-1], inner)
  return "pallas_gpu" if platform_of(ab) in ("gpu", "cuda") and fits else "reference"


def _choose(backend: str, ab) -> str:
  """The backend that runs: `resolve_backend`'s, or the reference when "auto" picked the kernel
  but each device's share of the rows (under the trainer's mesh) does not suit its blocks."""
  chosen = resolve_backend(backend, ab)
  if chosen != "pallas_gpu":
    return chosen
  m, inner = ab.size // ab.shape[-1], ab.shape[-1] // 2
  mesh = batch_sharding.ambient_mesh(ab.shape[0])
  rows = m // mesh.size if mesh is not None else m
  if pallas_gpu.supports(rows, inner):
    return chosen
  if backend == "auto":
    return "reference"
  raise ValueError(
      f"swiglu: pallas_gpu needs rows ({rows}) and inner ({inner}) with power-of-two factors "
      f">= {pallas_gpu.MIN_BLOCK}, got factors {pallas_gpu.blocks(rows, inner)}; use "
      f"backend='reference'")


def swiglu_product_backward(ab, dh, *, backend: str = "auto", interpret: bool = False):
  """(d ab, h) for h = swish(a) * b, ab = [a, b] [..., 2 * inner], dh = dL/dh [..., inner].

  Under a multi-device mesh set with `jax.set_mesh` (the trainer's), the Pallas kernel runs on
  each device's share of the batch (first axis) when it divides evenly."""
  _check(ab, dh)
  if _choose(backend, ab) == "reference":
    return reference.swiglu_product_backward(ab, dh)
  run = functools.partial(pallas_gpu.swiglu_product_backward, interpret=interpret)
  return batch_sharding.per_batch_shard(run, ab.shape[0], (True, True), 2)(ab, dh)


def swiglu_linear(ab, kernel, *, backend: str = "auto", interpret: bool = False):
  """(swish(a) * b) @ kernel for ab = [a, b] [..., 2 * inner] and kernel [inner, D], in ab's
  dtype (cast the kernel first for mixed precision). The backward keeps only ab: it computes
  dh = dout @ kernel.T, then the gradient of ab and the product itself in one elementwise pass
  (the product is needed for the kernel's gradient), instead of a recomputed forward and a
  separate gradient pass."""
  _check(ab)
  if kernel.ndim != 2 or kernel.shape[0] != ab.shape[-1] // 2:
    raise ValueError(f"swiglu_linear: kernel must be [{ab.shape[-1] // 2}, D] for [a, b] of "
                     f"shape {ab.shape}, got {kernel.shape}")
  return _swiglu_linear(ab, kernel, _choose(backend, ab), interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _swiglu_linear(ab, kernel, backend, interpret):
  return jnp.dot(reference.swiglu_product(ab), kernel)


def _swiglu_linear_fwd(ab, kernel, backend, interpret):
  return _swiglu_linear(ab, kernel, backend, interpret), (ab, kernel)


def _swiglu_linear_bwd(backend, interpret, residuals, dout):
  ab, kernel = residuals
  if backend == "reference":
    # Ties [a, b] to the cotangent, so the jnp backward's product is not computed (or merged
    # with the forward's) before the backward: XLA would then keep it from the forward,
    # +2.4 GiB temp memory at DiG-XL/2, 256 px, batch 64 (a GPU compile).
    ab, dout = jax.lax.optimization_barrier((ab, dout))
  dh = jnp.dot(dout, kernel.T).astype(ab.dtype)
  dab, h = swiglu_product_backward(ab, dh, backend=backend, interpret=interpret)
  rows = lambda x: x.reshape(-1, x.shape[-1])
  dkernel = jnp.dot(rows(h).T, rows(dout).astype(h.dtype))
  return dab, dkernel.astype(kernel.dtype)


_swiglu_linear.defvjp(_swiglu_linear_fwd, _swiglu_linear_bwd)

"""`gla_layer`: DiG's GLA token mixer from its packed input projection y to the output
projection, with one custom VJP on GPUs so that the gradient of y is written once.

y = x @ [Wq | Wk | Wv | Wz | Wr] holds, side by side, q, k and v (`chunk_gla_packed`'s layout),
the output gate z and the low-rank forget-gate input r. The layer computes
  g   = log_sigmoid(r @ Wg + bg) / normalizer     (float32 log-decay per key column)
  o   = chunk_gla_packed(y, g)
  out = gated_norm_linear(o, y)                   ((RMSNorm_head(o) * scale * swish(z)) @ Wo)

Why one VJP: with a VJP per piece, each gives its own cotangent of y (dq, dk, dv from the GLA
kernel; dz from the output stage; dr from the gate) and XLA adds the three, zero-padded, in one
more pass over [N, T, W] (330 us of a DiG-S/2 step at 256 px, batch 64; about 2.3 ms at XL/2:
BENCHMARKS.md). Here the output stage's backward kernel writes dz into its columns of an
[N, T, W] buffer, the GLA backward kernel writes dq, dk and dv into the same buffer (aliased),
and dr is written into its columns in place. Other backends and shapes run the same
composition with each piece's own VJP.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas import batch_sharding
from kernels_pallas.gated_norm import api as gated_norm_api
from kernels_pallas.gated_norm import pallas_gpu as gated_norm_gpu
from kernels_pallas.gated_norm import reference as gated_norm_ref
from kernels_pallas.gla import api as gla_api
from kernels_pallas.gla import pallas_gpu as gla_gpu
from kernels_pallas.tiling import largest_pow2_divisor

f32 = jnp.float32


class Layout(NamedTuple):
  """Column layout of y and the layer's constants (hashable: a static argument)."""
  heads: int
  key_dim: int      # per head
  value_dim: int    # per head
  normalizer: float  # forget gate: log_sigmoid(.) / normalizer
  reverse: bool
  eps: float
  column_scan: tuple[int, int] | None = None  # (h, w): the scan runs down the grid's columns

  @property
  def gate_offset(self):  # first column of z: after q, k, v
    return self.heads * (2 * self.key_dim + self.value_dim)

  @property
  def low_rank_offset(self):  # first column of r: after z
    return self.gate_offset + self.heads * self.value_dim


def gla_layer(y, gate_kernel, gate_bias, norm_scale, out_kernel, *, heads: int, key_dim: int,
              value_dim: int, gate_normalizer: float = 16.0, reverse: bool = False,
              eps: float = 1e-6, column_scan: tuple[int, int] | None = None,
              backend: str = "auto", output_backend: str = "auto", interpret: bool = False):
  """DiG's GLA layer after its input projection.

  Args:
    y: [N, T, W] with W = H (2K + V) + H V + R: q, k, v, the output gate z, the low-rank input r.
    gate_kernel [R, H K], gate_bias [H K]: the forget gate's up projection (computed in y's
      dtype, as a linear layer with y's compute dtype; the log-decay in float32).
    norm_scale [V]: the per-head RMSNorm's scale; out_kernel [H V, D]: the output projection
      (in y's dtype).
    column_scan: (h, w) with h * w = T: y's tokens are an h x w grid in raster order and GLA
      scans them column by column (DiG's transposed layers); the output is in y's raster
      order. The GPU path reads the tokens in that order in place (`reads_column_scan_in_place`);
      others transpose y and the output.
    backend: chunk_gla's; output_backend: gated_norm_linear's. With both on the GPU kernels
      (and shapes they take) the layer's one-VJP backward runs; otherwise the composition.
  Returns [N, T, D] in y's dtype.
  """
  if column_scan is not None:
    column_scan = tuple(int(n) for n in column_scan)
    if len(column_scan) != 2 or column_scan[0] * column_scan[1] != y.shape[1]:
      raise ValueError(f"gla_layer: column_scan must be (h, w) with h * w = T = {y.shape[1]}, "
                       f"got {column_scan}")
  layout = Layout(heads, key_dim, value_dim, float(gate_normalizer), bool(reverse), float(eps),
                  column_scan)
  rank = y.shape[-1] - layout.low_rank_offset
  if y.ndim != 3 or rank < 1:
    raise ValueError(f"gla_layer: y must be [N, T, W] with W > {layout.low_rank_offset} (q, k, "
                     f"v, output gate, then the low-rank gate input), got {y.shape}")
  if gate_kernel.shape != (rank, heads * key_dim) or gate_bias.shape != (heads * key_dim,):
    raise ValueError(f"gla_layer: gate kernel must be [{rank}, {heads * key_dim}] and bias "
                     f"[{heads * key_dim}], got {gate_kernel.shape} and {gate_bias.shape}")
  if _one_vjp_applies(y, layout, backend, output_backend):
    args = (y, gate_kernel, gate_bias, norm_scale, out_kernel)
    run = lambda *a: (_fused(*a, layout, interpret),)
    # the whole layer per batch shard; weight gradients summed by shard_map
    return batch_sharding.per_batch_shard(run, y.shape[0], (True,) + (False,) * 4, 1)(*args)[0]
  if column_scan is None:
    return _composed(y, gate_kernel, gate_bias, norm_scale, out_kernel, layout, backend,
                     output_backend, interpret)
  # Per-token pieces commute with the permutation: run the composition in scan order.
  out = _composed(transpose_grid(y, column_scan), gate_kernel, gate_bias, norm_scale,
                  out_kernel, layout._replace(column_scan=None), backend, output_backend,
                  interpret)
  return transpose_grid(out, column_scan[::-1])


def transpose_grid(x, grid):
  """[N, h * w, C] tokens of an (h, w) raster grid -> the (w, h) grid's raster order."""
  n, _, c = x.shape
  return x.reshape(n, *grid, c).transpose(0, 2, 1, 3).reshape(n, -1, c)


def reads_column_scan_in_place(y, *, heads: int, key_dim: int, value_dim: int,
                               column_scan: tuple[int, int], backend: str = "auto",
                               output_backend: str = "auto") -> bool:
  """Whether `gla_layer(y, ..., column_scan=column_scan)` reads the column scan in place (the
  GPU path, with whole chunks down each column) rather than transposing y and its output; a
  caller that can transpose a narrower array before the input projection should do so when
  this is False. y: an array or a ShapeDtypeStruct [N, T, W]."""
  layout = Layout(heads, key_dim, value_dim, 16.0, False, 1e-6, tuple(column_scan))
  return _one_vjp_applies(y, layout, backend, output_backend)


def _one_vjp_applies(y, layout, backend, output_backend):
  """Both pieces on the GPU kernels, with shapes they take (per batch shard under a mesh)."""
  if gla_api.resolve_backend(backend, y) != "pallas_gpu":
    return False
  n, t = y.shape[:2]
  if layout.column_scan is not None and not gla_gpu.column_scan_ok(layout.column_scan, t):
    return False
  o_like = jax.ShapeDtypeStruct((n, t, layout.heads, layout.value_dim), y.dtype)
  g_like = jax.ShapeDtypeStruct((n, t, layout.heads, layout.key_dim), f32)
  packed_ok = gla_api._packed_kernel_takes(g_like, layout.heads, layout.key_dim,
                                           layout.value_dim)
  if not packed_ok:
    return False
  try:
    return gated_norm_api.choose_backend(output_backend, o_like, layout.gate_offset) == "pallas_gpu"
  except ValueError:  # an explicit pallas_gpu that does not fit: the composition says so
    return False


def _low_rank_input(y, layout):
  return y[..., layout.low_rank_offset:]


def _gate_preactivation(y, gate_kernel, gate_bias, layout, r=None):
  """r @ Wg + bg from y's low-rank columns (r, if given, is them), in y's dtype (a linear layer
  with y's compute dtype), as float32 [N, T, H, K]. gate_kernel may already be in y's dtype."""
  r = _low_rank_input(y, layout) if r is None else r
  pre = jnp.dot(r, gate_kernel.astype(y.dtype)) + gate_bias.astype(y.dtype)
  return pre.astype(f32).reshape(*y.shape[:2], layout.heads, layout.key_dim)


def _composed(y, gate_kernel, gate_bias, norm_scale, out_kernel, layout, backend,
              output_backend, interpret):
  g = log_sigmoid_scaled(_gate_preactivation(y, gate_kernel, gate_bias, layout),
                         layout.normalizer)
  o, _ = gla_api.chunk_gla_packed(y, g, value_dim=layout.value_dim, reverse=layout.reverse,
                                  backend=backend, interpret=interpret)
  return gated_norm_api.gated_norm_linear(o, y, norm_scale, out_kernel.astype(o.dtype),
                                          gate_offset=layout.gate_offset, eps=layout.eps,
                                          backend=output_backend, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def log_sigmoid_scaled(z, normalizer: float):
  """log_sigmoid(z) / normalizer. Its backward needs only the output, which the GLA kernel
  keeps anyway (d/dz log_sigmoid(z) = 1 - sigmoid(z) = -expm1(log_sigmoid(z))), so z itself
  is not kept for the backward."""
  return jax.nn.log_sigmoid(z) / normalizer


def _log_sigmoid_scaled_fwd(z, normalizer):
  # The barrier keeps XLA from folding `out * normalizer` in the backward back into the
  # forward's log_sigmoid(z) and storing that as a second float32 array.
  out = jax.lax.optimization_barrier(log_sigmoid_scaled(z, normalizer))
  return out, out


def _log_sigmoid_scaled_bwd(normalizer, out, g):
  return (gla_gpu.preactivation_grad(out, g, normalizer),)  # the GPU kernel's formula too


log_sigmoid_scaled.defvjp(_log_sigmoid_scaled_fwd, _log_sigmoid_scaled_bwd)


def _gate_backward(r, gate_kernel_in, dpre):
  """(dr, d gate_kernel and d gate_bias in float32) from dpre = dL/d(r @ Wg + bg) [N, T, H, K]
  in r's dtype; gate_kernel_in: Wg in r's dtype, as the forward used it."""
  dpre = dpre.reshape(*r.shape[:2], -1)
  rows = lambda x: x.reshape(-1, x.shape[-1])
  dr = jnp.dot(dpre, gate_kernel_in.T)
  dkernel = rows_transpose_dot(rows(r), rows(dpre))
  dbias = jnp.sum(rows(dpre).astype(f32), axis=0)
  return dr, dkernel, dbias


ROW_BLOCK = 512


def rows_transpose_dot(a, b):
  """a.T @ b in float32 for a [M, I] and b [M, J] (a weight gradient summed over M rows).

  Where M is not a multiple of ROW_BLOCK, the rows go in blocks of M's largest power-of-two
  factor (at least 64) as one batched product, summed after. Why: XLA's GPU gemm for this
  narrow [I, J] output pads both operands' rows to a multiple of 512 first (two pad passes,
  75 us a DiG-S/2 step at one 1792 px image, 12,544 rows; BENCHMARKS.md)."""
  m = a.shape[0]
  block = largest_pow2_divisor(m, ROW_BLOCK)
  if block == ROW_BLOCK or block < 64:
    return jnp.dot(a.T, b, preferred_element_type=f32)
  blocks = lambda x: x.reshape(m // block, block, x.shape[1])
  return jnp.einsum("mci,mcj->mij", blocks(a), blocks(b), preferred_element_type=f32).sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _fused(y, gate_kernel, gate_bias, norm_scale, out_kernel, layout, interpret):
  return _fused_fwd(y, gate_kernel, gate_bias, norm_scale, out_kernel, layout, interpret)[0]


def _fused_fwd(y, gate_kernel, gate_bias, norm_scale, out_kernel, layout, interpret):
  n = y.shape[0]
  # The weights in y's dtype are kept for the backward (not converted again there: two small
  # launches a layer less; the parameters themselves are kept only for their dtypes), and so
  # is r (y's low-rank columns, a [N, T, R] copy the gate's matmul reads).
  wg, r = gate_kernel.astype(y.dtype), _low_rank_input(y, layout)
  g = log_sigmoid_scaled(_gate_preactivation(y, wg, gate_bias, layout, r), layout.normalizer)
  h0 = jnp.zeros((n, layout.heads, layout.key_dim, layout.value_dim), f32)
  o, _, states = gla_gpu.forward(y, y, y, g, h0, scale=layout.key_dim ** -0.5,
                                 reverse=layout.reverse, packed_vd=layout.value_dim,
                                 column_scan=layout.column_scan, interpret=interpret)
  z = gated_norm_ref.gate_columns(y, layout.gate_offset, layout.heads * layout.value_dim)
  w = out_kernel.astype(y.dtype)
  out = jnp.dot(gated_norm_ref.gated_norm(o, z, norm_scale, layout.eps), w)
  return out, (y, g, states, o, wg, w, r, norm_scale, gate_kernel, gate_bias, out_kernel)


def _fused_bwd(layout, interpret, residuals, dout):
  # The barrier ties the residuals to the cotangent, so no backward work that needs only
  # residuals (the GLA kernel's recomputed chunk states) is scheduled during the forward.
  residuals, dout = jax.lax.optimization_barrier((residuals, dout))
  y, g, states, o, wg, w, r, norm_scale, gate_kernel, gate_bias, out_kernel = residuals
  rows = lambda x: x.reshape(-1, x.shape[-1])
  du = jnp.dot(dout, w.T).astype(o.dtype)
  # dz lands in its columns of a [N, T, W] buffer ...
  do, dy, dscale, u = gated_norm_gpu.gated_norm_backward(
      o, y, du, norm_scale, gate_offset=layout.gate_offset, eps=layout.eps,
      dz_in_y_layout=True, interpret=interpret)
  dout_kernel = jnp.dot(rows(u).T, rows(dout).astype(u.dtype))
  # ... dq, dk, dv in theirs, by the GLA kernel writing into the same buffer ...
  n = y.shape[0]
  dht = jnp.zeros((n, layout.heads, layout.key_dim, layout.value_dim), f32)
  # The kernel also turns dg into the gradient of the gate's pre-activation (its
  # `gate_normalizer`), in y's dtype: one pass over the float32 dg and g less.
  dy, dpre, _ = gla_gpu.backward(y, y, y, g, do.astype(y.dtype), states, dht, None,
                                 scale=layout.key_dim ** -0.5, reverse=layout.reverse,
                                 packed_vd=layout.value_dim, column_scan=layout.column_scan,
                                 into=dy, gate_normalizer=layout.normalizer,
                                 interpret=interpret)
  # ... and dr in the last columns, in place.
  dr, dgate_kernel, dgate_bias = _gate_backward(r, wg, dpre)
  dy = jax.lax.dynamic_update_slice_in_dim(dy, dr.astype(dy.dtype), layout.low_rank_offset,
                                           axis=2)
  return (dy, dgate_kernel.astype(gate_kernel.dtype), dgate_bias.astype(gate_bias.dtype),
          dscale.astype(norm_scale.dtype), dout_kernel.astype(out_kernel.dtype))


_fused.defvjp(_fused_fwd, _fused_bwd)

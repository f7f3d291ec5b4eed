"""adaLN's LayerNorm + modulation as Pallas (Triton) kernels for GPUs: the forward reads x once and
writes the modulated output; the backward reads x and dy once, recomputes the row statistics in
registers, writes dx and per-block shares of the shift and scale gradients (summed by XLA).

Why: XLA runs the jnp form's forward and backward, with the modulation's gradient reductions
over tokens, as several fusions that each reread the [tokens, D] activations. Measured on an
H100 (same-process A/B of whole steps, BENCHMARKS.md): DiT-S/2 -2.9 % and DiG-S/2 -1.0 % at 256
px, no change at 1792 px; XLA's temp memory -0.11 to -0.14 GiB; bf16 errors against float64
1.7e-3 where XLA's rounding of the normalised x gave 3-7e-3.

With a gated residual add before the norm (`residual_forward` / `residual_backward`: a block's
h = x + gate * branch, then the norm of h), the forward also writes h and the backward also
reads the gradient reaching h from later (its residual path) and writes h's whole gradient,
the branch's (gate times it) and shares of the gate's: the add's XLA passes, and the backward's
XLA sum and gate-gradient reduction (about 2x its traffic floor in an H100 profile), are not
run. Likewise `backward(..., dpass=)` adds x's gradient from its other uses (a block's first
norm: x also goes on along the residual path) inside the kernel, not in an XLA pass after it.

Blocks: rows of one example by all D columns, D padded to a power of two (Triton's block
shapes) and masked, so every program holds whole norm rows; grid (N, T / rows).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.tiling import largest_pow2_divisor

BLOCK_ELEMENTS = 4096  # rows x padded D per program: the backward holds ~4 such f32 tiles
# Wider rows (D padded past 1024, e.g. XL's 1152 -> 2048) get twice the elements, so 4 rows a
# program, not 2: fwd+bwd 18 % faster at DiG-XL/2's shapes on an H100, while D = 384 is slower
# with more than BLOCK_ELEMENTS (BENCHMARKS.md).
WIDE_BLOCK_ELEMENTS = 8192
MIN_ROWS = 2
NUM_WARPS = 4
f32 = jnp.float32


def padded(d):
  """The power of two >= d: the column extent of a block."""
  return 1 << max(0, d - 1).bit_length()


def _most_rows(d):
  elements = BLOCK_ELEMENTS if padded(d) <= 1024 else WIDE_BLOCK_ELEMENTS
  return max(1, elements // padded(d))


def block_rows(t, d):
  return largest_pow2_divisor(t, _most_rows(d))


def supports(t, d):
  """Whether T tokens of width D suit the blocks: D >= 16, and MIN_ROWS rows per program (T's
  power-of-two factor) unless D is so wide that a block holds fewer anyway."""
  return d >= 16 and block_rows(t, d) >= min(MIN_ROWS, _most_rows(d))


def _index(rows, d):
  r = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
  c = jax.lax.broadcasted_iota(jnp.int32, (1, padded(d)), 1)
  return r, c, c < d


def _load(ref, rows, d):
  """[rows, padded D] float32 block of a [rows, D] ref, zero in the padding columns."""
  r, c, valid = _index(rows, d)
  ok = jnp.broadcast_to(valid, (rows, padded(d)))
  return pltriton.load(ref.at[r, c], mask=ok, other=0.0).astype(f32)


def _store(ref, value, d):
  r, c, valid = _index(value.shape[0], d)
  pltriton.store(ref.at[r, c], value.astype(ref.dtype),
                 mask=jnp.broadcast_to(valid, value.shape))


def _normalised(x, d, eps):
  """(x - mean) * rstd with zeros kept in the padding columns, and rstd [rows, 1]."""
  valid = _index(1, d)[2]
  mean = jnp.sum(x, axis=1, keepdims=True) / d
  centred = jnp.where(valid, x - mean, 0.0)
  rstd = jax.lax.rsqrt(jnp.sum(centred * centred, axis=1, keepdims=True) / d + eps)
  return centred * rstd, rstd


def _modulated(x, shift_ref, scale_ref, y_ref, *, d, eps):
  xhat, _ = _normalised(x, d, eps)
  _store(y_ref, xhat * (1.0 + _load(scale_ref, 1, d)) + _load(shift_ref, 1, d), d)


def _fwd_kernel(x_ref, shift_ref, scale_ref, y_ref, *, d, eps):
  _modulated(_load(x_ref, x_ref.shape[0], d), shift_ref, scale_ref, y_ref, d=d, eps=eps)


def _residual_fwd_kernel(x_ref, gate_ref, branch_ref, shift_ref, scale_ref, h_ref, y_ref, *, d,
                         eps):
  rows = x_ref.shape[0]
  h = _load(x_ref, rows, d) + _load(gate_ref, 1, d) * _load(branch_ref, rows, d)
  _store(h_ref, h, d)
  h = h.astype(h_ref.dtype).astype(f32)  # the norm reads h as stored, as the unfused norm would
  _modulated(h, shift_ref, scale_ref, y_ref, d=d, eps=eps)


def _norm_grad(x_ref, scale_ref, dy_ref, store_share, *, d, eps):
  """The norm's input gradient rstd (g - mean(g) - xhat mean(g xhat)) with g = dy (1 + scale),
  float32; first store_share(0, this block's sum over rows of dy: the shift's share) and
  store_share(1, its sum of dy xhat: the scale's)."""
  rows = x_ref.shape[0]
  xhat, rstd = _normalised(_load(x_ref, rows, d), d, eps)
  dy = _load(dy_ref, rows, d)
  store_share(0, jnp.sum(dy, axis=0, keepdims=True))
  store_share(1, jnp.sum(dy * xhat, axis=0, keepdims=True))
  g = dy * (1.0 + _load(scale_ref, 1, d))
  mean_g = jnp.sum(g, axis=1, keepdims=True) / d
  mean_gx = jnp.sum(g * xhat, axis=1, keepdims=True) / d
  return rstd * (g - mean_g - xhat * mean_gx)


def _bwd_kernel(x_ref, scale_ref, dy_ref, dx_ref, share_ref, *, d, eps):
  def store_share(row, value):
    share_ref[pl.ds(row, 1), :] = value
  _store(dx_ref, _norm_grad(x_ref, scale_ref, dy_ref, store_share, d=d, eps=eps), d)


def _bwd_with_input_kernel(x_ref, scale_ref, dy_ref, dpass_ref, dx_ref, share_ref, *, d, eps):
  """`_bwd_kernel`, with the gradient reaching x by its other uses (dpass) added to dx."""
  def store_share(row, value):
    share_ref[pl.ds(row, 1), :] = value
  dx = _norm_grad(x_ref, scale_ref, dy_ref, store_share, d=d, eps=eps)
  _store(dx_ref, dx + _load(dpass_ref, x_ref.shape[0], d), d)


def _store_row(ref, row, value, d):
  """value [1, padded D]'s first d columns into row `row` of a [rows, D] ref."""
  r, c, valid = _index(1, d)
  pltriton.store(ref.at[r + row, c], value.astype(ref.dtype), mask=valid)


def _residual_bwd_kernel(h_ref, gate_ref, branch_ref, scale_ref, dy_ref, dh_ref, dx_ref,
                         dbranch_ref, share_ref, *, d, eps):
  """h's whole gradient (the norm's plus dh, the gradient reaching h along the residual path),
  which is also x's; gate times it for the branch; shares: the shift's, the scale's and the
  gate's (sums over rows of dx times the branch), D columns each (unpadded: at one 1792 px
  image 1,568 blocks' shares are written and summed per call)."""
  rows = h_ref.shape[0]
  store_share = lambda row, value: _store_row(share_ref, row, value, d)
  dx = _norm_grad(h_ref, scale_ref, dy_ref, store_share, d=d, eps=eps) + _load(dh_ref, rows, d)
  _store(dx_ref, dx, d)
  dx = dx.astype(dx_ref.dtype).astype(f32)  # as stored, as the unfused gate gradient reads it
  _store(dbranch_ref, _load(gate_ref, 1, d) * dx, d)
  store_share(2, jnp.sum(dx * _load(branch_ref, rows, d), axis=0, keepdims=True))


def _specs(rows, d):
  """[rows, D] blocks of one example's tokens, and the example's [1, D] shift or scale row."""
  block = pl.BlockSpec((None, rows, d), lambda b, i: (b, i, 0))
  per_example = pl.BlockSpec((None, 1, d), lambda b, i: (b, 0, 0))
  return block, per_example


def forward(x, shift, scale, *, eps, out_dtype, interpret=False):
  """x [N, T, D], shift and scale [N, D] -> layer_norm(x) * (1 + scale) + shift [N, T, D]."""
  n, t, d = x.shape
  rows = block_rows(t, d)
  block, per_example = _specs(rows, d)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, d=d, eps=eps), grid=(n, t // rows),
      in_specs=[block, per_example, per_example], out_specs=block,
      out_shape=jax.ShapeDtypeStruct((n, t, d), out_dtype),
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret, name="adaln_norm_fwd",
  )(x, shift[:, None], scale[:, None])


def backward(x, scale, dy, *, eps, dpass=None, interpret=False):
  """(dx [N, T, D] in x's dtype, dshift [N, D], dscale [N, D] float32). dpass [N, T, D]: a
  gradient of x from elsewhere, added to dx inside the kernel (`forward`'s x used twice)."""
  n, t, d = x.shape
  rows = block_rows(t, d)
  block, per_example = _specs(rows, d)
  nb = t // rows
  kernel, inputs, name = (_bwd_kernel, (x, scale[:, None], dy), "adaln_norm_bwd")
  if dpass is not None:
    kernel, inputs, name = _bwd_with_input_kernel, inputs + (dpass,), "adaln_norm_input_bwd"
  dx, shares = pl.pallas_call(
      functools.partial(kernel, d=d, eps=eps), grid=(n, nb),
      in_specs=[block, per_example, block] + [block] * (dpass is not None),
      out_specs=[block, pl.BlockSpec((None, None, 2, padded(d)), lambda b, i: (b, i, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct((n, t, d), x.dtype),
                 jax.ShapeDtypeStruct((n, nb, 2, padded(d)), f32)],
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret, name=name,
  )(*inputs)
  sums = jnp.sum(shares[..., :d], axis=1)
  return dx, sums[:, 0], sums[:, 1]


def residual_forward(x, gate, branch, shift, scale, *, eps, out_dtype, interpret=False):
  """x, branch [N, T, D], gate, shift and scale [N, D] -> (h = x + gate * branch in x's
  dtype, layer_norm(h) * (1 + scale) + shift in out_dtype)."""
  n, t, d = x.shape
  rows = block_rows(t, d)
  block, per_example = _specs(rows, d)
  return pl.pallas_call(
      functools.partial(_residual_fwd_kernel, d=d, eps=eps), grid=(n, t // rows),
      in_specs=[block, per_example, block, per_example, per_example],
      out_specs=[block, block],
      out_shape=[jax.ShapeDtypeStruct((n, t, d), x.dtype),
                 jax.ShapeDtypeStruct((n, t, d), out_dtype)],
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret, name="adaln_residual_norm_fwd",
  )(x, gate[:, None], branch, shift[:, None], scale[:, None])


def residual_backward(h, gate, branch, scale, dy, dh, *, eps, interpret=False):
  """(dx = dh + the norm's input gradient [N, T, D] in h's dtype, dbranch = gate * dx in
  branch's dtype, then dgate, dshift and dscale [N, D] float32)."""
  n, t, d = h.shape
  rows = block_rows(t, d)
  block, per_example = _specs(rows, d)
  nb = t // rows
  dx, dbranch, shares = pl.pallas_call(
      functools.partial(_residual_bwd_kernel, d=d, eps=eps), grid=(n, nb),
      in_specs=[block, per_example, block, per_example, block, block],
      out_specs=[block, block, pl.BlockSpec((None, None, 3, d), lambda b, i: (b, i, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct((n, t, d), h.dtype),
                 jax.ShapeDtypeStruct((n, t, d), branch.dtype),
                 jax.ShapeDtypeStruct((n, nb, 3, d), f32)],
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret, name="adaln_residual_norm_bwd",
  )(h, gate[:, None], branch, scale[:, None], dy, dh)
  sums = jnp.sum(shares, axis=1)
  return dx, dbranch, sums[:, 2], sums[:, 0], sums[:, 1]

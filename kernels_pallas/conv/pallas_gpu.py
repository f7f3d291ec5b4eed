"""3x3 depthwise convolution as Pallas (Triton) kernels for GPUs: one pass forward, one pass
backward (dx, and per-block shares of the kernel and bias gradients, summed by XLA).

Why: XLA runs the jnp form's backward as padded copies, two multi-output reductions and nine
small reductions. On an H100, fwd+bwd at DiG-S/2 256 px, batch 64 ([64, 16, 16, 384] bf16):
240 us for the jnp form, 123 us for this kernel; at 1792 px, batch 1: 126 vs 100 us (BENCHMARKS.md).

Layout: the grid's tokens are flattened, [N, T = h * w, D], and padded by w + 1 zero tokens at
each end, so the nine taps of a block of tokens are nine in-bounds loads at offsets
(i - 1) * w + (j - 1): rows above the first and below the last read the padding, and taps
whose column leaves the grid (a row's first and last columns) are masked. Blocks: BLOCK_T
tokens (or T's largest power-of-two factor if smaller, at least MIN_BLOCK_T: `supports`) by
BLOCK_D channels, the best of seven shapes measured.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

BLOCK_T = 128  # tokens per program (fewer when T has a smaller power-of-two factor)
BLOCK_D = 64   # channels per program (a power of two dividing D, at most this)
MIN_BLOCK_T = 16
NUM_WARPS = 8
_TAPS = tuple((i, j) for i in range(3) for j in range(3))


def _largest_pow2_divisor(n, cap):
  p = 1
  while p * 2 <= cap and n % (p * 2) == 0:
    p *= 2
  return p


def blocks(t, d):
  """(tokens, channels) per program for T tokens and D channels."""
  return _largest_pow2_divisor(t, BLOCK_T), _largest_pow2_divisor(d, BLOCK_D)


def supports(h, w, d):
  bt, bd = blocks(h * w, d)
  return bt >= min(MIN_BLOCK_T, BLOCK_T) and bd >= 16


def _pad_tokens(x, w):
  """[N, h, w, D] -> [N, T + 2 (w + 1), D] with w + 1 zero tokens at each end."""
  n, h, _, d = x.shape
  return jnp.pad(x.reshape(n, h * w, d), ((0, 0), (w + 1, w + 1), (0, 0)))


def _tap(ref, t0, w, bt, i, j):
  """[bt, bd] float32 block of tap (i, j) for tokens t0 .. t0 + bt - 1: the token (i - 1) rows
  and (j - 1) columns away, zero where that column leaves the grid."""
  x = ref[pl.ds(t0 + (w + 1) + (i - 1) * w + (j - 1), bt), :].astype(jnp.float32)
  if j == 1:
    return x
  col = (t0 + jax.lax.broadcasted_iota(jnp.int32, (bt, 1), 0)) % w
  return jnp.where((col != 0) if j == 0 else (col != w - 1), x, 0.0)


def _tap_weights(k_ref, tap):  # [1, bd] float32 (rows of k_ref: the taps in (i, j) order)
  return k_ref[pl.ds(tap, 1), :].astype(jnp.float32)


# Each tap is loaded, used and dropped before the next one (one [bt, bd] block live besides the
# accumulators): all nine live at once spilled registers.
def _fwd_kernel(xp_ref, k_ref, b_ref, y_ref, *, w, bt):
  t0 = pl.multiple_of(pl.program_id(1) * bt, bt)
  acc = b_ref[...].astype(jnp.float32)  # [1, bd]
  for tap, (i, j) in enumerate(_TAPS):
    acc = acc + _tap(xp_ref, t0, w, bt, i, j) * _tap_weights(k_ref, tap)
  y_ref[pl.ds(t0, bt), :] = acc.astype(y_ref.dtype)


def _bwd_kernel(xp_ref, dyp_ref, k_ref, dx_ref, dk_ref, *, w, bt):
  """dx = the same conv of dy with the kernel rotated 180 degrees; dk[tap] and dbias (row 9):
  this block's sums of x_tap * dy and of dy."""
  t0 = pl.multiple_of(pl.program_id(1) * bt, bt)
  dx = 0.0
  for tap, (i, j) in enumerate(_TAPS):  # tap (i, j) of the rotated kernel is (2 - i, 2 - j)
    dx = dx + _tap(dyp_ref, t0, w, bt, i, j) * _tap_weights(k_ref, 8 - tap)
  dx_ref[pl.ds(t0, bt), :] = dx.astype(dx_ref.dtype)
  dy = _tap(dyp_ref, t0, w, bt, 1, 1)  # dy of the block itself
  for tap, (i, j) in enumerate(_TAPS):
    dk_ref[pl.ds(tap, 1), :] = jnp.sum(_tap(xp_ref, t0, w, bt, i, j) * dy, axis=0,
                                       keepdims=True)
  dk_ref[pl.ds(9, 1), :] = jnp.sum(dy, axis=0, keepdims=True)


def _kernel_rows(kernel):
  """[3, 3, D] -> [16, D] float32: the nine taps in (i, j) order, zero rows after (a power of
  two of rows, as Triton blocks need)."""
  d = kernel.shape[-1]
  return jnp.pad(kernel.reshape(9, d).astype(jnp.float32), ((0, 7), (0, 0)))


def _conv_fwd_call(xp, kernel16, bias, *, h, w, interpret):
  n, _, d = xp.shape
  t = h * w
  bt, bd = blocks(t, d)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, w=w, bt=bt), grid=(n, t // bt, d // bd),
      in_specs=[pl.BlockSpec((None, xp.shape[1], bd), lambda b, i, c: (b, 0, c)),
                pl.BlockSpec((16, bd), lambda b, i, c: (0, c)),
                pl.BlockSpec((1, bd), lambda b, i, c: (0, c))],
      out_specs=pl.BlockSpec((None, t, bd), lambda b, i, c: (b, 0, c)),
      out_shape=jax.ShapeDtypeStruct((n, t, d), xp.dtype),
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret, name="depthwise_conv_fwd",
  )(xp, kernel16, bias.reshape(1, d))


def _conv_bwd_call(xp, dyp, kernel16, *, h, w, interpret):
  n, tp, d = xp.shape
  t = h * w
  bt, bd = blocks(t, d)
  nb = t // bt
  padded = pl.BlockSpec((None, tp, bd), lambda b, i, c: (b, 0, c))
  return pl.pallas_call(
      functools.partial(_bwd_kernel, w=w, bt=bt), grid=(n, nb, d // bd),
      in_specs=[padded, padded, pl.BlockSpec((16, bd), lambda b, i, c: (0, c))],
      out_specs=[pl.BlockSpec((None, t, bd), lambda b, i, c: (b, 0, c)),
                 pl.BlockSpec((None, None, 16, bd), lambda b, i, c: (b, i, 0, c))],
      out_shape=[jax.ShapeDtypeStruct((n, t, d), dyp.dtype),
                 jax.ShapeDtypeStruct((n, nb, 16, d), jnp.float32)],  # rows 10-15 unused
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret, name="depthwise_conv_bwd",
  )(xp, dyp, kernel16)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def depthwise_conv3x3(x, kernel, bias, interpret=False):
  """x [N, h, w, D] (any float dtype; float32 arithmetic); kernel [3, 3, D]; bias [D]."""
  return _forward(x, kernel, bias, interpret)[0]


def _forward(x, kernel, bias, interpret):
  n, h, w, d = x.shape
  xp = _pad_tokens(x, w)
  y = _conv_fwd_call(xp, _kernel_rows(kernel), bias, h=h, w=w, interpret=interpret)
  return y.reshape(n, h, w, d), (xp, kernel, bias)


def _backward(interpret, residuals, dy):
  xp, kernel, bias = residuals
  n, h, w, d = dy.shape
  dx, shares = _conv_bwd_call(xp, _pad_tokens(dy, w), _kernel_rows(kernel), h=h, w=w,
                              interpret=interpret)
  sums = jnp.sum(shares, axis=(0, 1))
  return (dx.reshape(n, h, w, d), sums[:9].reshape(3, 3, d).astype(kernel.dtype),
          sums[9].astype(bias.dtype))


depthwise_conv3x3.defvjp(_forward, _backward)

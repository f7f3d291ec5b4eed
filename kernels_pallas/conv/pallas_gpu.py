"""3x3 depthwise convolution as Pallas (Triton) kernels for GPUs: one pass forward; backward in
two kernels, dx (the forward kernel on dy, kernel rotated 180 degrees) and per-program shares
of the kernel and bias gradients (`_dk_kernel`), summed by XLA.

Why: XLA runs the jnp form's backward as padded copies, two multi-output reductions and nine
small reductions. On an H100, fwd+bwd at DiG-S/2 256 px, batch 64 ([64, 16, 16, 384] bf16):
240 us for the jnp form, 123 us for this kernel's first version; BENCHMARKS.md has the current
figures. The backward was first one kernel doing both (dx's nine dy taps, then nine x taps each
reduced over the block's tokens): on an H100 (ncu) it was latency-bound, 122 registers and 25 %
occupancy, with a cross-warp reduction per tap per 64 tokens. Split, the kernel-gradient walk
keeps elementwise sums over 256 tokens and reduces once: fwd+bwd 10-20 % faster at DiG-S/2's
shapes, the same at DiG-XL/2's (BENCHMARKS.md).

Layout: the grid's tokens are flattened, [N, T = h * w, D], and read unpadded: the nine taps of
a block of tokens are nine loads at token offsets (i - 1) * w + (j - 1), masked where the tap's
row or column leaves the grid. No zero-padded copy of x or dy is made: in a training step those
two copies cost about half as much as the backward kernel. Blocks: BLOCK_T tokens (or T's largest
power-of-two factor if smaller, at least MIN_BLOCK_T: `supports`) by BLOCK_D channels.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.tiling import largest_pow2_divisor

# Forward tile (also dx's): the best of 6 shapes measured in 12-layer chains on an H100
# (BENCHMARKS.md).
BLOCK_T = 64  # tokens per program (fewer when T has a smaller power-of-two factor)
BLOCK_D = 64  # channels per program (a power of two dividing D, at most this)
MIN_BLOCK_T = 16
NUM_WARPS = 4
# The kernel-gradient walk (`_dk_kernel`): DK_STEPS steps of DK_BLOCK_T tokens x DK_BLOCK_D
# channels a program. Best of 9 shapes on an H100 at DiG-S/2 256 / 1792 / 2048 px (BENCHMARKS.md).
DK_BLOCK_T = 16
DK_BLOCK_D = 64
DK_STEPS = 16
DK_NUM_WARPS = 4
TAPS = tuple((i, j) for i in range(3) for j in range(3))


def blocks(t, d):
  """(tokens, channels) per program for T tokens and D channels."""
  return largest_pow2_divisor(t, BLOCK_T), largest_pow2_divisor(d, BLOCK_D)


def supports(h, w, d):
  bt, bd = blocks(h * w, d)
  return bt >= min(MIN_BLOCK_T, BLOCK_T) and bd >= 16


def tap_block(ref, t0, t, w, bt, i, j):
  """[bt, bd] float32 block of tap (i, j) for tokens t0 .. t0 + bt - 1 of a [T, bd] ref: the
  token (i - 1) rows and (j - 1) columns away, zero where that row or column leaves the grid."""
  if (i, j) == (1, 1):
    return ref[pl.ds(t0, bt), :].astype(jnp.float32)
  bd = ref.shape[1]
  token = t0 + jax.lax.broadcasted_iota(jnp.int32, (bt, 1), 0)
  src = token + (i - 1) * w + (j - 1)
  ok = (src >= 0) & (src < t)  # the row above the first / below the last
  col = token % w
  if j != 1:
    ok &= (col != 0) if j == 0 else (col != w - 1)
  channels = jax.lax.broadcasted_iota(jnp.int32, (1, bd), 1)
  x = pltriton.load(ref.at[src, channels], mask=jnp.broadcast_to(ok, (bt, bd)), other=0.0)
  return x.astype(jnp.float32)


def tap_weights(k_ref, tap):  # [1, bd] float32 (rows of k_ref: the taps in (i, j) order)
  return k_ref[pl.ds(tap, 1), :].astype(jnp.float32)


def conv_block(ref, k_ref, acc, t0, t, w, bt):
  """acc + the conv of tokens t0 .. t0 + bt - 1 of a [T, bd] ref with k_ref's nine taps, float32.
  Each tap is loaded, used and dropped before the next one (one [bt, bd] block live besides the
  accumulator): all nine live at once spilled registers."""
  for tap, (i, j) in enumerate(TAPS):
    acc = acc + tap_block(ref, t0, t, w, bt, i, j) * tap_weights(k_ref, tap)
  return acc


def _fwd_kernel(x_ref, k_ref, b_ref, y_ref, *, w, bt):
  t = x_ref.shape[0]
  t0 = pl.multiple_of(pl.program_id(1) * bt, bt)
  acc = conv_block(x_ref, k_ref, b_ref[...].astype(jnp.float32), t0, t, w, bt)  # bias [1, bd]
  y_ref[pl.ds(t0, bt), :] = acc.astype(y_ref.dtype)


def _dk_kernel(x_ref, dy_ref, dk_ref, *, w, bt, steps):
  """This program's sums over its steps x bt tokens of x_tap * dy (rows 0-8) and dy (row 9).
  The sums stay elementwise through the walk, so the cross-warp reduction over tokens runs
  once per tap per program, not once per block of tokens."""
  t, bd = x_ref.shape
  first = pl.program_id(1) * (steps * bt)

  def step(s, sums):
    tap_sums, dy_sum = sums
    t0 = pl.multiple_of(first + s * bt, bt)
    dy = tap_block(dy_ref, t0, t, w, bt, 1, 1)
    return (tuple(total + tap_block(x_ref, t0, t, w, bt, i, j) * dy
                  for total, (i, j) in zip(tap_sums, TAPS)), dy_sum + dy)

  zero = jnp.zeros((bt, bd), jnp.float32)
  tap_sums, dy_sum = jax.lax.fori_loop(0, steps, step, ((zero,) * len(TAPS), zero))
  for tap, total in enumerate(tap_sums):
    dk_ref[pl.ds(tap, 1), :] = jnp.sum(total, axis=0, keepdims=True)
  dk_ref[pl.ds(9, 1), :] = jnp.sum(dy_sum, axis=0, keepdims=True)


def dk_blocks(t, d):
  """(tokens per step, steps per program, channels per program) of `_dk_kernel`."""
  bt = largest_pow2_divisor(t, DK_BLOCK_T)
  return bt, largest_pow2_divisor(t // bt, DK_STEPS), largest_pow2_divisor(d, DK_BLOCK_D)


def kernel_rows(kernel):
  """[3, 3, D] -> [16, D] float32: the nine taps in (i, j) order, zero rows after (a power of
  two of rows, as Triton blocks need)."""
  d = kernel.shape[-1]
  return jnp.pad(kernel.reshape(9, d).astype(jnp.float32), ((0, 7), (0, 0)))


def conv_fwd_call(x, kernel16, bias, *, w, interpret):
  n, t, d = x.shape
  bt, bd = blocks(t, d)
  whole = pl.BlockSpec((None, t, bd), lambda b, i, c: (b, 0, c))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, w=w, bt=bt), grid=(n, t // bt, d // bd),
      in_specs=[whole, pl.BlockSpec((16, bd), lambda b, i, c: (0, c)),
                pl.BlockSpec((1, bd), lambda b, i, c: (0, c))],
      out_specs=whole,
      out_shape=jax.ShapeDtypeStruct((n, t, d), x.dtype),
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret, name="depthwise_conv_fwd",
  )(x, kernel16, bias.reshape(1, d))


def conv_dk_call(x, dy, *, w, interpret):
  n, t, d = x.shape
  bt, steps, bd = dk_blocks(t, d)
  programs = t // (bt * steps)
  whole = pl.BlockSpec((None, t, bd), lambda b, i, c: (b, 0, c))
  return pl.pallas_call(
      functools.partial(_dk_kernel, w=w, bt=bt, steps=steps),
      grid=(n, programs, d // bd),
      in_specs=[whole, whole],
      out_specs=pl.BlockSpec((None, None, 16, bd), lambda b, i, c: (b, i, 0, c)),
      out_shape=jax.ShapeDtypeStruct((n, programs, 16, d), jnp.float32),  # rows 10-15 unused
      compiler_params=pltriton.CompilerParams(num_warps=DK_NUM_WARPS, num_stages=1),
      interpret=interpret, name="depthwise_conv_dk",
  )(x, dy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def depthwise_conv3x3(x, kernel, bias, interpret=False):
  """x [N, h, w, D] (any float dtype; float32 arithmetic); kernel [3, 3, D]; bias [D]."""
  return _forward(x, kernel, bias, interpret)[0]


def tokens(x):  # [N, h, w, D] -> [N, h * w, D]
  return x.reshape(x.shape[0], -1, x.shape[-1])


def _forward(x, kernel, bias, interpret):
  y = conv_fwd_call(tokens(x), kernel_rows(kernel), bias, w=x.shape[2], interpret=interpret)
  return y.reshape(x.shape), (x, kernel, bias)


def _backward(interpret, residuals, dy):
  x, kernel, bias = residuals
  d = x.shape[-1]
  w = x.shape[2]
  # dx is the convolution of dy with the kernel rotated 180 degrees: the forward kernel's job
  dx = conv_fwd_call(tokens(dy), kernel_rows(kernel[::-1, ::-1]), jnp.zeros((d,), jnp.float32),
                     w=w, interpret=interpret)
  shares = conv_dk_call(tokens(x), tokens(dy), w=w, interpret=interpret)
  sums = jnp.sum(shares, axis=(0, 1))
  return (dx.reshape(x.shape), sums[:9].reshape(3, 3, d).astype(kernel.dtype),
          sums[9].astype(bias.dtype))


depthwise_conv3x3.defvjp(_forward, _backward)

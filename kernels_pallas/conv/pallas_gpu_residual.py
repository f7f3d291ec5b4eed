"""DiG's block ending, x1 = x + gate * branch then y = conv3x3(x1), with its backward as Pallas
(Triton) kernels for GPUs: the gated residual add's gradients come from the conv's dx kernel
instead of an XLA pass after it.

Why: unfused, a training step's backward runs, after the conv's dx kernel, one XLA multi-output
reduction (read dx1 and branch; write d branch = gate * dx1 and per-example sums of dx1 * branch
for the gate); an H100 profile of DiG-S/2 at one 1792 px image had it at about 20 us a layer,
twice its traffic floor (BENCHMARKS.md). Here `_dx_kernel` makes the conv's dx (the forward taps
on dy, kernel rotated 180 degrees) and, from the same registers, d branch and this block's share
of the gate's gradient (summed over blocks by XLA: a few hundred KB). The cotangent of x is dx1
itself. The kernel-gradient walk is pallas_gpu's.

The forward stays XLA's add and pallas_gpu's conv kernel: made inside the conv kernel, the add
doubles each tap's loads and arithmetic (x and branch at every tap), and compiled offline for
sm_90 (Triton 3.9) that kernel needed 2.9x the instructions of the plain one and spilled
registers at the conv's 64 x 64 blocks (BENCHMARKS.md).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.conv import pallas_gpu
from kernels_pallas.conv.pallas_gpu import conv_block, kernel_rows, tokens


def _dx_kernel(dy_ref, m_ref, g_ref, k_ref, dx_ref, dm_ref, dg_ref, *, w, bt):
  t = dy_ref.shape[0]
  t0 = pl.multiple_of(pl.program_id(1) * bt, bt)
  acc = conv_block(dy_ref, k_ref, jnp.zeros((bt, dy_ref.shape[1]), jnp.float32), t0, t, w, bt)
  dx1 = acc.astype(dx_ref.dtype)
  dx_ref[pl.ds(t0, bt), :] = dx1
  dx1 = dx1.astype(jnp.float32)  # the stored gradient, as the unfused pass would read it
  branch = m_ref[pl.ds(t0, bt), :].astype(jnp.float32)
  dm_ref[pl.ds(t0, bt), :] = (g_ref[...].astype(jnp.float32) * dx1).astype(dm_ref.dtype)
  dg_ref[...] = jnp.sum(dx1 * branch, axis=0, keepdims=True)


def _specs(t, bd):
  whole = pl.BlockSpec((None, t, bd), lambda b, i, c: (b, 0, c))
  per_example = pl.BlockSpec((None, 1, bd), lambda b, i, c: (b, 0, c))
  rows16 = pl.BlockSpec((16, bd), lambda b, i, c: (0, c))
  return whole, per_example, rows16


def _dx_call(dy, branch, gate, kernel16, *, w, interpret):
  n, t, d = dy.shape
  bt, bd = pallas_gpu.blocks(t, d)
  whole, per_example, rows16 = _specs(t, bd)
  return pl.pallas_call(
      functools.partial(_dx_kernel, w=w, bt=bt), grid=(n, t // bt, d // bd),
      in_specs=[whole, whole, per_example, rows16],
      out_specs=[whole, whole, pl.BlockSpec((None, None, 1, bd), lambda b, i, c: (b, i, 0, c))],
      out_shape=[jax.ShapeDtypeStruct((n, t, d), dy.dtype),  # dx1
                 jax.ShapeDtypeStruct((n, t, d), branch.dtype),  # d branch
                 jax.ShapeDtypeStruct((n, t // bt, 1, d), jnp.float32)],  # the gate's shares
      compiler_params=pltriton.CompilerParams(num_warps=pallas_gpu.NUM_WARPS, num_stages=1),
      interpret=interpret, name="gated_residual_conv_dx",
  )(dy, branch, gate[:, None, :], kernel16)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def gated_residual_conv3x3(x, gate, branch, kernel, bias, interpret=False):
  """conv3x3(x + gate[:, None, None] * branch): x, branch [N, h, w, D] and gate [N, D] of one
  dtype (that of x1 and the output); kernel [3, 3, D]; bias [D]. Float32 arithmetic."""
  return _forward(x, gate, branch, kernel, bias, interpret)[0]


def _forward(x, gate, branch, kernel, bias, interpret):
  x1 = tokens(x + gate[:, None, None] * branch)
  y = pallas_gpu.conv_fwd_call(x1, kernel_rows(kernel), bias, w=x.shape[2], interpret=interpret)
  return y.reshape(x.shape), (x1, gate, branch, kernel, bias)


def _backward(interpret, residuals, dy):
  x1, gate, branch, kernel, bias = residuals
  shape = branch.shape
  dx1, dbranch, gate_shares = _dx_call(tokens(dy), tokens(branch), gate,
                                       kernel_rows(kernel[::-1, ::-1]), w=shape[2],
                                       interpret=interpret)
  shares = pallas_gpu.conv_dk_call(x1, tokens(dy), w=shape[2], interpret=interpret)
  sums = jnp.sum(shares, axis=(0, 1))
  return (dx1.reshape(shape), jnp.sum(gate_shares, axis=(1, 2)).astype(gate.dtype),
          dbranch.reshape(shape), sums[:9].reshape(3, 3, -1).astype(kernel.dtype),
          sums[9].astype(bias.dtype))


gated_residual_conv3x3.defvjp(_forward, _backward)

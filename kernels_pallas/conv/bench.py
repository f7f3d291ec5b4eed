"""Benchmark of the depthwise conv backends: `python -m kernels_pallas.conv.bench [--shape
N,h,w,D] [--residual] [--tile TOKENS,CHANNELS,WARPS] [--dk_tile TOKENS,STEPS,CHANNELS,WARPS]
[--check] [--json FILE]`.

Times a chain of `--layers` convs (x -> conv -> conv ...), jitted: the forward, and `jax.grad`
of the chain (forward + backward), reported per layer. With `--residual` each layer is DiG's
block ending, conv(x + gate * branch), with its own random gate and branch (their gradients
timed too): the jnp form, the conv kernels with XLA's add and its gradients around them
("pallas_gpu"), and the add's gradients inside the dx kernel ("pallas_gpu fused",
`gated_residual_conv3x3`). A chain is how a training
step runs them, so the copies XLA adds around a kernel are timed with it (a single call hides
them).
Shapes: DiG's at S/2 and XL/2, 256 px batch 64 and 1792 / 2048 px batch 1, bf16 activations.
Backends: the jnp reference, and the Pallas kernel on GPUs (or anywhere with `--interpret`,
for tests); `--tile` adds the kernel with other forward (and dx) tiles, `--dk_tile` with other
shapes of the kernel-gradient walk, side by side. `--check` first compares
the kernel's chain gradients with the reference's in float32.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from kernels_pallas.bench import (HBM_BYTES_PER_S, median_ms, parse_ints, report_chain,
                                   time_chain_forms, worst_relative_rms)
from kernels_pallas.conv import pallas_gpu, pallas_gpu_residual, reference
from kernels_pallas.settings import module_settings

SHAPES = {  # name: (N, h, w, D)
    "S/2@256": (64, 16, 16, 384),
    "S/2@1792": (1, 112, 112, 384),
    "XL/2@256": (64, 16, 16, 1152),
    "XL/2@2048": (1, 128, 128, 1152),
}


def hbm_floor_us(shape, itemsize=2, residual=False):
  """Fewest bytes of one conv's fwd+bwd (read x, write y; read x and dy, write dx) over HBM
  bandwidth, in microseconds. With the residual add: also read branch forward, and read it and
  write its gradient backward."""
  n, h, w, d = shape
  return (8 if residual else 5) * n * h * w * d * itemsize / HBM_BYTES_PER_S * 1e6


def chain_fns(conv, layers, residual=False):
  """(forward, gradient) of `layers` convs in a chain, jitted: f(x, kernels, biases[, gates,
  branches]) and g(x, kernels, biases, dy[, gates, branches]) -> grads of sum(chain(x) * dy)
  for x, kernels, biases (and gates and branches). With `residual`, conv(x, gate, branch,
  kernel, bias) is layer i's conv(x + gate * branch)."""
  def forward(x, kernels, biases, *extra):
    for i in range(layers):
      x = (conv(x, extra[0][i], extra[1][i], kernels[i], biases[i]) if residual
           else conv(x, kernels[i], biases[i]))
    return x

  def loss(x, kernels, biases, dy, *extra):
    return jnp.sum(forward(x, kernels, biases, *extra).astype(jnp.float32) * dy)

  argnums = (0, 1, 2, 4, 5) if residual else (0, 1, 2)
  return jax.jit(forward), jax.jit(jax.grad(loss, argnums=argnums))


def chain_inputs(shape, layers, dtype=jnp.bfloat16, seed=0, residual=False):
  """x, kernels, biases, dy (and with `residual` gates and branches, one per layer)."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  d = shape[-1]
  inputs = (jax.random.normal(ks[0], shape, dtype),
            0.3 * jax.random.normal(ks[1], (layers, 3, 3, d)),  # keeps the chain's scale
            jax.random.normal(ks[2], (layers, d)), jax.random.normal(ks[3], shape))
  if residual:
    inputs += (0.3 * jax.random.normal(ks[4], (layers, shape[0], d), dtype),
               jax.random.normal(ks[5], (layers, *shape), dtype))
  return inputs


def _kernel(interpret, residual=False, fused=True):
  """The Pallas form timed: the conv; with `residual`, `gated_residual_conv3x3` (`fused`: the
  add's gradients from the dx kernel) or XLA's add and its gradients around the conv kernels."""
  if not residual:
    return lambda x, k, b: pallas_gpu.depthwise_conv3x3(x, k, b, interpret)
  if fused:
    return lambda x, g, m, k, b: pallas_gpu_residual.gated_residual_conv3x3(x, g, m, k, b,
                                                                            interpret)
  return lambda x, g, m, k, b: pallas_gpu.depthwise_conv3x3(x + g[:, None, None] * m, k, b,
                                                            interpret)


def _reference(residual):
  return reference.gated_residual_conv3x3 if residual else reference.depthwise_conv3x3


def tile_settings(tile):
  """pallas_gpu settings of a --tile (tokens, channels, warps) or a --dk_tile (tokens, steps,
  channels, warps)."""
  names = (("BLOCK_T", "BLOCK_D", "NUM_WARPS") if len(tile) == 3 else
           ("DK_BLOCK_T", "DK_STEPS", "DK_BLOCK_D", "DK_NUM_WARPS"))
  return dict(zip(names, tile))


def _time_with_tile(tile, shape, args):
  """time_chain with the kernel's forward tile or kernel-gradient walk set to `tile` (the
  fused form with --residual)."""
  with module_settings(pallas_gpu, tile_settings(tile)):
    return time_chain(_kernel(args.interpret, args.residual), shape, args.layers, args.runs,
                      args.residual)


def time_chain(conv, shape, layers, runs, residual=False):
  """(forward, forward + backward) microseconds per layer."""
  forward, grad = chain_fns(conv, layers, residual)
  x, kernels, biases, dy, *extra = chain_inputs(shape, layers, residual=residual)
  fwd = median_ms(forward, [(x, kernels, biases, *extra)], runs)
  both = median_ms(grad, [(x, kernels, biases, dy, *extra)], runs)
  return fwd * 1e3 / layers, both * 1e3 / layers


def check(shape, layers, interpret, residual=False):
  """Largest relative RMS difference of the kernel's chain gradients from the reference's
  (float32 inputs; the fused form with `residual`)."""
  args = chain_inputs(shape, layers, jnp.float32, seed=1, residual=residual)
  with jax.default_matmul_precision("highest"):
    want = chain_fns(_reference(residual), layers, residual)[1](*args)
    got = chain_fns(_kernel(interpret, residual), layers, residual)[1](*args)
  return worst_relative_rms(got, want)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", action="append", default=[],
                      help="N,h,w,D instead of DiG's shapes (repeatable)")
  parser.add_argument("--tile", action="append", default=[],
                      help="TOKENS,CHANNELS,WARPS: also time the kernel with this tile "
                           f"(default tile {pallas_gpu.BLOCK_T},{pallas_gpu.BLOCK_D},"
                           f"{pallas_gpu.NUM_WARPS}; repeatable)")
  parser.add_argument("--dk_tile", action="append", default=[],
                      help="TOKENS,STEPS,CHANNELS,WARPS: also time the kernel with this "
                           "kernel-gradient walk (default "
                           f"{pallas_gpu.DK_BLOCK_T},{pallas_gpu.DK_STEPS},"
                           f"{pallas_gpu.DK_BLOCK_D},{pallas_gpu.DK_NUM_WARPS}; repeatable)")
  parser.add_argument("--residual", action="store_true",
                      help="layers are conv(x + gate * branch): the jnp form, the conv kernels "
                           "with XLA's add, and the add's gradients inside the dx kernel")
  parser.add_argument("--layers", type=int, default=12, help="convs in the timed chain")
  parser.add_argument("--runs", type=int, default=20, help="timed runs per measurement")
  parser.add_argument("--check", action="store_true",
                      help="first compare the kernel's chain gradients with the reference")
  parser.add_argument("--interpret", action="store_true",
                      help="run the Pallas kernel in interpret mode (CPU; for tests)")
  parser.add_argument("--json", help="write the rows to this file")
  args = parser.parse_args(argv)
  try:
    shapes = ({s: parse_ints(s, 4, "--shape") for s in args.shape} if args.shape
              else dict(SHAPES))
    tiles = ([parse_ints(t, 3, "--tile") for t in args.tile]
             + [parse_ints(t, 4, "--dk_tile") for t in args.dk_tile])
  except ValueError as e:
    parser.error(str(e))
  if args.layers < 1 or args.runs < 1:
    parser.error("--layers and --runs must be >= 1")
  kernel = args.interpret or jax.default_backend() == "gpu"
  if tiles and not kernel:
    parser.error("--tile and --dk_tile need a GPU (or --interpret)")

  rows, result = [], {"device": str(jax.devices()[0].device_kind), "layers": args.layers,
                      "residual": args.residual}
  timed = lambda conv, s: time_chain(conv, s, args.layers, args.runs, args.residual)
  for name, shape in shapes.items():
    with_kernel = kernel and pallas_gpu.supports(*shape[1:])
    if kernel and not with_kernel:
      print(f"{name}: the kernel does not support {shape}; timing the reference only")
    if args.check and with_kernel:
      err = check(shape, min(args.layers, 4), args.interpret, args.residual)
      result.setdefault("check", {})[name] = err
      print(f"{name}: kernel vs reference, float32 chain gradients: {err:.2e} relative RMS",
            flush=True)
    runs = [("reference", lambda s=shape: timed(_reference(args.residual), s))]
    if with_kernel:
      runs.append(("pallas_gpu", lambda s=shape: timed(
          _kernel(args.interpret, args.residual, fused=False), s)))
      if args.residual:
        runs.append(("pallas_gpu fused", lambda s=shape: timed(
            _kernel(args.interpret, True), s)))
      for tile in tiles:
        kind = "tile" if len(tile) == 3 else "dk_tile"
        form = "pallas_gpu fused" if args.residual else "pallas_gpu"
        runs.append((f"{form} {kind} {tile}", lambda s=shape, t=tile: _time_with_tile(
            t, s, args)))
    time_chain_forms(rows, name, "backend", runs, hbm_floor_us(shape, residual=args.residual))
  report_chain(rows, "backend", result, args.json)


if __name__ == "__main__":
  main()

"""Benchmark of a block's two adaLN norms with the gated residual add between them:
`python -m kernels_pallas.adaln.bench [--shape N,T,D] [--layers 12] [--check] [--json FILE]`.

Times a chain of `--layers` such layers, each with its own random shifts, scales, gate and
branch: n1 = norm(x), (h, y) = (x + gate * branch, norm(h)), x_next = h + y + n1 (so every
output carries gradient, and x's gradient has two parts, as in a block), jitted: the forward,
and `jax.grad` of the chain (gradients of x and every per-layer input), per layer. Forms: the
jnp reference; the norm kernels with XLA's add and XLA's sum of x's two gradients
("pallas_gpu": `layer_norm_modulate` twice); the add inside the second norm's kernels and x's
gradient summed inside the first norm's backward ("pallas_gpu fused":
`layer_norm_modulate_with_input`, `residual_layer_norm_modulate`). Shapes: the models' tokens
at S/2 and XL/2 widths, 256 px batch 64 and 1792 / 2048 px batch 1, bf16. `--check` first
compares the fused chain's gradients with the reference's in float32.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from kernels_pallas.adaln import (layer_norm_modulate, layer_norm_modulate_with_input, pallas_gpu,
                                  residual_layer_norm_modulate)
from kernels_pallas.bench import (HBM_BYTES_PER_S, median_ms, parse_ints, report_chain,
                                   time_chain_forms, worst_relative_rms)

SHAPES = {  # name: (N, T, D)
    "S/2@256": (64, 256, 384),
    "S/2@1792": (1, 12544, 384),
    "XL/2@256": (64, 256, 1152),
    "XL/2@2048": (1, 16384, 1152),
}
FORMS = ("reference", "pallas_gpu", "pallas_gpu fused")


def hbm_floor_us(shape, itemsize=2):
  """Fewest bytes of one layer's norms and add, fwd+bwd, over HBM bandwidth, in microseconds:
  forward reads x (once for both) and branch and writes n1, h and y; backward reads x, h,
  branch, dn1, dy and dh and writes dx and d branch."""
  n, t, d = shape
  return 13 * n * t * d * itemsize / HBM_BYTES_PER_S * 1e6


def block_norms(form, interpret):
  """(n1, h, y) of x, shift1, scale1, gate, branch, shift, scale in one of FORMS."""
  kernels = dict(backend="pallas_gpu", interpret=interpret)
  if form == "pallas_gpu fused":
    def fused(x, shift1, scale1, gate, branch, shift, scale):
      x, n1 = layer_norm_modulate_with_input(x, shift1, scale1, **kernels)
      return (n1, *residual_layer_norm_modulate(x, gate, branch, shift, scale, **kernels))
    return fused
  if form == "reference":
    kernels["backend"] = "reference"

  def unfused(x, shift1, scale1, gate, branch, shift, scale):
    h = x + gate[:, None] * branch
    return (layer_norm_modulate(x, shift1, scale1, **kernels), h,
            layer_norm_modulate(h, shift, scale, **kernels))

  return unfused


def chain_fns(fn, layers):
  """(forward, gradient), jitted: f(x, per_layer) and g(x, per_layer, dy) -> gradients of
  sum(chain(x) * dy) for x and per_layer (the first norm's shifts and scales, gates, branches,
  the second norm's shifts and scales; one per layer)."""
  def forward(x, per_layer):
    for i in range(layers):
      n1, h, y = fn(x, *(a[i] for a in per_layer))
      x = h + y + n1
    return x

  def loss(x, per_layer, dy):
    return jnp.sum(forward(x, per_layer).astype(jnp.float32) * dy)

  return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1)))


def chain_inputs(shape, layers, dtype=jnp.bfloat16, seed=0):
  """x, (shifts1, scales1, gates, branches, shifts, scales), dy."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  n, _, d = shape
  small = lambda k: (0.3 * jax.random.normal(k, (layers, n, d))).astype(dtype)
  per_layer = (small(ks[6]), small(ks[7]), small(ks[1]),
               jax.random.normal(ks[2], (layers, *shape), dtype), small(ks[3]), small(ks[4]))
  return (jax.random.normal(ks[0], shape, dtype), per_layer,
          jax.random.normal(ks[5], shape, jnp.float32))


def time_chain(fn, shape, layers, runs):
  """(forward, forward + backward) microseconds per layer."""
  forward, grad = chain_fns(fn, layers)
  x, per_layer, dy = chain_inputs(shape, layers)
  fwd = median_ms(forward, [(x, per_layer)], runs)
  both = median_ms(grad, [(x, per_layer, dy)], runs)
  return fwd * 1e3 / layers, both * 1e3 / layers


def check(shape, layers, interpret):
  """Largest relative RMS difference of the fused chain's gradients from the reference's
  (float32 inputs)."""
  x, per_layer, dy = chain_inputs(shape, layers, jnp.float32, seed=1)
  want = jax.tree.leaves(chain_fns(block_norms("reference", interpret), layers)[1](
      x, per_layer, dy))
  got = jax.tree.leaves(chain_fns(block_norms("pallas_gpu fused", interpret), layers)[1](
      x, per_layer, dy))
  return worst_relative_rms(got, want)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", action="append", default=[],
                      help="N,T,D instead of the models' shapes (repeatable)")
  parser.add_argument("--layers", type=int, default=12, help="pairs in the timed chain")
  parser.add_argument("--runs", type=int, default=20, help="timed runs per measurement")
  parser.add_argument("--check", action="store_true",
                      help="first compare the fused chain's gradients with the reference")
  parser.add_argument("--interpret", action="store_true",
                      help="run the Pallas kernels in interpret mode (CPU; for tests)")
  parser.add_argument("--json", help="write the rows to this file")
  args = parser.parse_args(argv)
  try:
    shapes = ({s: parse_ints(s, 3, "--shape") for s in args.shape} if args.shape else dict(SHAPES))
  except ValueError as e:
    parser.error(str(e))
  if args.layers < 1 or args.runs < 1:
    parser.error("--layers and --runs must be >= 1")
  kernels = args.interpret or jax.default_backend() == "gpu"

  rows, result = [], {"device": str(jax.devices()[0].device_kind), "layers": args.layers}
  for name, (n, t, d) in shapes.items():
    with_kernels = kernels and pallas_gpu.supports(t, d)
    if kernels and not with_kernels:
      print(f"{name}: the kernels do not support {(n, t, d)}; timing the reference only")
    if args.check and with_kernels:
      err = check((n, t, d), min(args.layers, 4), args.interpret)
      result.setdefault("check", {})[name] = err
      print(f"{name}: fused vs reference, float32 chain gradients: {err:.2e} relative RMS",
            flush=True)
    timed = [(form, lambda form=form, shape=(n, t, d): time_chain(
        block_norms(form, args.interpret), shape, args.layers, args.runs))
        for form in (FORMS if with_kernels else FORMS[:1])]
    time_chain_forms(rows, name, "form", timed, hbm_floor_us((n, t, d)))
  report_chain(rows, "form", result, args.json)


if __name__ == "__main__":
  main()

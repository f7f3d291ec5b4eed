"""Registers, spills and instruction counts of the project's Pallas GPU kernels, without a GPU:
`python scripts/triton_resources.py [--cases conv,adaln,gla] [--arch 90]`.

Needs the `triton` package (`pip install triton`; not a project dependency: about 300 MB, with
its own ptxas, cuobjdump and nvdisasm). For each case it lowers the kernels' training-step
functions (forward and gradient) for cuda at DiG-S/2's 1792 px shapes (the adaLN norm also at
XL's width), takes the Triton module each pallas_call lowers to, compiles it for sm_<arch> with
the installed triton and the call's own num_warps / num_stages, and prints what the cubin needs
per program: registers per thread, stack bytes (register spills) and static SASS instructions.
Case "dig" lowers a 2-block DiG-S/2 training loss at one 1792 px image: every kernel it runs.

What it is for: a first filter for kernel variants where no GPU is lent (a variant that spills,
or doubles the instructions of a kernel already latency-bound, rarely wins). XLA compiles with
its own bundled Triton, whose allocation can differ: compare variants with each other in one
run, and time what passes on a GPU (`scripts/step_ab.py`, the kernel benches).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _conv_cases():
  import jax
  import jax.numpy as jnp

  from kernels_pallas.conv import depthwise_conv3x3, gated_residual_conv3x3
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  shape, bf = (1, 112, 112, 384), jnp.bfloat16
  x, branch, dy = (jax.random.normal(k, shape, bf) for k in ks[:3])
  gate, kernel, bias = jax.random.normal(ks[3], (1, 384), bf), jnp.ones((3, 3, 384)), jnp.zeros(384)
  conv = lambda x, k, b: jnp.sum(depthwise_conv3x3(x, k, b, backend="pallas_gpu") * dy)
  residual = lambda *a: jnp.sum(gated_residual_conv3x3(*a, backend="pallas_gpu") * dy)
  return [(jax.value_and_grad(conv, argnums=(0, 1, 2)), (x, kernel, bias)),
          (jax.value_and_grad(residual, argnums=(0, 1, 2, 3, 4)),
           (x, gate, branch, kernel, bias))]


def _adaln_cases():
  import jax
  import jax.numpy as jnp

  from kernels_pallas.adaln import (layer_norm_modulate, layer_norm_modulate_with_input,
                                    residual_layer_norm_modulate)
  cases = []
  for t, d in ((12544, 384), (16384, 1152)):
    ks = jax.random.split(jax.random.PRNGKey(d), 3)
    x, branch = (jax.random.normal(k, (1, t, d), jnp.bfloat16) for k in ks[:2])
    vec = jax.random.normal(ks[2], (1, d), jnp.bfloat16)
    norm = lambda x, s, c: jnp.sum(layer_norm_modulate(x, s, c, backend="pallas_gpu") * x)

    def residual(x, gate, branch, shift, scale):
      h, y = residual_layer_norm_modulate(x, gate, branch, shift, scale, backend="pallas_gpu")
      return jnp.sum(h * branch) + jnp.sum(y * x)

    def with_input(x, shift, scale):
      x_out, y = layer_norm_modulate_with_input(x, shift, scale, backend="pallas_gpu")
      return jnp.sum(x_out * x) + jnp.sum(y * x)

    cases += [(jax.value_and_grad(norm, argnums=(0, 1, 2)), (x, vec, vec)),
              (jax.value_and_grad(with_input, argnums=(0, 1, 2)), (x, vec, vec)),
              (jax.value_and_grad(residual, argnums=(0, 1, 2, 3, 4)),
               (x, vec, branch, vec, vec))]
  return cases


def _gla_cases():
  import jax
  import jax.numpy as jnp

  from kernels_pallas.gla import chunk_gla
  b, t, h, k, v = 1, 12544, 6, 32, 64
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  q, kk = (jax.random.normal(key, (b, t, h, k), jnp.bfloat16) for key in ks[:2])
  vv = jax.random.normal(ks[2], (b, t, h, v), jnp.bfloat16)
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h, k))) / 16
  do = jax.random.normal(ks[4], (b, t, h, v), jnp.bfloat16)
  loss = lambda *a: jnp.sum(chunk_gla(*a, backend="pallas_gpu")[0] * do)
  return [(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), (q, kk, vv, g))]


def _dig_cases():
  """A 2-block DiG-S/2 at one 1792 px image (a row scan and a column scan), every kernel."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from dig_jax.models import create_model
  model = create_model("DiG-S/2", input_size=224, in_channels=4, num_classes=1000, depth=2,
                       dtype=jnp.bfloat16, gla_backend="pallas_gpu", conv_backend="pallas_gpu",
                       elementwise_backend="pallas_gpu", rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 224, 224, 4))
  t, y = jnp.array([500]), jnp.array([3])
  loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(x, t, y) ** 2)
  return [(jax.value_and_grad(loss), (params,))]


CASES = {"conv": _conv_cases, "adaln": _adaln_cases, "gla": _gla_cases, "dig": _dig_cases}


def lowered_kernels(fn, args):
  """[(kernel name, Triton module asm, num_warps, num_stages)] of every pallas_call in fn's cuda
  lowering (identical modules once)."""
  import jax
  from jax._src.pallas.triton import lowering

  modules = collections.defaultdict(list)
  original = lowering.lower_jaxpr_to_triton_module

  def capture(*a, **kw):
    result = original(*a, **kw)
    asm = result.module.operation.get_asm(enable_debug_info=False)
    name = re.search(r"tt\.func public @(\w+)", asm).group(1)
    if asm not in modules[name]:
      modules[name].append(asm)
    return result

  lowering.lower_jaxpr_to_triton_module = capture
  try:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  finally:
    lowering.lower_jaxpr_to_triton_module = original
  settings = collections.defaultdict(set)
  for m in re.finditer(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+)', text):
    settings[m.group(1)].add((int(m.group(3)), int(m.group(2))))
  return [(name, asm, warps, stages) for name, asms in modules.items() for asm in asms
          for warps, stages in sorted(settings[name])]


def resources(asm, warps, stages, arch):
  """{registers, stack, sass} of one Triton module compiled for sm_<arch>."""
  import triton
  from triton.backends.compiler import GPUTarget

  tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
  with tempfile.TemporaryDirectory() as tmp:
    src, cubin = os.path.join(tmp, "kernel.ttir"), os.path.join(tmp, "kernel.cubin")
    with open(src, "w") as f:
      f.write(asm)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": warps, "num_stages": stages})
    with open(cubin, "wb") as f:
      f.write(kernel.asm["cubin"])
    usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin],
                           capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cubin],
                          capture_output=True, text=True, check=True).stdout
  found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
  instructions = sum(1 for line in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line))
  return {"registers": int(found.group(1)), "stack": int(found.group(2)), "sass": instructions}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[1:]))
  parser.add_argument("--cases", default="conv,adaln,gla",
                      help=f"comma-separated, of {', '.join(CASES)} (default: %(default)s)")
  parser.add_argument("--arch", type=int, default=90, help="compute capability (default 90)")
  args = parser.parse_args(argv)
  names = [c for c in args.cases.split(",") if c]
  unknown = sorted(set(names) - set(CASES))
  if unknown or not names:
    parser.error(f"--cases: unknown {unknown}; expected some of {', '.join(CASES)}")
  try:
    import triton  # noqa: F401
  except ImportError:
    parser.error("needs the triton package: pip install triton")
  print("| case | kernel | warps | stages | registers | stack bytes | SASS instructions |")
  print("|---|---|---|---|---|---|---|")
  for case in names:
    kernels = []  # each distinct kernel of the case once, in lowering order
    for fn, fn_args in CASES[case]():
      kernels += [k for k in lowered_kernels(fn, fn_args) if k not in kernels]
    for name, asm, warps, stages in kernels:
      try:
        r = resources(asm, warps, stages, args.arch)
        print(f"| {case} | {name} | {warps} | {stages} | {r['registers']} | {r['stack']} | "
              f"{r['sass']} |", flush=True)
      except Exception as e:  # another Triton's dialect: say which kernel, go on
        print(f"| {case} | {name} | {warps} | {stages} | failed: "
              f"{type(e).__name__}: {str(e).splitlines()[0][:120]} | | |", flush=True)


if __name__ == "__main__":
  main()

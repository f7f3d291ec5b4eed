"""Benchmark of the GLA backends: `python -m kernels_pallas.bench [--shape B,T,H,K,V] [--json FILE]`.

Times the forward and forward+backward of every backend available on the default device
(the jnp reference everywhere; the Pallas kernel of the platform) at DiG's anchor shapes, and
softmax attention (`jax.nn.dot_product_attention`, cuDNN on GPU) at the matching DiT shape.
bf16 q, k, v and fp32 log-gates (DiG's: log_sigmoid(x) / 16); warm-up, then the median of
many runs, rotating among input sets so that small shapes do not run from L2.
`--check` first compares every backend with the token-by-token reference on this device (the
GPU kernel twice: with sequence blocks, and as one block walked backward in halves).
`--variants C64D16,L4W8,old=PATH` also times the GPU kernel with other settings (chunk, diagonal
block, chunks per sequence block, warps, pipelining stages), and an older kernel module (a copy
of a previous pallas_gpu.py) through the same custom_vjp, side by side.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.gla import api, chunk_gla, pallas_gpu, reference
from kernels_pallas.settings import module_settings

# name: (B, T, GLA heads, K, V, DiT heads, DiT head dim); perf.md's anchors.
ANCHORS = {
    "S/2@256": (64, 256, 6, 32, 64, 6, 64),
    "S/2@1024": (8, 4096, 6, 32, 64, 6, 64),
    "S/2@1792": (2, 12544, 6, 32, 64, 6, 64),
    "XL/2@2048": (1, 16384, 18, 32, 64, 16, 72),
}
HBM_BYTES_PER_S = 3.0e12  # measured copy bandwidth of an H100 here (perf.md)
KERNEL_OF_PLATFORM = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}


def hbm_floor_ms(b, t, h, kd, vd):
  """Fewest bytes of GLA fwd+bwd (bf16 q k v o do dq dk dv, fp32 g dg) over HBM bandwidth."""
  return b * h * t * (24 * kd + 10 * vd) / HBM_BYTES_PER_S * 1e3


def median_ms(fn, input_sets, runs, batch_ms=2.0):
  """Median time of one call. Each timed sample is a batch of back-to-back calls lasting about
  `batch_ms` (one sync per batch): single synced calls of well under a millisecond measured
  launch gaps and low clocks as much as the kernels (20-40 % spread between runs)."""
  for args in input_sets:  # compile and warm up
    jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*input_sets[0]))
  per_batch = max(1, math.ceil(batch_ms / 1e3 / (time.perf_counter() - start)))
  times = []
  for i in range(runs):
    start = time.perf_counter()
    for j in range(per_batch):
      out = fn(*input_sets[(i + j) % len(input_sets)])
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / per_batch)
  return statistics.median(times) * 1e3


def parse_ints(text, count, what):
  """"2,8,8,32" -> (2, 8, 8, 32): `count` positive integers, else a ValueError naming `what`."""
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    values = ()
  if len(values) != count or min(values) < 1:
    raise ValueError(f"{what} {text!r}: expected {count} positive integers separated by commas")
  return values


def chain_table(rows, label):
  """The markdown table of the layer-chain benches (conv, adaLN): one row per shape and
  `label` (the rows' key naming what was timed)."""
  lines = [f"| shape | {label} | fwd us/layer | fwd+bwd us/layer | x floor | speed-up vs jnp |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['shape']} | {r[label]} | {r['fwd_us']:.1f} | {r['fwd_bwd_us']:.1f} | "
                 f"{r['floor_multiple']:.1f} | {r['speedup_vs_reference']:.2f}x |")
  return "\n".join(lines)


def time_chain_forms(rows, shape_name, label, timed, floor_us):
  """The layer-chain benches' timing loop: each (form, run) of `timed` in order, the first
  being the jnp reference, run() giving (fwd, fwd+bwd) microseconds per layer; appends one row
  per form to `rows` (keyed `label` for the form) and prints it."""
  ref_us = None
  for form, run in timed:
    fwd, both = run()
    ref_us = ref_us or both
    rows.append({"shape": shape_name, label: form, "fwd_us": fwd, "fwd_bwd_us": both,
                 "floor_multiple": both / floor_us, "speedup_vs_reference": ref_us / both})
    print(f"{shape_name} {form}: fwd {fwd:.1f} us, fwd+bwd {both:.1f} us per layer", flush=True)


def report_chain(rows, label, result, json_path=None):
  """Prints the chain benches' table and, with `json_path`, writes `result` with the rows."""
  print(chain_table(rows, label))
  if json_path:
    with open(json_path, "w") as f:
      json.dump(dict(result, rows=rows), f, indent=1)


def worst_relative_rms(got, want) -> float:
  """The largest relative RMS difference over pairs of arrays; inf where any is not finite
  (Python's max would skip a NaN that is not first)."""
  worst = 0.0
  for a, b in zip(got, want):
    err = float(jnp.sqrt(jnp.mean((a - b) ** 2) / jnp.mean(b ** 2)))
    worst = max(worst, err if math.isfinite(err) else math.inf)
  return worst


def _gla_inputs(key, b, t, h, kd, vd):
  ks = jax.random.split(key, 5)
  q, k = (jax.random.normal(ks[i], (b, t, h, kd), jnp.bfloat16) for i in range(2))
  v = jax.random.normal(ks[2], (b, t, h, vd), jnp.bfloat16)
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h, kd))) / 16
  do = jax.random.normal(ks[4], (b, t, h, vd), jnp.bfloat16)
  return q, k, v, g, do


def _timed_pair(f, input_sets, runs):
  """(fwd ms, fwd+bwd ms) of f(q, k, v, ...) -> o."""
  fwd = jax.jit(lambda *a: f(*a[:-1]))

  def fwd_bwd(*a):
    o, vjp = jax.vjp(f, *a[:-1])
    return vjp(a[-1])

  return median_ms(fwd, input_sets, runs), median_ms(jax.jit(fwd_bwd), input_sets, runs)


def _n_sets(nbytes):
  return 3 if nbytes < 256 * 2**20 else 1


_SETTINGS = {"C": "CHUNK", "D": "DIAG", "L": "BLOCK_CHUNKS", "S": "RECOMPUTE_STATES",
             "N": "NUM_STAGES", "T": "V_TILE_PROGRAMS"}
_WARPS_OF = {"W": "default", "F": "gla_fwd", "B": "gla_bwd"}  # warps: all, forward, backward
_FORWARD_WALKS = ("gla_fwd", "gla_fwd_states")  # letter P: their pipelining stages
_REGISTERS_OF = {"R": "gla_bwd", "Q": "gla_fwd"}  # register caps: backward / forward walk


def _variant_fn(variant):
  """(label, f(q, k, v, g) -> o, pallas_gpu settings) of one `--variants` entry: letters
  C (chunk), D (diagonal block of chunk_math's scheme), L (chunks per sequence block),
  S (1: the backward recomputes the per-chunk states, 0: the forward stores them),
  N (software-pipelining stages of every kernel's chunk loop), P (stages of the two forward
  walks only), W (warps of every kernel), F / B (warps of the forward / backward output
  kernel), T (programs below which the forward walks split V), R / Q (register cap of the
  backward walk / the forward output walk), each followed by a number,
  e.g. C64D16B8 or R168; or old=PATH."""
  if variant.startswith("old="):
    import importlib.util
    spec = importlib.util.spec_from_file_location("pallas_gpu_old", variant[4:])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    api._KERNELS["pallas_gpu_old"] = module

    def f(q, k, v, g):
      o, _ = api._run_pallas(q, k, v, g, None, q.shape[-1] ** -0.5, False, "pallas_gpu_old",
                             False)
      return o
    return "pallas_gpu (old)", f, {}
  parts = re.findall(r"([A-Z])(\d+)", variant)
  letters = sorted({**_SETTINGS, **_WARPS_OF, **_REGISTERS_OF, "P": None})
  if not parts or "".join(a + b for a, b in parts) != variant or any(
      a not in letters for a, _ in parts):
    raise ValueError(f"unknown variant {variant!r}: expected letters {letters} "
                     f"each with a number (e.g. C64D16W8), or old=PATH")
  settings, warps, registers = {}, {}, {}
  for letter, number in parts:
    if letter in _WARPS_OF:
      warps[_WARPS_OF[letter]] = int(number)
    elif letter in _REGISTERS_OF:
      registers[_REGISTERS_OF[letter]] = int(number)
    elif letter != "P":
      settings[_SETTINGS[letter]] = int(number)
  if warps:
    settings["NUM_WARPS"] = warps
  if registers:
    settings["MAX_REGISTERS"] = registers
  for letter, number in parts:
    if letter == "P":  # on top of N's or the module's stages
      stages = settings.get("NUM_STAGES", pallas_gpu.NUM_STAGES)
      stages = dict(stages) if isinstance(stages, dict) else {"default": stages}
      settings["NUM_STAGES"] = {**stages, **{k: int(number) for k in _FORWARD_WALKS}}
  f = lambda q, k, v, g: chunk_gla(q, k, v, g, backend="pallas_gpu")[0]
  return f"pallas_gpu {variant}", f, settings


def bench_shape(name, b, t, h, kd, vd, att_heads, att_dim, backends, runs, variants=()):
  rows = []
  per_set = b * t * h * (3 * kd * 2 + 2 * vd * 2)
  sets = [_gla_inputs(jax.random.PRNGKey(i), b, t, h, kd, vd) for i in range(_n_sets(per_set))]
  floor = hbm_floor_ms(b, t, h, kd, vd)
  fns = [(backend, lambda q, k, v, g, backend=backend: chunk_gla(q, k, v, g, backend=backend)[0],
          {}) for backend in backends] + [_variant_fn(x) for x in variants]
  for backend, f, settings in fns:
    try:
      with module_settings(pallas_gpu, settings):
        fwd, fwd_bwd = _timed_pair(f, sets, runs)
      rows.append(dict(backend=backend, shape=name, B=b, T=t, H=h, K=kd, V=vd, fwd_ms=fwd,
                       fwd_bwd_ms=fwd_bwd, x_hbm_floor=fwd_bwd / floor))
    except Exception as e:  # keep the table going: one failing backend is a result too
      rows.append(dict(backend=backend, shape=name, error=repr(e)[:300]))
  if att_heads and jax.default_backend() == "gpu":
    ks = jax.random.split(jax.random.PRNGKey(7), 4 * len(sets))
    att_sets = [tuple(jax.random.normal(ks[4 * s + i], (b, t, att_heads, att_dim), jnp.bfloat16)
                      for i in range(4)) for s in range(len(sets))]
    att = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    try:
      fwd, fwd_bwd = _timed_pair(att, att_sets, runs)
      rows.append(dict(backend="cudnn attention (DiT)", shape=name, B=b, T=t, H=att_heads,
                       D=att_dim, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd))
    except Exception as e:
      rows.append(dict(backend="cudnn attention (DiT)", shape=name, error=repr(e)[:300]))
  ref = next((r for r in rows if r["backend"] == "reference" and "error" not in r), None)
  for r in rows:
    if ref and "error" not in r:
      r["speedup_vs_ref"] = ref["fwd_bwd_ms"] / r["fwd_bwd_ms"]
  return rows


# The GPU kernel's paths at check's shape (6 sequences of 19 chunks): by default two sequence
# blocks; "halves" runs one forward block whose backward walks it as two (the path DiG-S/2
# takes at 256 px: 384 sequences of 16 chunks, more than the GPU's 264 backward slots).
_CHECK_GPU_PATHS = {"": {}, " halves": {"BLOCK_CHUNKS": 32, "BWD_BLOCK_CHUNKS": 10}}


def check(backends, interpret=False):
  """Relative RMS error of output, final state and all gradients vs recurrent_gla; the GPU
  kernel on each of `_CHECK_GPU_PATHS`. interpret: run the Pallas kernels in interpret mode."""
  b, t, h, kd, vd = 2, 300, 3, 32, 64
  q, k, v, g, do = _gla_inputs(jax.random.PRNGKey(11), b, t, h, kd, vd)
  ks = jax.random.split(jax.random.PRNGKey(12), 2)
  h0, dht = (jax.random.normal(kk, (b, h, kd, vd)) for kk in ks)
  results = []
  for reverse in (False, True):
    def grads(fn):
      run = lambda *a: fn(*a[:4], initial_state=a[4], output_final_state=True, reverse=reverse)
      (o, ht), vjp = jax.vjp(run, q, k, v, g, h0)
      return (o, ht) + vjp((do.astype(o.dtype), dht))
    up = lambda x: x.astype(jnp.float32)
    want = grads(lambda q, k, v, g, **kw: reference.recurrent_gla(up(q), up(k), up(v), g, **kw))
    runs = [(backend, "", {}) for backend in backends if backend != "pallas_gpu"]
    if "pallas_gpu" in backends:
      runs += [("pallas_gpu", path, settings) for path, settings in _CHECK_GPU_PATHS.items()]
    for backend, path, settings in runs:
      with module_settings(pallas_gpu, settings):
        got = grads(lambda *a, **kw: chunk_gla(*a, backend=backend, interpret=interpret, **kw))
      err = {n: float(np.sqrt(np.mean((np.float64(x) - np.float64(y)) ** 2) /
                              np.mean(np.float64(y) ** 2)))
             for n, x, y in zip(("o", "ht", "dq", "dk", "dv", "dg", "dh0"), got, want)}
      results.append(dict(backend=backend + path, reverse=reverse, **err))
      print(f"check {backend + path:17s} reverse={reverse!s:5s} " +
            " ".join(f"{n}={e:.1e}" for n, e in err.items()), flush=True)
  return results


def _table(rows):
  head = ("backend", "shape", "fwd ms", "fwd+bwd ms", "x HBM floor", "speed-up vs ref")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['backend']} | {r['shape']} | error: {r['error'][:80]} | | | |")
      continue
    floor = f"{r['x_hbm_floor']:.1f}" if "x_hbm_floor" in r else "-"
    lines.append(f"| {r['backend']} | {r['shape']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} "
                 f"| {floor} | {r.get('speedup_vs_ref', float('nan')):.1f}x |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", action="append", default=[],
                      help="B,T,H,K,V (repeatable); default: the four anchor shapes")
  parser.add_argument("--only", default="", help="comma-separated anchor names to run")
  parser.add_argument("--runs", type=int, default=30, help="timed runs per measurement")
  parser.add_argument("--check", action="store_true", help="check accuracy first")
  parser.add_argument("--json", help="write the rows to this file")
  parser.add_argument("--variants", default="",
                      help="comma-separated GPU kernel settings: C<chunk>, D<diag block>, "
                           "L<chunks per block>, S<1 recompute / 0 store chunk states>, "
                           "N<pipelining stages>, P<stages of the forward walks>, W<warps>, "
                           "F/B<forward/backward kernel warps>, "
                           "T<programs below which forward walks split V>, "
                           "combined (C64D16B8); or old=PATH")
  args = parser.parse_args(argv)

  platform = jax.default_backend()
  backends = ["reference"] + ([KERNEL_OF_PLATFORM[platform]] if platform in KERNEL_OF_PLATFORM
                              else [])
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; backends {backends}",
        flush=True)
  checks = check(backends) if args.check else []
  shapes = {}
  for s in args.shape:
    try:
      b, t, h, kd, vd = (int(x) for x in s.split(","))
    except ValueError:
      parser.error(f"--shape wants five integers B,T,H,K,V, got {s!r}")
    shapes[s] = (b, t, h, kd, vd, None, None)
  if not args.shape:
    names = args.only.split(",") if args.only else list(ANCHORS)
    unknown = set(names) - set(ANCHORS)
    if unknown:
      parser.error(f"unknown anchor(s) {sorted(unknown)}; known: {list(ANCHORS)}")
    shapes = {n: ANCHORS[n] for n in names}
  rows = []
  for name, shape in shapes.items():
    variants = [x for x in args.variants.split(",") if x]
    new = bench_shape(name, *shape, backends=backends, runs=args.runs, variants=variants)
    rows += new
    print(_table(new), flush=True)
  print("\n" + _table(rows))
  if args.json:
    with open(args.json, "w") as fh:
      json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                 "rows": rows, "checks": checks}, fh, indent=1)


if __name__ == "__main__":
  main()

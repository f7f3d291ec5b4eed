"""Where one training step's GPU time goes, by model source line: `python scripts/step_profile.py
DiG-S/2 --px 256 --batch 64 [--impl pallas_gpu] [--depth N] [--steps 5] [--top 40]`.

Builds the step `dig_jax.bench` times (make_train_step, bf16 compute, AdamW, EMA), compiles it
with an XLA dump, runs a few steps under `jax.profiler.trace`, and sums each GPU kernel's device
time per step four ways: by the innermost dig_jax / kernels_pallas source line of the HLO op
that launched it (from the optimised HLO's stack frames, scripts/xla_peak_buffers.py), by op
name, by kernel (with the fusion's output shape), and by family (matmuls, GLA, conv, attention,
the model's XLA fusions, the rest). Kernels that are not XLA fusions (cuBLAS, cuDNN, Pallas
calls) keep their own names. Also prints the GPU busy time against the step time:
a step much longer than its busy time is bound by launches or the host.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xla_peak_buffers  # noqa: E402


def gpu_kernel_events(trace: dict) -> list[dict]:
  """Complete events ("X") on the trace's GPU device rows."""
  names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  return [e for e in trace["traceEvents"]
          if e.get("ph") == "X" and "/device:GPU" in names.get(e["pid"], "")]


def _key(name: str) -> str:  # kernel names spell HLO's "fusion.12" as "fusion_12"
  return name.replace(".", "_").replace("-", "_")


def attribute(events: list[dict], hlo_text: str, steps: int):
  """(by source line, by op name, by kernel) Counters of device microseconds per step, and
  kernel name -> (launches per step, output shape, source line)."""
  insts = xla_peak_buffers.instructions(hlo_text, xla_peak_buffers._frames(hlo_text))
  by_name = {_key(k): v for k, v in insts.items()}
  lines, ops, kernels = (collections.Counter() for _ in range(3))
  info, launches = {}, collections.Counter()
  for e in events:
    name = e["name"]
    shape, op, where = by_name.get(_key(name), ("", name, "-"))
    us = e["dur"] / steps
    lines[where] += us
    ops[re.sub(r"\d+", "#", "/".join(op.split("/")[-2:]))] += us
    kernels[name] += us
    launches[name] += 1
    info[name] = (re.sub(r"\{[^}]*\}", "", shape), where)
  return lines, ops, kernels, {k: (launches[k] / steps,) + info[k] for k in kernels}


# Kernel families by kernel name (first match wins); XLA's own fusions are split by whether
# their source line is in the model's files.
_FAMILIES_BY_NAME = (("GLA kernels", ("gla_",)), ("conv kernels", ("depthwise_conv", "gated_residual_conv")),
                     ("SwiGLU / gated-norm kernels", ("swiglu_", "gated_norm_")),
                     ("matmuls", ("nvjet", "gemm", "xmma", "cutlass")),
                     ("attention (cuDNN)", ("sdpa", "flash", "cudnn")))
_MODEL_PACKAGES = ("dig_jax/models", "kernels_pallas")


def model_files(root=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")):
  """Basenames of the model's source files, as the source lines name them."""
  return {os.path.basename(f) for pkg in _MODEL_PACKAGES
          for f in glob.glob(os.path.join(root, pkg, "**", "*.py"), recursive=True)}


def families(kernels, info, model_basenames):
  """Counter of device microseconds per step by kernel family."""
  out = collections.Counter()
  for name, us in kernels.items():
    family = next((f for f, keys in _FAMILIES_BY_NAME if any(k in name for k in keys)), None)
    if family is None:
      in_model = info[name][2].split(":")[0] in model_basenames
      family = "model's XLA fusions" if in_model else "other (optimizer, loss, copies)"
    out[family] += us
  return out


def print_report(lines, ops, kernels, info, top):
  print("--- by family (us per step)")
  for k, v in families(kernels, info, model_files()).most_common():
    print(f"{v:10.1f}  {k}")
  print("--- by source line (us per step; '-': not an XLA op of the model, e.g. a library or "
        "Pallas kernel)")
  for k, v in lines.most_common(top):
    print(f"{v:10.1f}  {k}")
  print("--- by op name")
  for k, v in ops.most_common(top):
    print(f"{v:10.1f}  {k[:90]}")
  print("--- by kernel (us per step, launches per step, output shape, source line)")
  for k, v in kernels.most_common(top):
    n, shape, where = info[k]
    print(f"{v:10.1f} {n:6.1f}x  {k[:40]:40s} {shape[:40]:40s} {where}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("model")
  parser.add_argument("--px", type=int, default=256)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--impl", default=None, help="GLA backend or DiT attention")
  parser.add_argument("--depth", type=int, default=None)
  parser.add_argument("--optimizer_layout", default="auto", choices=("auto", "flat", "per_leaf"),
                      help="dig_jax.bench's: which arrays share one vector")
  parser.add_argument("--steps", type=int, default=5, help="traced steps")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--top", type=int, default=40)
  parser.add_argument("--out", default=None, help="where the dump and trace go (default: temp)")
  args = parser.parse_args()
  out = args.out or tempfile.mkdtemp(prefix="step_profile_")
  dump = os.path.join(out, "xla_dump")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}"
                             " --xla_dump_hlo_module_re=jit_step")
  import jax

  from dig_jax import bench
  impl = args.impl or ("auto" if args.model.startswith("DiG") else "cudnn")
  config = dict(model=args.model, px=args.px, batch=args.batch, impl=impl, dtype="bfloat16",
                optimizer_layout=args.optimizer_layout)
  if args.depth:
    config["depth"] = args.depth
  step, init_state, _, latent = bench._build(config)
  state = init_state()
  batches = bench._batches(args.batch, latent)
  state, _, times = bench._time_steps(step, state, batches, 10, args.warmup)
  trace_dir = os.path.join(out, "trace")
  with jax.profiler.trace(trace_dir):
    bench._time_steps(step, state, batches, args.steps, 0)
  trace = json.load(gzip.open(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]))
  events = gpu_kernel_events(trace)
  if not events:
    raise SystemExit("no GPU kernels in the trace: run this on a GPU")
  hlo = sorted(glob.glob(f"{dump}/*jit_step*after_optimizations.txt"), key=os.path.getsize)[-1]
  lines, ops, kernels, info = attribute(events, open(hlo).read(), args.steps)
  step_us = sorted(times)[len(times) // 2] * 1e6
  print(f"{args.model} {args.px} px, batch {args.batch}, {impl}: step {step_us:.0f} us (untraced "
        f"median), GPU busy {sum(kernels.values()):.0f} us per step, "
        f"{len(events) / args.steps:.0f} kernels per step; dump and trace in {out}")
  print_report(lines, ops, kernels, info, args.top)


if __name__ == "__main__":
  main()

"""Times fla's Triton `chunk_gla` (the kernel library the reference DiG trains with) at the GLA
anchors of `kernels_pallas.bench`, for the side-by-side rows of BENCHMARKS.md.

Not part of the test suite: it needs a CUDA GPU, torch with Triton, and fla, e.g. the two
pure-Python wheels of fla 0.6.0 (`pip download --no-deps fla-core==0.6.0
flash-linear-attention==0.6.0` on a machine with network, then `pip install --no-deps --target
/tmp/fla *.whl` on the GPU machine):

  PYTHONPATH=$PWD:/tmp/fla python scripts/fla_chunk_gla_time.py --json fla.jsonl

Per anchor it reports two times of forward+backward: the wall time a PyTorch user sees
(`triton.testing.do_bench`, median) and the sum of the GPU kernels' own times over one call
(torch.profiler), since one call launches 18 GPU kernels (fla's and torch's elementwise ones)
and its wall time depends on the host. The first calls per shape run fla's Triton autotuning: allow
three to four minutes per anchor on a fresh machine (less once Triton's cache holds them).
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from fla.ops.gla import chunk_gla
from kernels_pallas.bench import ANCHORS


def _inputs(batch, tokens, heads, kd, vd):
  """bf16 q, k, v; float32 log-gates shaped like DiG's (log_sigmoid(x) / 16); a cotangent."""
  def rand(d, dtype=torch.bfloat16):
    return torch.randn(batch, tokens, heads, d, device="cuda", dtype=dtype)
  g = torch.nn.functional.logsigmoid(rand(kd, torch.float32)) / 16
  leaves = [x.requires_grad_(True) for x in (rand(kd), rand(kd), rand(vd), g)]
  return leaves, rand(vd)


def _kernel_ms(fn, calls):
  """Mean over `calls` calls of the summed device time of the GPU kernels one call launches."""
  torch.cuda.synchronize()
  with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(calls):
      fn()
    torch.cuda.synchronize()
  kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
  return sum(e.time_range.elapsed_us() for e in kernels) / calls / 1e3, len(kernels) / calls


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", default=",".join(ANCHORS),
                      help=f"comma-separated anchors (default: all of {list(ANCHORS)})")
  parser.add_argument("--profile_calls", type=int, default=20,
                      help="calls averaged for the GPU kernel time (default 20)")
  parser.add_argument("--json", help="append one JSON line per anchor to this file")
  args = parser.parse_args()
  names = args.only.split(",")
  unknown = [n for n in names if n not in ANCHORS]
  if unknown:
    parser.error(f"unknown anchor(s) {unknown}; known: {list(ANCHORS)}")

  print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}", flush=True)
  print("| shape | fla fwd ms (wall) | fla fwd+bwd ms (wall) | fla fwd+bwd GPU kernels ms | "
        "kernels per call |\n|---|---|---|---|---|", flush=True)
  for name in names:
    batch, tokens, heads, kd, vd = ANCHORS[name][:5]
    (q, k, v, g), do = _inputs(batch, tokens, heads, kd, vd)

    def forward():
      return chunk_gla(q, k, v, g, scale=kd ** -0.5)[0]

    def forward_backward():
      forward().backward(do)

    fwd_ms = do_bench(forward, warmup=50, rep=200, return_mode="median")
    fwd_bwd_ms = do_bench(forward_backward, warmup=50, rep=200, return_mode="median")
    kernel_ms, kernels = _kernel_ms(forward_backward, args.profile_calls)
    row = dict(impl="fla.chunk_gla", shape=name, B=batch, T=tokens, H=heads, K=kd, V=vd,
               fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms, fwd_bwd_kernel_ms=kernel_ms,
               kernels_per_call=kernels)
    print(f"| {name} | {fwd_ms:.3f} | {fwd_bwd_ms:.3f} | {kernel_ms:.3f} | {kernels:.0f} |",
          flush=True)
    if args.json:
      with open(args.json, "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()

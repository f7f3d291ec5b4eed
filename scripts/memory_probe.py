"""One training step's memory, by buffer: `python scripts/memory_probe.py DiG-S/2 --px 256
--batch 64 [--impl pallas_gpu] [--depth N] [--steps 10] [--dump DIR] [--top 40] [--no_dump]`.

Builds the step `dig_jax.bench` times (make_train_step, bf16 compute, AdamW, EMA), compiles it
with an XLA dump, prints `memory_analysis()` (temp = activations and scratch), the buffers live
at XLA's planned peak grouped by the model line that made them (scripts/xla_peak_buffers.py),
then runs the step and prints the median step time and the device's `peak_bytes_in_use`.
Run one configuration per process (peak_bytes_in_use is per process).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("model")
  parser.add_argument("--px", type=int, default=256)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--impl", default=None, help="GLA backend or DiT attention")
  parser.add_argument("--depth", type=int, default=None)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--dump", default=None)
  parser.add_argument("--top", type=int, default=40)
  parser.add_argument("--no_dump", action="store_true", help="skip the dump and buffer list")
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args()
  dump = args.dump or tempfile.mkdtemp(prefix="xla_dump_")
  if not args.no_dump:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}"
                               " --xla_dump_hlo_module_re=jit_step")
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import statistics

  import jax

  from dig_jax import bench
  import xla_peak_buffers

  gpu = jax.default_backend() == "gpu"
  impl = args.impl or (("pallas_gpu" if gpu else "reference") if args.model.startswith("DiG")
                       else ("cudnn" if gpu else "xla"))
  config = dict(model=args.model, px=args.px, batch=args.batch, impl=impl, dtype="bfloat16",
                depth=args.depth)
  step, init_state, _, latent = bench._build(config)
  state = init_state()
  batches = bench._batches(args.batch, latent)
  compiled = step.lower(state, batches[0]).compile()
  mem = compiled.memory_analysis()
  tokens = args.batch * (latent // int(args.model.split("/")[1])) ** 2
  print(f"{args.model} {impl} {args.px} px batch {args.batch} ({tokens} tokens), "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
  print(f"memory_analysis: temp {mem.temp_size_in_bytes / 2**30:.3f} GiB, arguments "
        f"{mem.argument_size_in_bytes / 2**30:.3f} GiB, outputs "
        f"{mem.output_size_in_bytes / 2**30:.3f} GiB, aliased "
        f"{mem.alias_size_in_bytes / 2**30:.3f} GiB")
  if not args.no_dump:
    head, rows = xla_peak_buffers.peak_buffers(dump)
    xla_peak_buffers.print_groups(head, rows, args.top, tokens)
  state, metrics, times = bench._time_steps(compiled, state, batches, args.steps, args.warmup)
  print(f"step {statistics.median(times) * 1e3:.2f} ms (median of {args.steps}; min "
        f"{min(times) * 1e3:.2f}), loss {float(metrics['loss']):.4f}, peak_bytes_in_use "
        f"{(bench._peak_bytes() or 0) / 2**30:.3f} GiB")


if __name__ == "__main__":
  main()

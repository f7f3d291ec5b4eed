"""Same-process A/B of whole training steps: the tree's code against older copies of modules.

  git show HEAD~1:kernels_pallas/gla/pallas_gpu.py > /tmp/old.py
  python scripts/step_ab.py --old kernels_pallas.gla.pallas_gpu=/tmp/old.py
      [--cases DiG-S/2:1792:1,DiG-S/2:256:64 --rounds 6 --steps 20]  (on the GPU)

For each case (model:px:batch) it compiles the `dig_jax.bench` training step twice in one
process, once as the tree has it ("new") and once with the module's names taken from the old
file while the step is traced ("old"), then times the two in alternating rounds, so both see
the same process, clocks and neighbours: a change of 1-2 % shows, where separate processes
differ by about that much from run to run. Prints median / min ms per step and XLA's temp
memory for each arm. The old file must be a drop-in copy of the module (same public names);
what it imports comes from the tree. --old may be given several times, for a change spread
over modules: the old files are loaded in that order, each with the earlier ones already in
place, so an old file's `from package.module import name` of an earlier one gets the old name
(e.g. --old dig_jax.train.optimizer=OPT --old dig_jax.train.step=STEP --old dig_jax.bench=BENCH).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_cases(spec: str) -> list[tuple[str, int, int]]:
  """"DiG-S/2:1792:1,DiG-S/2:256:64" -> [("DiG-S/2", 1792, 1), ("DiG-S/2", 256, 64)]."""
  cases = []
  for item in filter(None, (x.strip() for x in spec.split(","))):
    parts = item.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
      raise ValueError(f"--cases: expected model:px:batch, e.g. DiG-S/2:256:64; got {item!r}")
    cases.append((parts[0], int(parts[1]), int(parts[2])))
  if not cases:
    raise ValueError("--cases: no case given")
  return cases


def load_old(spec: str):
  """"package.module=path/to/old.py" -> (the tree's module, the old file as a module)."""
  name, sep, path = spec.partition("=")
  if not sep or not name or not path:
    raise ValueError(f"--old: expected module=path, e.g. kernels_pallas.gla.pallas_gpu=/tmp/old.py;"
                     f" got {spec!r}")
  if not os.path.isfile(path):
    raise ValueError(f"--old: no file {path!r}")
  module = importlib.import_module(name)
  file_spec = importlib.util.spec_from_file_location(f"{name}__old", path)
  old = importlib.util.module_from_spec(file_spec)
  file_spec.loader.exec_module(old)
  return module, old


@contextlib.contextmanager
def swapped(module, old):
  """Within the block, `module`'s names are the old module's (callers that look them up on the
  module, as the model's code does when it is traced, get the old code); restored after."""
  saved = dict(vars(module))
  names = [k for k in vars(old) if not k.startswith("__")]
  try:
    for k in names:
      setattr(module, k, getattr(old, k))
    yield
  finally:
    for k in names:
      if k in saved:
        setattr(module, k, saved[k])
      else:
        delattr(module, k)


def load_olds(specs: list[str]) -> list[tuple]:
  """[(module, old module)] for each "module=path" in order, each old file loaded with the
  earlier ones swapped in (so its imports of them get their old names)."""
  pairs = []
  with contextlib.ExitStack() as stack:
    for spec in specs:
      pairs.append(load_old(spec))
      stack.enter_context(swapped(*pairs[-1]))
  return pairs


@contextlib.contextmanager
def all_swapped(pairs):
  """`swapped` for every (module, old) pair at once."""
  with contextlib.ExitStack() as stack:
    for module, old in pairs:
      stack.enter_context(swapped(module, old))
    yield


def config(model: str, px: int, batch: int, *, steps: int, impl: str, depth: int | None) -> dict:
  """The `dig_jax.bench` training configuration its own command line would make."""
  from dig_jax import bench
  dig = model.startswith("DiG")
  if impl == "auto" and not dig:
    impl = "cudnn"
  argv = ["--models", model, "--resolutions", str(px), "--batch", str(batch), "--steps",
          str(steps), "--gla_backend" if dig else "--dit_attention", impl]
  if depth:
    argv += ["--depth", str(depth)]
  (cfg,) = bench.make_configs(bench.build_parser().parse_args(argv))
  return cfg


def run_case(cfg: dict, pairs, rounds: int) -> dict:
  """{"new": (median ms, min ms, temp GiB), "old": ...} for one configuration; `pairs`: the
  (module, old module) pairs of `load_olds`."""
  from dig_jax import bench
  arms = {}
  for name in ("new", "old"):
    with all_swapped(pairs) if name == "old" else contextlib.nullcontext():
      compiled, state, batches, _ = bench._compiled_step(cfg)
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", 0) / 2**30
    state, _, _ = bench._time_steps(compiled, state, batches, 0, cfg["warmup"])
    arms[name] = dict(step=compiled, state=state, batches=batches, times=[], temp=temp)
  for _ in range(rounds):
    for arm in arms.values():
      arm["state"], _, times = bench._time_steps(arm["step"], arm["state"], arm["batches"],
                                                 cfg["steps"], 0)
      arm["times"] += times
  return {name: (statistics.median(a["times"]) * 1e3, min(a["times"]) * 1e3, a["temp"])
          for name, a in arms.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[1:]))
  parser.add_argument("--old", required=True, action="append",
                      help="module=FILE: the old copy of one module, e.g. "
                           "kernels_pallas.gla.pallas_gpu=/tmp/old.py; repeat for several "
                           "modules (loaded in order)")
  parser.add_argument("--cases", default="DiG-S/2:256:64,DiG-S/2:1792:1",
                      help="comma-separated model:px:batch (default: %(default)s)")
  parser.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per arm and round")
  parser.add_argument("--impl", default="auto",
                      help="GLA backend (DiG) or attention (DiT) of both arms (default auto)")
  parser.add_argument("--depth", type=int, default=None, help="fewer blocks (quick checks)")
  args = parser.parse_args(argv)
  try:
    cases = parse_cases(args.cases)
    pairs = load_olds(args.old)
  except ValueError as e:
    parser.error(str(e))
  for model, px, batch in cases:
    cfg = config(model, px, batch, steps=args.steps, impl=args.impl, depth=args.depth)
    arms = run_case(cfg, pairs, args.rounds)
    (new_med, new_min, new_temp), (old_med, old_min, old_temp) = arms["new"], arms["old"]
    print(f"{model} {px} px, batch {batch}: old {old_med:.2f} / {old_min:.2f} ms, new "
          f"{new_med:.2f} / {new_min:.2f} ms (median / min; {100 * (new_med / old_med - 1):+.1f} %"
          f" median), XLA temp {old_temp:.2f} -> {new_temp:.2f} GiB", flush=True)


if __name__ == "__main__":
  main()

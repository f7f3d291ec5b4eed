"""Are two training runs' parameters the same? Prints max |a - b| per run pair and bitwise equality.

  python scripts/compare_runs.py WORKDIR_A WORKDIR_B [--step N]

Used to check exact resume on real hardware: an uninterrupted run against one that was stopped
and restarted (README "Exact resume").
"""
import sys

from absl import app, flags, logging

flags.DEFINE_integer("step", None, "Checkpoint step compared; default: each run's latest.")


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("expected two workdirs")
  logging.set_verbosity(logging.ERROR)
  import jax
  import numpy as np
  from flax import nnx

  from dig_jax.sample import load_run

  trees = []
  for workdir in argv[1:]:
    _, model, step = load_run(workdir, flags.FLAGS.step, ema=False)
    trees.append(jax.device_get(nnx.state(model, nnx.Param)))
    print(f"{workdir}: step {step}")
  a, b = (jax.tree.leaves(t) for t in trees)
  if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
    sys.exit("error: the runs hold different models")
  max_diff = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                 for x, y in zip(a, b))
  bitwise = all(np.array_equal(x, y) for x, y in zip(a, b))
  scale = max(float(np.max(np.abs(x))) for x in a)
  print(f"bitwise equal: {bitwise}; max |a - b| = {max_diff:.3e} (max |a| = {scale:.3e})")


if __name__ == "__main__":
  app.run(main)

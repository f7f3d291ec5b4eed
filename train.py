"""Train a class-conditional DiG (or DiT).

  python train.py --config configs/digits.py --workdir workdirs/digits
  python train.py --config configs/digits.py --workdir workdirs/digits --config.train.total_steps=100

Restarting the same command resumes from the newest checkpoint in --workdir. Ctrl-C or SIGTERM
saves a checkpoint at the current step and exits cleanly.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with an argument: configs/x.py[:arg]. "
    "Any field can be overridden: --config.train.total_steps=100.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and config.json; "
                    "an existing run there is resumed.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  from dig_jax.train.loop import NonFiniteLossError, train  # after flags: fast --help
  from dig_jax.train.validate import ConfigError
  try:
    step = train(flags.FLAGS.config, flags.FLAGS.workdir)
  except (ConfigError, NonFiniteLossError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(f"Training stopped at step {step}; checkpoints in {flags.FLAGS.workdir}/checkpoints")


def parse_flags(argv):
  """absl parsing, with a one-line message for an override of a config key that does not exist."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}")
  except (AttributeError, KeyError) as e:
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    sys.exit(f"error: unknown config key in {' '.join(bad)} ({e}); see the config file for "
             f"the keys that exist")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

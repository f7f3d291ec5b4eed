"""Train a class-conditional DiG (or DiT).

  python train.py --config configs/digits.py --workdir workdirs/digits
  python train.py --config configs/digits.py --workdir workdirs/digits --config.train.total_steps=100

Restarting the same command resumes from the newest checkpoint in --workdir. Ctrl-C or SIGTERM
saves a checkpoint at the current step and exits cleanly.
"""
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
  from dig_jax.train import train  # after flag parsing: keeps --help fast
  step = train(flags.FLAGS.config, flags.FLAGS.workdir)
  print(f"Training stopped at step {step}; checkpoints in {flags.FLAGS.workdir}/checkpoints")


if __name__ == "__main__":
  app.run(main)

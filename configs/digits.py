"""The demo: a tiny DiG trained in pixel space on the bundled MNIST-5k digits, on CPU.

    python train.py --config configs/digits.py --workdir workdirs/digits
    python train.py --config configs/digits.py:runlocal --workdir /tmp/smoke   # seconds, for tests

The recipe was picked by a sweep of 16 variants on a GPU (scripts/tune_demo.py with
scripts/demo_variants.txt; results in BENCHMARKS.md "Demo recipe"): for the same CPU time, a
96-wide single-head model trained for more steps beats the 128-wide one, and AdamW with
b2 = 0.99 and a cosine decay learns the class signal much sooner than a constant rate. 4,500
steps take 11-18 minutes on two CPU cores, depending on the machine; the samples are then
legible digits of the requested class (README "Demo results").
"""
from ml_collections import config_dict

from configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  args = common.parse_arg(arg, runlocal=False)
  config = common.base_config()

  config.model.name = "DiG-S/4"          # 32x32 pixels, patch 4 -> an 8x8 token grid
  config.model.depth = 4
  config.model.hidden_size = 96
  config.model.num_heads = 1             # d_k 48, d_v 96

  config.data.name = "digits"
  config.data.image_size = 32            # 28x28 digits centre-padded to 32x32
  config.data.channels = 1
  config.data.num_classes = 10

  config.train.global_batch_size = 32
  config.train.total_steps = 4500
  config.train.learning_rate = 4e-3
  config.train.lr_schedule = "cosine"
  config.train.adam_b2 = 0.99            # faster-adapting second moment: a short run
  config.train.warmup_steps = 200
  config.train.ema_decay = 0.995
  config.train.log_every = 50
  config.train.checkpoint_every = 1000

  config.sample.steps = 100
  config.sample.cfg_scale = 3.0          # the grids read best by eye (README "Demo results")

  if args.runlocal:
    common.shrink_for_runlocal(config)
  return config

"""The demo: a tiny DiG trained in pixel space on the bundled MNIST-5k digits, on CPU.

    python train.py --config configs/digits.py --workdir workdirs/digits
    python train.py --config configs/digits.py:runlocal --workdir /tmp/smoke   # seconds, for tests

5,000 steps take about 20 minutes on two CPU cores; the samples are then legible digits of the
requested class (83 % recognised by a classifier with guidance 4, README "Demo results"). At 3,000
steps they are not yet (38 %).
"""
from ml_collections import config_dict

from configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  args = common.parse_arg(arg, runlocal=False)
  config = common.base_config()

  config.model.name = "DiG-S/4"          # 32x32 pixels, patch 4 -> an 8x8 token grid
  config.model.depth = 4
  config.model.hidden_size = 128
  config.model.num_heads = 2             # d_k 32, d_v 64 per head, as every DiG size

  config.data.name = "digits"
  config.data.image_size = 32            # 28x28 digits centre-padded to 32x32
  config.data.channels = 1
  config.data.num_classes = 10

  config.train.global_batch_size = 32
  config.train.total_steps = 5000
  config.train.learning_rate = 2e-3
  config.train.warmup_steps = 200
  config.train.ema_decay = 0.995
  config.train.log_every = 50
  config.train.checkpoint_every = 1000

  config.sample.steps = 100
  config.sample.cfg_scale = 4.0         # measured best of 2 / 4 / 7 (README "Demo results")

  if args.runlocal:
    common.shrink_for_runlocal(config)
  return config

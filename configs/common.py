"""Defaults shared by every experiment, and big_vision-style `get_config("a=1,runlocal")` parsing."""
from ml_collections import config_dict


def parse_arg(arg: str | None, **defaults) -> config_dict.ConfigDict:
  """Parses "key=value,flag" into a ConfigDict; a bare word sets a boolean default to True."""
  out = config_dict.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; expected some of {sorted(defaults)}")
    if not sep:
      out[key] = True
    else:
      kind = type(defaults[key])
      out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return out


def base_config() -> config_dict.ConfigDict:
  """The paper's recipe (DiT/ADM) as defaults; experiment files override what they change."""
  config = config_dict.ConfigDict()
  config.seed = 0

  config.model = config_dict.ConfigDict()
  config.model.name = "DiG-S/2"
  config.model.depth = config_dict.placeholder(int)        # None: the named size's value
  config.model.hidden_size = config_dict.placeholder(int)
  config.model.num_heads = config_dict.placeholder(int)
  config.model.learn_sigma = True
  config.model.dtype = "float32"                           # compute dtype; params stay float32
  config.model.gla_backend = "auto"                        # DiG only: chunk_gla backend
  config.model.conv_backend = "auto"                       # DiG only: depthwise conv backend
  # the adaLN norm kernels (DiG and DiT) and, in DiG, the one-pass backward of SwiGLU and of
  # GLA's gated output
  config.model.elementwise_backend = "auto"
  # "full": keep only each block's input for the backward (DiG-S/2 at 2048 px: -81 % peak memory
  # for +10 % step time on an H100; "dots" saves less and was slower); "none" keeps everything.
  config.model.remat = "none"

  config.data = config_dict.ConfigDict()
  config.data.name = "digits"
  config.data.image_size = 32
  config.data.channels = 1
  config.data.num_classes = 10
  config.data.num_threads = 2                              # grain reader threads per process
  config.data.num_workers = 0                              # >0: that many reader processes too

  config.diffusion = config_dict.ConfigDict()
  config.diffusion.num_timesteps = 1000

  config.mesh = config_dict.ConfigDict()                  # devices = data x fsdp; -1 = the rest
  config.mesh.data = -1
  config.mesh.fsdp = 1                                     # >1 shards params and optimizer state
  config.mesh.fsdp_min_size_mb = 4.0                       # smaller arrays stay replicated
  config.distributed = False                               # jax.distributed.initialize() first
  config.cluster = config_dict.ConfigDict()                # for it; None: detected (SLURM, TPU)
  config.cluster.coordinator_address = config_dict.placeholder(str)   # "host:port" of process 0
  config.cluster.num_processes = config_dict.placeholder(int)
  config.cluster.process_id = config_dict.placeholder(int)

  config.train = config_dict.ConfigDict()
  config.train.global_batch_size = 256
  config.train.total_steps = 400_000
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 0
  config.train.lr_schedule = "constant"                    # or "cosine": to zero at total_steps
  config.train.adam_b1 = 0.9
  config.train.adam_b2 = 0.999
  config.train.weight_decay = 0.0
  config.train.grad_clip_norm = 0.0                        # 0: no clipping (the paper's recipe)
  config.train.optimizer_layout = "auto"                   # small arrays (params, EMA, moments) as one vector
  config.train.ema_decay = 0.9999
  config.train.label_dropout = 0.1                         # null-class rate, for guidance
  config.train.log_every = 100
  config.train.checkpoint_every = 10_000
  config.train.keep_checkpoints = 3                        # the newest N checkpoints ...
  config.train.keep_every = 0                              # ... plus every K-th step (0: none)

  config.sample = config_dict.ConfigDict()                 # defaults for sample.py
  config.sample.sampler = "ddpm"
  config.sample.steps = 250
  config.sample.cfg_scale = 1.5
  return config


def shrink_for_runlocal(config: config_dict.ConfigDict) -> None:
  """A smoke run: a 2-layer, 64-wide model, batch 8, four steps, checkpoints every two."""
  config.model.depth = 2
  config.model.hidden_size = 64
  config.model.num_heads = 1
  config.train.global_batch_size = 8
  config.train.total_steps = 4
  config.train.log_every = 2
  config.train.checkpoint_every = 2
  config.sample.steps = 4

"""Checks of a training config at load time, with messages that name the value and the rule."""
from __future__ import annotations

import jax
from flax import nnx

from dig_jax.data.sources import SOURCES
from dig_jax.models.registry import create_model_from_config
from dig_jax.train.sharding import mesh_shape
from dig_jax.train.layout import OPTIMIZER_LAYOUTS
from dig_jax.train.optimizer import LR_SCHEDULES
from kernels_pallas import conv, swiglu
from kernels_pallas.gla.api import BACKENDS

DTYPES = ("float32", "bfloat16", "float16")
# Keys that say where data is or how it is computed, not what the run is: they may change on resume.
_UNCOMPARED_KEYS = ("path", "num_threads", "num_workers", "gla_backend", "conv_backend",
                   "elementwise_backend", "remat")


class ConfigError(ValueError):
  """A setting that cannot work; the CLI prints it as one line."""


def _require(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def check_config(config):
  """Raises ConfigError on the first setting that cannot work."""
  _require(config.data.name in SOURCES,
           f"config.data.name={config.data.name!r}; expected one of {sorted(SOURCES)}")
  _require(config.model.dtype in DTYPES,
           f"config.model.dtype={config.model.dtype!r}; expected one of {DTYPES}")
  _require(config.model.gla_backend in BACKENDS,
           f"config.model.gla_backend={config.model.gla_backend!r}; expected one of {BACKENDS}")
  _require(config.model.get("conv_backend", "auto") in conv.BACKENDS,
           f"config.model.conv_backend={config.model.get('conv_backend')!r}; expected one of "
           f"{conv.BACKENDS}")
  _require(config.model.get("elementwise_backend", "auto") in swiglu.BACKENDS,
           f"config.model.elementwise_backend={config.model.get('elementwise_backend')!r}; "
           f"expected one of {swiglu.BACKENDS}")
  try:
    mesh_shape(config.mesh.data, config.mesh.fsdp, jax.device_count())
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _require(config.mesh.fsdp_min_size_mb >= 0,
           f"config.mesh.fsdp_min_size_mb={config.mesh.fsdp_min_size_mb}; expected >= 0")
  for key in ("num_threads", "num_workers"):
    minimum = 1 if key == "num_threads" else 0
    _require(config.data[key] >= minimum,
             f"config.data.{key}={config.data[key]}; expected an integer >= {minimum}")
  tc = config.train
  _require(tc.keep_every >= 0, f"config.train.keep_every={tc.keep_every}; expected >= 0")
  for key in ("global_batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
    _require(tc[key] >= 1, f"config.train.{key}={tc[key]}; expected an integer >= 1")
  _require(tc.total_steps >= 0, f"config.train.total_steps={tc.total_steps}; expected >= 0")
  _require(tc.warmup_steps >= 0, f"config.train.warmup_steps={tc.warmup_steps}; expected >= 0")
  _require(tc.learning_rate > 0, f"config.train.learning_rate={tc.learning_rate}; expected > 0")
  _require(tc.lr_schedule in LR_SCHEDULES,
           f"config.train.lr_schedule={tc.lr_schedule!r}; expected one of {LR_SCHEDULES}")
  layout = tc.get("optimizer_layout", "auto")
  _require(layout in OPTIMIZER_LAYOUTS,
           f"config.train.optimizer_layout={layout!r}; expected one of {OPTIMIZER_LAYOUTS}")
  for key in ("adam_b1", "adam_b2"):
    _require(0.0 <= tc[key] < 1.0, f"config.train.{key}={tc[key]}; expected [0, 1)")
  _require(0.0 <= tc.ema_decay < 1.0, f"config.train.ema_decay={tc.ema_decay}; expected [0, 1)")
  _require(0.0 <= tc.label_dropout < 1.0,
           f"config.train.label_dropout={tc.label_dropout}; expected [0, 1)")
  _require(config.diffusion.num_timesteps >= 2,
           f"config.diffusion.num_timesteps={config.diffusion.num_timesteps}; expected >= 2")
  try:  # model name, sizes and patch divisibility, checked without allocating anything
    nnx.eval_shape(lambda: create_model_from_config(config, rngs=nnx.Rngs(0)))
  except ValueError as e:
    raise ConfigError(f"config.model / config.data: {e}") from None


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def check_resume_config(saved: dict, config):
  """A workdir's checkpoint must come from the same model, data and diffusion settings.

  Paths, reader threads, the GLA backend and remat are not compared: a run may move between
  machines, what it trains must not change.
  """
  current = config.to_dict()
  diffs = []
  for section in ("model", "data", "diffusion"):
    before, now = _flatten(saved.get(section, {})), _flatten(current[section])
    for key in sorted(set(before) | set(now)):
      if key.rsplit(".", 1)[-1] not in _UNCOMPARED_KEYS and before.get(key) != now.get(key):
        diffs.append(f"{section}.{key}: checkpoint {before.get(key)!r}, config {now.get(key)!r}")
  if diffs:
    raise ConfigError("the workdir holds a checkpoint of a different run; use another --workdir "
                      "or the same settings. Differences: " + "; ".join(diffs))

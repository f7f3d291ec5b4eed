"""The train state (a plain dict pytree): step, params, EMA params, optimizer state."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dig_jax.models import create_model_from_config
from dig_jax.train import sharding


LR_SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warm-up to the peak rate, then constant or cosine decay to zero at total_steps."""
  lr, warmup = train_config.learning_rate, train_config.warmup_steps
  kind = train_config.get("lr_schedule", "constant")  # runs saved before the option existed
  if kind == "cosine":
    decay_end = max(train_config.total_steps, warmup + 1)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay_end)
  if kind != "constant":
    raise ValueError(f"config.train.lr_schedule={kind!r}; expected one of {LR_SCHEDULES}")
  return optax.linear_schedule(0.0, lr, warmup) if warmup > 0 else optax.constant_schedule(lr)


def make_optimizer(train_config) -> optax.GradientTransformation:
  """AdamW with linear warm-up and the configured decay, optional global-norm clipping."""
  tx = optax.adamw(learning_rate_schedule(train_config), b1=train_config.get("adam_b1", 0.9),
                   b2=train_config.get("adam_b2", 0.999), weight_decay=train_config.weight_decay)
  if train_config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm), tx)
  return tx


def split_model(config, seed: int):
  """Builds the model and returns (graphdef, params); the model holds nothing but Params."""
  model = create_model_from_config(config, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, params


def create_sharded_state(config, tx, mesh):
  """(graphdef, state, shardings): the initial state built directly in its sharded layout, so no
  device ever holds the whole unsharded model."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: create_model_from_config(
      config, rngs=nnx.Rngs(config.seed))), nnx.Param)
  build = lambda: init_state(split_model(config, config.seed)[1], tx)
  shardings = sharding.state_shardings(jax.eval_shape(build), mesh, config.mesh.fsdp_min_size_mb)
  return graphdef, jax.jit(build, out_shardings=shardings)(), shardings


def init_state(params, tx) -> dict:
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "ema_params": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params)}

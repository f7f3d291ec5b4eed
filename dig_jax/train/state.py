"""The train state (a plain dict pytree): step, params, EMA params, optimizer state."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dig_jax.models import create_model_from_config
from dig_jax.train import sharding
from dig_jax.train.checkpoint import abstract_like
from dig_jax.train.optimizer import state_for_checkpoint, state_from_checkpoint


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


def checkpoint_form(state, state_sharding, flat_below: float, mesh, min_size_mb: float):
  """(to_saved, from_saved, abstract saved state): checkpoints hold the optimizer's moments per
  array whatever share of them the step keeps as one vector (optimizer.py); these convert
  between the two, on device and in each form's sharding."""
  if not flat_below:
    same = lambda s: s
    return same, same, abstract_like(state, state_sharding)

  def to_saved(s):
    return {**s, "opt_state": state_for_checkpoint(s["opt_state"], s["params"], flat_below)}

  def from_saved(s):
    return {**s, "opt_state": state_from_checkpoint(s["opt_state"], s["params"], flat_below)}

  saved = jax.eval_shape(to_saved, state)
  saved_sharding = sharding.state_shardings(saved, mesh, min_size_mb)
  return (jax.jit(to_saved, out_shardings=saved_sharding),
          jax.jit(from_saved, out_shardings=state_sharding), abstract_like(saved, saved_sharding))

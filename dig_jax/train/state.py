"""The train state (a plain dict pytree): step, params, EMA params, optimizer state."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dig_jax.models import create_model_from_config
from dig_jax.train import sharding
from dig_jax.train.checkpoint import abstract_like
from dig_jax.train.layout import StateLayout


def split_model(config, seed: int):
  """Builds the model and returns (graphdef, params); the model holds nothing but Params."""
  model = create_model_from_config(config, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, params


def abstract_model(config):
  """(graphdef, the parameters' shapes): the model's structure, nothing initialised."""
  return nnx.split(nnx.eval_shape(lambda: create_model_from_config(config, rngs=nnx.Rngs(0))),
                   nnx.Param)


def create_sharded_state(config, tx, mesh, below: float):
  """(graphdef, layout, state, shardings): the initial state in running form (layout.py),
  built directly in its sharded layout, so no device ever holds the whole unsharded model."""
  graphdef, like = abstract_model(config)
  layout = StateLayout(like, below)
  build = lambda: layout.running(init_state(split_model(config, config.seed)[1], tx))
  shardings = sharding.state_shardings(jax.eval_shape(build), mesh, config.mesh.fsdp_min_size_mb)
  return graphdef, layout, jax.jit(build, out_shardings=shardings)(), shardings


def init_state(params, tx) -> dict:
  """The per-array state (the form checkpoints hold)."""
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "ema_params": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params)}


def checkpoint_form(layout: StateLayout, state, state_sharding, mesh, min_size_mb: float):
  """(to_saved, from_saved, abstract saved state): checkpoints hold every array on its own,
  whatever share of them the step keeps as one vector; these convert between the two forms of
  `state` (running form), on device and in each form's sharding."""
  saved = jax.eval_shape(layout.saved, state)
  saved_sharding = sharding.state_shardings(saved, mesh, min_size_mb)
  return (jax.jit(layout.saved, out_shardings=saved_sharding),
          jax.jit(layout.running, out_shardings=state_sharding),
          abstract_like(saved, saved_sharding))

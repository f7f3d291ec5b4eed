"""The optimizer (AdamW and its learning-rate schedule) and the layout of its state.

Adam's moments are kept in one of two layouts (`config.train.optimizer_layout`):
- "per_leaf": trees shaped like the parameters, optax's own form;
- "flat": one vector per moment (`optax.flatten`), so the update is one elementwise pass over
  every parameter instead of a few kernels per parameter array. DiG-S/2 has about 200 arrays,
  many small (gate projections, biases, norm scales), whose kernels are bound by their launches
  on GPUs: the flat layout took 8-14 % off a DiG-S/2 step on an H100 (BENCHMARKS.md).
- "auto" (default): flat unless the mesh splits the state over `fsdp`, where the flat vectors
  would not line up with the parameters' shards and would be resharded every step.
Checkpoints always hold the per-leaf form (`state_for_checkpoint`, `state_from_checkpoint`), so
a run can resume under either layout and checkpoints written before the option restore as is.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

LR_SCHEDULES = ("constant", "cosine")
OPTIMIZER_LAYOUTS = ("auto", "flat", "per_leaf")


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


def resolve_layout(layout: str, fsdp_size: int) -> str:
  """"auto" -> "flat" on meshes that replicate the state, "per_leaf" where fsdp splits it."""
  if layout not in OPTIMIZER_LAYOUTS:
    raise ValueError(f"optimizer layout {layout!r}; expected one of {OPTIMIZER_LAYOUTS}")
  if layout == "auto":
    return "flat" if fsdp_size == 1 else "per_leaf"
  return layout


def with_layout(tx: optax.GradientTransformation, layout: str) -> optax.GradientTransformation:
  """`tx` keeping its state in `layout` ("flat" or "per_leaf")."""
  if layout not in ("flat", "per_leaf"):
    raise ValueError(f"optimizer layout {layout!r}; expected 'flat' or 'per_leaf' (resolve "
                     f"'auto' with resolve_layout first)")
  return optax.flatten(tx) if layout == "flat" else tx


def make_optimizer(train_config, layout: str = "per_leaf") -> optax.GradientTransformation:
  """AdamW with linear warm-up and the configured decay, optional global-norm clipping, its
  state in `layout` (the per-leaf default is the form checkpoints hold)."""
  tx = optax.adamw(learning_rate_schedule(train_config), b1=train_config.get("adam_b1", 0.9),
                   b2=train_config.get("adam_b2", 0.999), weight_decay=train_config.weight_decay)
  if train_config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm), tx)
  return with_layout(tx, layout)


def global_norm(tree, layout: str):
  """L2 norm of every leaf together. Flat: one reduction over the concatenated leaves (XLA
  fuses it with the flat optimizer's own concatenation); per-leaf: one per leaf, which keeps
  fsdp shards where they are."""
  if layout == "flat":
    flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)])
    return jnp.sqrt(jnp.sum(flat * flat))
  return optax.tree.norm(tree)


def _like_params(params):
  treedef = jax.tree.structure(params)
  return lambda subtree: jax.tree.structure(subtree) == treedef


def state_for_checkpoint(opt_state, params, train_config, layout: str):
  """The per-leaf form of an optimizer state held in `layout` (what checkpoints hold)."""
  if layout == "per_leaf":
    return opt_state
  template = jax.eval_shape(make_optimizer(train_config).init, params)
  like_params = _like_params(params)
  _, unravel = ravel_pytree(params)
  # the flat state is the per-leaf one with a vector wherever a parameter-shaped tree was
  return jax.tree.map(lambda x, t: unravel(x) if like_params(t) else x, opt_state, template)


def state_from_checkpoint(opt_state, params, layout: str):
  """An optimizer state in `layout` from its per-leaf form."""
  if layout == "per_leaf":
    return opt_state
  like_params = _like_params(params)
  return jax.tree.map(lambda t: ravel_pytree(t)[0] if like_params(t) else t, opt_state,
                      is_leaf=like_params)

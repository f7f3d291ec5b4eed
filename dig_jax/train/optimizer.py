"""The optimizer (AdamW and its learning-rate schedule) and the layout of its state.

Adam's moments for parameter arrays smaller than `flat_below` elements are kept as one vector
(the small arrays concatenated), the others as arrays of their own. Why: an optimizer update
costs a few kernels per array; for a small array they are bound by their launches (DiG-S/2 has
about 200 arrays, most small: the flat vector took 8-14 % off its step on an H100), for a large
one by memory, where the concatenation is an extra pass (DiG-XL/2: all flat was 2 % slower than
per array; BENCHMARKS.md). `config.train.optimizer_layout`:
- "auto" (default): arrays under 4 MiB flat (and under `mesh.fsdp_min_size_mb` when fsdp > 1: the
  sizes that stay replicated, so the vector never needs resharding), the rest per array;
- "flat": every array in the vector; "per_leaf": none (optax's own form).
Checkpoints always hold the per-array form (`state_for_checkpoint`, `state_from_checkpoint`), so a
run can resume under any layout and checkpoints written before the option restore as they are.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

LR_SCHEDULES = ("constant", "cosine")
OPTIMIZER_LAYOUTS = ("auto", "flat", "per_leaf")
AUTO_FLAT_BYTES = 4 * 2**20  # float32 arrays below this many bytes share the flat vector
ALL = math.inf


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


def flat_below(layout: str, fsdp_size: int = 1, fsdp_min_size_mb: float = 4.0) -> float:
  """Arrays with fewer elements than this share the flat vector (0: none, ALL: every one)."""
  if layout not in OPTIMIZER_LAYOUTS:
    raise ValueError(f"optimizer layout {layout!r}; expected one of {OPTIMIZER_LAYOUTS}")
  if layout == "flat":
    return ALL
  if layout == "per_leaf":
    return 0
  limit = AUTO_FLAT_BYTES if fsdp_size == 1 else min(AUTO_FLAT_BYTES, fsdp_min_size_mb * 2**20)
  return limit / 4  # float32 elements


def _is_small(tree, below):
  return [np.size(x) < below for x in jax.tree.leaves(tree)]


def split(tree, below):
  """{"flat": the small leaves concatenated, "large": the others} (leaf order kept)."""
  leaves, is_small = jax.tree.leaves(tree), _is_small(tree, below)
  small = [jnp.ravel(x) for x, s in zip(leaves, is_small) if s]
  flat = jnp.concatenate(small) if small else jnp.zeros((0,), jnp.float32)
  return {"flat": flat, "large": [x for x, s in zip(leaves, is_small) if not s]}


def unsplit(parts, like, below):
  """The tree shaped like `like` from `split`'s parts."""
  leaves, treedef = jax.tree.flatten(like)
  large, out, offset = iter(parts["large"]), [], 0
  for x, small in zip(leaves, _is_small(like, below)):
    if small:
      out.append(parts["flat"][offset:offset + np.size(x)].reshape(np.shape(x)))
      offset += np.size(x)
    else:
      out.append(next(large))
  return jax.tree.unflatten(treedef, out)


def with_layout(tx: optax.GradientTransformation, below: float) -> optax.GradientTransformation:
  """`tx` run on `split` trees: its state holds the arrays under `below` elements as one vector."""
  if not below:
    return tx

  def init(params):
    return tx.init(split(params, below))

  def update(updates, state, params=None):
    out, state = tx.update(split(updates, below), state,
                           None if params is None else split(params, below))
    return unsplit(out, updates, below), state

  return optax.GradientTransformation(init, update)


def make_optimizer(train_config, below: float = 0) -> optax.GradientTransformation:
  """AdamW with linear warm-up and the configured decay, optional global-norm clipping, arrays
  under `below` elements in one vector (the per-array default is the form checkpoints hold)."""
  tx = optax.adamw(learning_rate_schedule(train_config), b1=train_config.get("adam_b1", 0.9),
                   b2=train_config.get("adam_b2", 0.999), weight_decay=train_config.weight_decay)
  if train_config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm), tx)
  return with_layout(tx, below)


def global_norm(tree, below: float = 0):
  """L2 norm of every leaf together: the small leaves' part as one reduction over their
  concatenation (XLA shares it with the optimizer's), the large ones' per array (which keeps
  fsdp shards where they are)."""
  parts = split(tree, below)  # below = 0: an empty vector and every leaf on its own
  squares = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in [parts["flat"], *parts["large"]]]
  return jnp.sqrt(sum(squares))


def _same_structure(tree):
  treedef = jax.tree.structure(tree)
  return lambda subtree: jax.tree.structure(subtree) == treedef


def state_for_checkpoint(opt_state, params, below: float):
  """The per-array form of an optimizer state whose arrays under `below` elements share a vector
  (what checkpoints hold)."""
  if not below:
    return opt_state
  is_split = _same_structure(split(params, below))
  return jax.tree.map(lambda t: unsplit(t, params, below) if is_split(t) else t, opt_state,
                      is_leaf=is_split)


def state_from_checkpoint(opt_state, params, below: float):
  """The optimizer state for `below` from its per-array form."""
  if not below:
    return opt_state
  is_params = _same_structure(params)
  return jax.tree.map(lambda t: split(t, below) if is_params(t) else t, opt_state,
                      is_leaf=is_params)

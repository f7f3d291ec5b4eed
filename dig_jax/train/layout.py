"""How the train state holds its arrays: the parameters, their EMA and Adam's moments of every
array under `flat_below` elements as one vector each, the other arrays as they are.

Why: an update costs a few kernels per array. For a small array they are bound by their
launches (DiG-S/2 has about 200 arrays, most small: Adam's moments as one vector took 8-14 % off
its step on an H100), for a large one by memory, where the concatenation is an extra pass
(DiG-XL/2: all in the vector was 2 % slower than per array; BENCHMARKS.md). With the parameters
and their EMA in the vector too, Adam, the parameter update and the EMA are one elementwise
pass over it; the model reads its small parameters as slices of the vector, and their gradients
arrive as one concatenation (`StateLayout.params`).

`config.train.optimizer_layout`:
- "auto" (default): arrays under 4 MiB in the vector (and under `mesh.fsdp_min_size_mb` when
  fsdp > 1: the sizes that stay replicated), the rest as arrays;
- "flat": every array in the vector (with fsdp > 1, every array that stays replicated);
  "per_leaf": none.

The train step runs on the "running" form: params and EMA as {"flat": vector, "large": [arrays]},
and optax's state over that tree. Checkpoints hold the per-array form (`StateLayout.saved`,
`StateLayout.running`), so a run resumes under any layout, and checkpoints written before the
option restore as they are.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

OPTIMIZER_LAYOUTS = ("auto", "flat", "per_leaf")
AUTO_FLAT_BYTES = 4 * 2**20  # float32 arrays below this many bytes share the vector
ALL = math.inf


def flat_below(layout: str, fsdp_size: int = 1, fsdp_min_size_mb: float = 4.0) -> float:
  """Arrays with fewer elements than this share the vector (0: none, ALL: every one). With
  fsdp > 1, only arrays that stay replicated (under `fsdp_min_size_mb`) do, whatever the layout:
  the vector is replicated (sharding.py)."""
  if layout not in OPTIMIZER_LAYOUTS:
    raise ValueError(f"optimizer layout {layout!r}; expected one of {OPTIMIZER_LAYOUTS}")
  if layout == "per_leaf":
    return 0
  replicated = ALL if fsdp_size == 1 else fsdp_min_size_mb * 2**20 / 4  # float32 elements
  return min(replicated, ALL if layout == "flat" else AUTO_FLAT_BYTES / 4)


@dataclasses.dataclass(frozen=True, eq=False)
class StateLayout:
  """The running form of a train state. `like`: the parameter tree (arrays or shapes);
  `below`: arrays with fewer elements go in the vector."""
  like: Any
  below: float

  @functools.cached_property
  def _is_small(self) -> list[bool]:
    return [math.prod(x.shape) < self.below for x in jax.tree.leaves(self.like)]

  @functools.cached_property
  def _tree_structure(self):
    return jax.tree.structure(self.like)

  @functools.cached_property
  def _parts_structure(self):
    return jax.tree.structure({"flat": 0, "large": [0] * self._is_small.count(False)})

  def parts(self, tree):
    """{"flat": the small leaves of `tree` (shaped like `like`) raveled and concatenated,
    "large": the others}, leaf order kept."""
    leaves, is_small = jax.tree.leaves(tree), self._is_small
    small = [jnp.ravel(x) for x, s in zip(leaves, is_small) if s]
    flat = jnp.concatenate(small) if small else jnp.zeros((0,), jnp.float32)
    return {"flat": flat, "large": [x for x, s in zip(leaves, is_small) if not s]}

  def tree(self, parts):
    """The tree shaped like `like` from `parts`."""
    leaves, treedef = jax.tree.flatten(self.like)
    large, out, offset = iter(parts["large"]), [], 0
    for x, small in zip(leaves, self._is_small):
      if small:
        size = math.prod(x.shape)
        out.append(parts["flat"][offset:offset + size].reshape(x.shape))
        offset += size
      else:
        out.append(next(large))
    return jax.tree.unflatten(treedef, out)

  def params(self, parts):
    """`tree(parts)` whose gradient is one concatenation of the slices' gradients (JAX's own
    transpose of a slice is a zero-padded full vector, one per slice, summed)."""

    @jax.custom_vjp
    def tree(parts):
      return self.tree(parts)

    tree.defvjp(lambda parts: (self.tree(parts), None), lambda _, grads: (self.parts(grads),))
    return tree(parts)

  def _is_parts(self, subtree) -> bool:
    return jax.tree.structure(subtree) == self._parts_structure

  def _is_tree(self, subtree) -> bool:
    return jax.tree.structure(subtree) == self._tree_structure

  def running(self, state: dict) -> dict:
    """A per-array train state ({"step", "params", "ema_params", "opt_state"}) in running form:
    every subtree shaped like the parameters (params, EMA, the moments) becomes parts."""
    return jax.tree.map(lambda t: self.parts(t) if self._is_tree(t) else t, state,
                        is_leaf=self._is_tree)

  def saved(self, state: dict) -> dict:
    """The per-array form of a running train state (what checkpoints hold)."""
    return jax.tree.map(lambda t: self.tree(t) if self._is_parts(t) else t, state,
                        is_leaf=self._is_parts)

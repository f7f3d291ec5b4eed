"""Orbax checkpoints of a run (the one place that reads or writes them).

Layout: <workdir>/checkpoints/<step>/ with items
  state       {"step", "params", "opt_state"}   (StandardSave)
  ema_params  EMA of the parameters              (StandardSave; what sample.py loads)
  data_iter   the grain iterator position        (so a resumed run reads the same batches)
  meta        {"step", "config"}                 (JSON; sample.py rebuilds the model from it)
"""
from __future__ import annotations

import os
import shutil
import time

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def abstract_like(tree, shardings):
  """ShapeDtypeStructs (with their target shardings) describing `tree`, for restoring into."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class Checkpointer:
  """Saves and restores whole training runs; async writes; keeps the newest `keep` steps and
  every `keep_every`-th."""

  def __init__(self, workdir: str, *, keep: int = 3, keep_every: int = 0,
               read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every or None,
                                           create=not read_only,
                                           read_only=read_only,
                                           enable_async_checkpointing=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, state: dict, ema_params, data_iter, config_dict: dict):
    step = int(jax.device_get(state["step"]))
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({k: state[k] for k in ("step", "params", "opt_state")}),
        ema_params=ocp.args.StandardSave(ema_params),
        data_iter=grain.checkpoint.CheckpointSave(data_iter),
        meta=ocp.args.JsonSave({"step": step, "config": config_dict})), force=True)
    return step

  def restore(self, step: int, abstract_state: dict, data_iter) -> dict:
    """Restores a full train state (and moves `data_iter` to where it was) at `step`."""
    train_part = {k: abstract_state[k] for k in ("step", "params", "opt_state")}
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(train_part),
        ema_params=ocp.args.StandardRestore(abstract_state["ema_params"]),
        data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
    return {**restored["state"], "ema_params": restored["ema_params"]}

  def restore_params(self, step: int, abstract_state: dict, *, ema: bool = True):
    """Only the EMA (or the raw) parameters at `step`: what sampling needs."""
    if ema:
      args = ocp.args.Composite(ema_params=ocp.args.StandardRestore(abstract_state["ema_params"]))
      return self.manager.restore(step, args=args)["ema_params"]
    train_part = {k: abstract_state[k] for k in ("step", "params", "opt_state")}
    args = ocp.args.Composite(state=ocp.args.StandardRestore(train_part))
    return self.manager.restore(step, args=args)["state"]["params"]

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def set_aside(self, step: int) -> str:
    """Moves an unreadable checkpoint out of the way (never deletes it); returns where to."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(os.path.dirname(self.directory), "unreadable_checkpoints",
                       f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set_aside_{step}")
    self.manager.reload()
    return dst

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

"""The training loop, top to bottom: mesh, data, model, state, resume, step, log, checkpoint."""
from __future__ import annotations

import collections
import json
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from tqdm import tqdm

from dig_jax.data import create_source, train_dataset
from dig_jax.diffusion import create_schedule
from dig_jax.train import sharding
from dig_jax.train.checkpoint import Checkpointer
from dig_jax.train.metrics import MetricsWriter
from dig_jax.train.layout import flat_below
from dig_jax.train.optimizer import make_optimizer
from dig_jax.train.state import checkpoint_form, create_sharded_state
from dig_jax.train.step import make_train_step
from dig_jax.train.validate import ConfigError, check_config, check_resume_config


STEPS_IN_FLIGHT = 2  # dispatched steps the host may run ahead of the device (StepsInFlight)


class StopRequested:
  """Turns SIGINT (Ctrl-C) and SIGTERM (preemption) into a flag the loop checks between steps."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: the user really wants out now
    self.signal_name = signal.Signals(signum).name

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def requested(self, step: int) -> bool:
    """True once a stop was asked for. With several processes, all of them must stop at the
    same step, so JAX's preemption sync point (which sees SIGTERM on any host) decides."""
    if jax.process_count() > 1:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or "SIGTERM"
        return True
      return False
    return self.signal_name is not None


class StepsInFlight:
  """Bounds how many dispatched steps may be unfinished on the device.

  A jitted step returns as soon as it is queued, so without a bound the host (and the progress
  bar with it) runs ahead until the next metrics sync at `log_every`, then waits there while
  the queue drains. Waiting for the step `limit` back keeps the bar within `limit` steps of the
  device and the device still busy: the next steps are already queued when the wait ends.
  """

  def __init__(self, limit: int):
    if limit < 1:
      raise ValueError(f"StepsInFlight: limit must be >= 1, got {limit}")
    self.limit = limit
    self._pending = collections.deque()

  def add(self, marker):
    """Records a step by one of its outputs (anything with `block_until_ready`); waits for the
    oldest recorded steps until at most `limit` are unfinished."""
    self._pending.append(marker)
    while len(self._pending) > self.limit:
      self._pending.popleft().block_until_ready()


class NonFiniteLossError(RuntimeError):
  pass


def train(config, workdir: str) -> int:
  """Trains (or resumes) the run in `workdir` up to config.train.total_steps; returns the step."""
  sharding.initialize_distributed(config)  # multi-host: before any other JAX call
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  tc = config.train

  # --- Mesh and input -------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  if tc.global_batch_size % mesh.size:
    raise ConfigError(f"config.train.global_batch_size={tc.global_batch_size} must be divisible "
                      f"by the number of devices ({mesh.size})")
  source = create_source(config.data)
  if source.num_classes != config.data.num_classes or source.image_shape[-1] != config.data.channels:
    raise ConfigError(f"data source {config.data.name!r} has {source.num_classes} classes and "
                      f"{source.image_shape[-1]} channels, config says {config.data.num_classes} "
                      f"and {config.data.channels}")
  data_iter = iter(train_dataset(source, global_batch_size=tc.global_batch_size,
                                 image_size=config.data.image_size, seed=config.seed,
                                 num_threads=config.data.num_threads,
                                 num_workers=config.data.num_workers))

  # --- Model, optimizer, diffusion ------------------------------------------------------------
  below = flat_below(tc.get("optimizer_layout", "auto"), mesh.shape["fsdp"],
                     config.mesh.fsdp_min_size_mb)
  tx = make_optimizer(tc)
  schedule = create_schedule(config.diffusion.num_timesteps)
  graphdef, layout, state, state_sharding = create_sharded_state(config, tx, mesh, below)
  to_saved, from_saved, saved_abstract = checkpoint_form(
      layout, state, state_sharding, mesh, config.mesh.fsdp_min_size_mb)

  # --- Resume ---------------------------------------------------------------------------------
  ckpt = Checkpointer(workdir, keep=tc.keep_checkpoints, keep_every=tc.keep_every)
  latest = None
  for candidate in sorted(ckpt.all_steps(), reverse=True):  # newest first; skip broken ones
    try:
      check_resume_config(ckpt.read_meta(candidate)["config"], config)
      state = from_saved(ckpt.restore(candidate, saved_abstract, data_iter))
    except ConfigError:
      raise
    except Exception as e:  # a checkpoint cut short or damaged on disk
      logging.warning("checkpoint at step %d cannot be restored: %s", candidate, e)
      moved_to = ckpt.set_aside(candidate)
      if is_main:
        print(f"WARNING: checkpoint {candidate} is unreadable ({type(e).__name__}); moved it to "
              f"{moved_to} and trying the previous one", flush=True)
      continue
    latest = candidate
    if is_main:
      print(f"Resuming from step {latest} ({ckpt.directory})", flush=True)
    break
  if latest is None and is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2)

  # --- Step -----------------------------------------------------------------------------------
  step_fn = make_train_step(graphdef, layout, tx, schedule, tc,
                            null_class=config.data.num_classes,
                            learn_sigma=config.model.learn_sigma,
                            base_key=jax.random.key(config.seed))
  replicated = sharding.replicated(mesh)
  train_step = jax.jit(step_fn, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                       out_shardings=(state_sharding, replicated), donate_argnums=0)

  # --- Loop -----------------------------------------------------------------------------------
  step = int(jax.device_get(state["step"]))
  writer = MetricsWriter(workdir)
  stop = StopRequested()
  bar = tqdm(total=tc.total_steps, initial=step, disable=not is_main, unit="step",
             dynamic_ncols=True)
  last_saved = latest
  in_flight = StepsInFlight(STEPS_IN_FLIGHT)
  window_start, window_steps = time.time(), 0

  def save():
    nonlocal last_saved
    if step != last_saved:
      saved = to_saved(state)
      ckpt.save(saved, saved["ema_params"], data_iter, config.to_dict())
      last_saved = step

  try:
    with jax.set_mesh(mesh):
      while step < tc.total_steps and not stop.requested(step):
        batch = sharding.global_batch(next(data_iter), mesh)
        state, metrics = train_step(state, batch)
        in_flight.add(metrics["loss"])
        step += 1
        window_steps += 1
        bar.update(1)
        log_now = step % tc.log_every == 0 or step == tc.total_steps
        save_now = step % tc.checkpoint_every == 0
        if not (log_now or save_now):
          continue
        metrics = jax.device_get(metrics)  # syncs with the device only here
        if not metrics.pop("finite"):
          raise NonFiniteLossError(
              f"non-finite loss or gradient at step {step} (loss={metrics['loss']}, "
              f"grad_norm={metrics['grad_norm']}); stopping without saving, the last "
              f"checkpoint (step {last_saved}) is intact")
        if log_now:
          metrics["steps_per_sec"] = window_steps / max(time.time() - window_start, 1e-9)
          window_start, window_steps = time.time(), 0
          writer.write(step, metrics)
          bar.set_postfix(loss=f"{metrics['loss']:.4f}", mse=f"{metrics['mse']:.4f}")
        if save_now:
          save()
      if stop.signal_name and is_main:
        bar.write(f"{stop.signal_name} received: saving a checkpoint at step {step} and stopping")
      if step != last_saved:
        if not _state_is_finite(state):
          raise NonFiniteLossError(f"parameters are not finite at step {step}; not saving, "
                                   f"the last checkpoint (step {last_saved}) is intact")
        save()
  finally:
    bar.close()
    stop.restore()
    ckpt.close()
  return step


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def _state_is_finite(state) -> bool:
  return bool(_all_finite(state["params"]))  # reduced on device: works for sharded params too

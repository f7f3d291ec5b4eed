"""The trainer: loss goes down, checkpoints round-trip, resume is exact, stops are clean."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, run_cli, tiny_config
from dig_jax.data import create_source, train_dataset
from dig_jax.train.loop import NonFiniteLossError, StepsInFlight, train
from dig_jax.train.validate import ConfigError
from dig_jax.train.checkpoint import Checkpointer, abstract_like
from dig_jax.train.metrics import read_metrics
from dig_jax.train.optimizer import learning_rate_schedule, make_optimizer
from dig_jax.train.state import init_state, split_model
from dig_jax.train.validate import check_config, check_resume_config


def _restore_params(workdir, step=None):
  config = tiny_config()
  _, params = split_model(config, 0)
  state = init_state(params, make_optimizer(config.train))
  ckpt = Checkpointer(workdir, read_only=True)
  step = ckpt.latest_step() if step is None else step
  shardings = jax.tree.map(lambda x: x.sharding, state)
  restored = ckpt.restore_params(step, abstract_like(state, shardings), ema=False)
  ckpt.close()
  return restored


def test_training_lowers_the_loss(tmp_path):
  config = tiny_config(total_steps=60, log_every=1, checkpoint_every=1000, learning_rate=2e-3,
                       global_batch_size=16)
  assert train(config, str(tmp_path)) == 60
  losses = [m["loss"] for m in read_metrics(str(tmp_path))]
  assert len(losses) == 60 and all(np.isfinite(losses))
  assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses
  record = read_metrics(str(tmp_path))[-1]
  assert {"step", "loss", "mse", "vb", "grad_norm", "steps_per_sec"} <= set(record)
  assert os.path.exists(tmp_path / "config.json")
  assert Checkpointer(str(tmp_path), read_only=True).all_steps() == [60]  # saved at the end


def test_checkpoint_save_restore_is_identical(tmp_path):
  config = tiny_config()
  graphdef, params = split_model(config, 0)
  tx = make_optimizer(config.train)
  noisy = jax.tree.map(lambda x: x + jax.random.normal(jax.random.key(1), x.shape), params)
  state = init_state(noisy, tx)
  state["step"] = state["step"] + 7
  state["ema_params"] = jax.tree.map(lambda x: x * 0.5, noisy)
  _, state["opt_state"] = tx.update(noisy, state["opt_state"], noisy)  # non-trivial moments
  data_iter = iter(train_dataset(create_source("digits"), global_batch_size=8, image_size=32,
                                 seed=0))
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(state, state["ema_params"], data_iter, config.to_dict())
  ckpt.close()
  fresh = init_state(params, tx)
  shardings = jax.tree.map(lambda x: x.sharding, fresh)
  ckpt = Checkpointer(str(tmp_path), read_only=True)
  restored = ckpt.restore(7, abstract_like(fresh, shardings), data_iter)
  assert ckpt.read_meta(7)["config"]["model"] == config.to_dict()["model"]
  for want, got in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(want), np.asarray(got))
  model = nnx.merge(graphdef, restored["params"])  # restored params rebuild the model
  assert model.blocks[0].attn.q_proj.kernel[...].shape == (64, 32)


def test_resume_continues_from_the_right_step_and_matches_uninterrupted(tmp_path):
  straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
  train(tiny_config(total_steps=6, checkpoint_every=2, log_every=1), straight)
  train(tiny_config(total_steps=4, checkpoint_every=2, log_every=1), interrupted)
  assert train(tiny_config(total_steps=6, checkpoint_every=2, log_every=1), interrupted) == 6
  steps = [m["step"] for m in read_metrics(interrupted)]
  assert steps == [1, 2, 3, 4, 5, 6]  # the second run started at step 5
  losses = lambda w: [m["loss"] for m in read_metrics(w)]
  assert losses(straight) == losses(interrupted)  # same batches, same noise, same updates
  for a, b in zip(jax.tree.leaves(_restore_params(straight)),
                  jax.tree.leaves(_restore_params(interrupted))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert train(tiny_config(total_steps=6), interrupted) == 6  # already done: nothing to do


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(
      [sys.executable, "train.py", "--config", "configs/digits.py:runlocal", "--workdir", workdir,
       "--config.train.total_steps=100000", "--config.train.log_every=1",
       "--config.train.checkpoint_every=100000"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while len(read_metrics(workdir)) < 3 and time.time() < deadline and proc.poll() is None:
    time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "SIGINT received: saving a checkpoint" in out + err
  stopped = int(out.split("Training stopped at step ")[1].split(";")[0])
  assert stopped >= 3
  assert Checkpointer(workdir, read_only=True).latest_step() == stopped


def test_non_finite_loss_stops_without_saving(tmp_path):
  config = tiny_config(total_steps=50, log_every=1, checkpoint_every=2, learning_rate=1e30)
  with pytest.raises(NonFiniteLossError, match=r"non-finite loss or gradient at step \d+"):
    train(config, str(tmp_path))
  for step in Checkpointer(str(tmp_path), read_only=True).all_steps():  # what was saved is finite
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(
        _restore_params(str(tmp_path), step)))


@pytest.mark.parametrize("section,key,value,match", [
    ("train", "total_steps", -1, r"config.train.total_steps=-1; expected >= 0"),
    ("model", "name", "DiG-M/2", r"unknown model name 'DiG-M/2'"),
    ("data", "image_size", 30, r"input size 30x30 must be positive and divisible by the patch size 4"),
    ("model", "dtype", "float8", r"config.model.dtype='float8'; expected one of"),
    ("data", "name", "imagenet9", r"config.data.name='imagenet9'; expected one of"),
    ("train", "lr_schedule", "linear", r"config.train.lr_schedule='linear'; expected one of"),
    ("train", "adam_b2", 1.0, r"config.train.adam_b2=1.0; expected \[0, 1\)"),
    ("train", "optimizer_layout", "flatten",
     r"config.train.optimizer_layout='flatten'; expected one of \('auto', 'flat', 'per_leaf'\)"),
    ("data", "num_threads", 0, r"config.data.num_threads=0; expected an integer >= 1"),
])
def test_bad_configs_are_refused(section, key, value, match):
  config = tiny_config()
  config[section][key] = value
  with pytest.raises(ConfigError, match=match):
    check_config(config)


def test_cosine_schedule_matches_the_closed_form():
  config = tiny_config(total_steps=1000, warmup_steps=100, learning_rate=4e-3)
  config.train.lr_schedule = "cosine"
  schedule = learning_rate_schedule(config.train)
  steps = np.array([0, 37, 100, 101, 350, 777, 999, 1000])
  expected = np.where(steps < 100, 4e-3 * steps / 100,
                      0.5 * 4e-3 * (1 + np.cos(np.pi * (steps - 100) / 900)))
  np.testing.assert_allclose([float(schedule(s)) for s in steps], expected, rtol=1e-5, atol=1e-9)


def test_resume_check_ignores_where_and_how_but_not_what():
  config = tiny_config()
  saved = config.to_dict()
  config.data.num_threads, config.model.gla_backend = 7, "reference"
  check_resume_config(saved, config)  # reader threads and kernel backend may change on resume
  config.model.hidden_size = 2 * config.model.hidden_size
  with pytest.raises(ConfigError, match=r"model.hidden_size: checkpoint \d+, config \d+"):
    check_resume_config(saved, config)


def test_cli_bad_inputs_give_one_line_and_keep_checkpoints(tiny_run):
  before = sorted(os.listdir(os.path.join(tiny_run, "checkpoints")))
  cases = [(["--config.train.no_such_key=1"], "unknown config key in --config.train.no_such_key"),
           (["--config.model.depth=5"], "the workdir holds a checkpoint of a different run"),
           (["--config.model.name=DiG-Q/2"], "unknown model name 'DiG-Q/2'")]
  for extra, message in cases:
    result = run_cli("train.py", "--config", "configs/digits.py:runlocal", "--workdir", tiny_run,
                     *extra)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr
  assert sorted(os.listdir(os.path.join(tiny_run, "checkpoints"))) == before
  assert json.load(open(os.path.join(tiny_run, "config.json")))["model"]["depth"] == 2


class _Step:
  """A dispatched step that finishes only when waited for."""

  def __init__(self, log, index):
    self.log, self.index = log, index

  def block_until_ready(self):
    self.log.append(self.index)
    return self


def test_steps_in_flight_waits_for_the_oldest_step_beyond_its_limit():
  waited, window = [], StepsInFlight(2)
  for i in range(6):
    window.add(_Step(waited, i))
    # after step i is added, every step up to i - 2 has been waited for, in order, once
    assert waited == list(range(max(i - 1, 0)))
  with pytest.raises(ValueError, match="limit must be >= 1, got 0"):
    StepsInFlight(0)

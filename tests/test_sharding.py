"""Sharding rules, multi-device steps on 8 fake CPU devices, preemption and checkpoint recovery."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import REPO, tiny_config
from dig_jax.train.loop import train
from dig_jax.train.checkpoint import Checkpointer
from dig_jax.train.metrics import read_metrics
from dig_jax.train.sharding import array_spec, mesh_shape, state_specs

EIGHT_DEVICES = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                 "JAX_PLATFORMS": "cpu"}


def test_array_spec_rules():
  assert array_spec((1024, 4096), 4, 4, 4.0) == P(None, "fsdp")     # 16 MB: largest dim
  assert array_spec((4096, 1024), 4, 4, 4.0) == P("fsdp", None)
  assert array_spec((6, 1024 * 1024), 4, 4, 1.0) == P(None, "fsdp")
  assert array_spec((1024, 1023), 4, 4, 1.0) == P("fsdp", None)      # only dim 0 divides
  assert array_spec((1023, 1023), 4, 4, 1.0) == P()                  # nothing divides
  assert array_spec((256, 256), 4, 4, 4.0) == P()                    # 0.25 MB: replicated
  assert array_spec((4096, 4096), 4, 1, 4.0) == P()                  # no fsdp axis
  assert array_spec((), 4, 4, 0.0) == P()


def test_state_specs_keep_the_vector_of_small_arrays_replicated():
  shape = lambda *s: jax.ShapeDtypeStruct(s, np.float32)
  parts = {"flat": shape(2**22), "large": [shape(1024, 4096)]}
  state = {"step": shape(), "params": parts, "ema_params": parts, "other": shape(2**22)}
  specs = state_specs(state, 4, 1.0)
  for name in ("params", "ema_params"):
    assert specs[name]["flat"] == P()  # 16 MB, yet replicated: it is the layout's vector
    assert specs[name]["large"] == [P(None, "fsdp")]
  assert specs["other"] == P("fsdp") and specs["step"] == P()  # the size rule elsewhere


def test_mesh_shape():
  assert mesh_shape(-1, 1, 8) == (8, 1)
  assert mesh_shape(2, -1, 8) == (2, 4)
  assert mesh_shape(-1, 4, 8) == (2, 4)
  for data, fsdp in ((3, -1), (2, 2), (-1, -1), (0, 8)):
    with pytest.raises(ValueError, match="config.mesh"):
      mesh_shape(data, fsdp, 8)


def test_step_on_8_devices_matches_one_device():
  out = subprocess.run([sys.executable, os.path.join(REPO, "tests", "sharded_step_check.py")],
                       env=EIGHT_DEVICES, capture_output=True, text=True, timeout=600, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["num_devices"] == 8
  runs = result["results"]
  one = runs["1x1"]
  # Small arrays' moments in one vector, except on the fsdp mesh (this test shards every array
  # there: fsdp_min_size_mb = 0): both forms agree with one device
  assert [runs[m]["flat_below"] for m in ("1x1", "2x4", "8x1")] == [2**20, 0, 2**20]
  for name in ("2x4", "8x1"):
    for a, b in zip(one["params"], runs[name]["params"]):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
  # The [64, 256] SwiGLU kernel is split 4 ways along its 256 dim on the fsdp axis.
  assert "fsdp" in runs["2x4"]["spec"] and runs["2x4"]["shard_size"] == 64 * 256 // 4
  assert "fsdp" not in runs["8x1"]["spec"] and runs["8x1"]["shard_size"] == 64 * 256
  # With the Pallas kernels, the 2x4 step lowers for TPU and GPU: a forward and a backward
  # kernel per layer (2 layers); unsharded, Mosaic refuses ("cannot be automatically partitioned").
  assert all(n >= 4 for n in runs["kernel_calls_lowered"].values()), runs["kernel_calls_lowered"]


def _train_cli(workdir, *overrides):
  return [sys.executable, "train.py", "--config", "configs/digits.py:runlocal", "--workdir",
          workdir, *overrides]


def _params(workdir):
  from test_train import _restore_params
  return [np.asarray(x) for x in jax.tree.leaves(_restore_params(workdir))]


def test_checkpoint_moves_between_8_devices_and_1(tmp_path):
  workdir = str(tmp_path / "run")
  first = subprocess.run(_train_cli(workdir, "--config.mesh.data=2", "--config.mesh.fsdp=4",
                                    "--config.mesh.fsdp_min_size_mb=0",
                                    "--config.train.total_steps=2"),
                         cwd=REPO, env=EIGHT_DEVICES, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  # Same process layout as the tests (one device): resume and train two more steps.
  config = tiny_config(total_steps=4)
  config.mesh.fsdp_min_size_mb = 0.0
  assert train(config, workdir) == 4
  # ... and back onto 8 devices (data 8), two more steps.
  third = subprocess.run(_train_cli(workdir, "--config.mesh.fsdp_min_size_mb=0",
                                    "--config.train.total_steps=6"),
                         cwd=REPO, env=EIGHT_DEVICES, capture_output=True, text=True, timeout=600)
  assert third.returncode == 0 and "Resuming from step 4" in third.stdout, third.stderr[-3000:]
  assert [m["step"] for m in read_metrics(workdir)] == [2, 4, 6]
  assert Checkpointer(workdir, read_only=True).all_steps() == [2, 4, 6]


def test_sigterm_exits_zero_with_a_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(_train_cli(workdir, "--config.train.total_steps=100000",
                                     "--config.train.log_every=1",
                                     "--config.train.checkpoint_every=100000"),
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while len(read_metrics(workdir)) < 2 and time.time() < deadline and proc.poll() is None:
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)  # what a scheduler sends before preemption
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  stopped = int(out.split("Training stopped at step ")[1].split(";")[0])
  assert Checkpointer(workdir, read_only=True).latest_step() == stopped >= 2


def test_sigkill_then_restart_matches_an_uninterrupted_run(tmp_path):
  killed, straight = str(tmp_path / "killed"), str(tmp_path / "straight")
  args = ("--config.train.total_steps=12", "--config.train.log_every=1",
          "--config.train.checkpoint_every=3")
  proc = subprocess.Popen(_train_cli(killed, *args), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while len(read_metrics(killed)) < 7 and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.kill()  # SIGKILL: no chance to save
  proc.wait()
  assert len(read_metrics(killed)) < 12
  restart = subprocess.run(_train_cli(killed, *args), cwd=REPO, capture_output=True, text=True,
                           timeout=600)
  assert restart.returncode == 0 and "Resuming from step" in restart.stdout, restart.stderr[-2000:]
  train(tiny_config(total_steps=12, log_every=1, checkpoint_every=3), straight)
  for a, b in zip(_params(straight), _params(killed)):
    np.testing.assert_array_equal(a, b)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
  workdir = str(tmp_path)
  train(tiny_config(total_steps=4, checkpoint_every=2), workdir)
  for path in glob.glob(os.path.join(workdir, "checkpoints", "4", "state", "**", "d", "*"),
                        recursive=True):
    with open(path, "r+b") as f:  # truncate every data file of the newest state
      f.truncate(max(1, os.path.getsize(path) // 3))
  capsys.readouterr()
  assert train(tiny_config(total_steps=6, checkpoint_every=2), workdir) == 6
  out = capsys.readouterr().out
  assert "checkpoint 4 is unreadable" in out and "Resuming from step 2" in out
  assert os.listdir(os.path.join(workdir, "unreadable_checkpoints"))[0].startswith("4-")  # kept


def _two_processes(workdir, total_steps):
  """train.py as two JAX processes (one CPU device each) that find each other on localhost."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen(
      _train_cli(workdir, "--config.distributed=True",
                 f"--config.cluster.coordinator_address=localhost:{port}",
                 "--config.cluster.num_processes=2", f"--config.cluster.process_id={i}",
                 f"--config.train.total_steps={total_steps}", "--config.train.log_every=1",
                 "--config.train.checkpoint_every=3"),
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [out for out, _ in outs]


def test_two_processes_train_like_one_and_resume(tmp_path):
  """Two processes, each reading its half of every global batch, compute what one process does
  (same batches row for row, same noise and labels), write metrics once, and resume together."""
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  _two_processes(multi, 4)
  outs = _two_processes(multi, 6)
  assert "Resuming from step 4" in outs[0]  # process 0 reports it
  assert Checkpointer(multi, read_only=True).all_steps() == [3, 4, 6]
  train(tiny_config(total_steps=6, log_every=1, checkpoint_every=3), single)
  got, want = read_metrics(multi), read_metrics(single)
  assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]  # one line per step: process 0 only
  # The first gradient (same initial parameters) depends on every row of the batch and its
  # noise; later steps drift apart by summation order, which AdamW's normalisation amplifies.
  assert got[0]["grad_norm"] == pytest.approx(want[0]["grad_norm"], rel=1e-5)
  np.testing.assert_allclose([m["loss"] for m in got], [m["loss"] for m in want], rtol=1e-4)

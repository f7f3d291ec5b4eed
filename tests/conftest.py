"""Shared pytest set-up: CPU only, quiet logs, helpers to randomise parameters."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's compiled programs are kept on disk and shared by the test workers and every subprocess
# they start (which inherit the variables): many tests train the same tiny model in a new
# process, and a process that finds its programs compiled starts in 6 s instead of 16-22 s.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(REPO, ".pytest_cache", "xla_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402


def randomize_params(model, seed: int = 0, scale: float = 0.1):
  """Adds noise to every Param, so zero-initialised adaLN/final layers do not hide bugs."""
  graphdef, params = nnx.split(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


@pytest.fixture
def rng():
  import numpy as np
  return np.random.default_rng(0)


def tiny_config(**train_overrides):
  """configs/digits.py:runlocal (a 2-layer DiG, batch 8) with train.* overrides."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("digits_config",
                                                os.path.join(REPO, "configs", "digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("runlocal")
  for key, value in train_overrides.items():
    config.train[key] = value
  return config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """A workdir holding a 4-step run of the tiny digits config (checkpoints at 2 and 4)."""
  from dig_jax.train.loop import train
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  train(tiny_config(total_steps=4, checkpoint_every=2), workdir)
  return workdir


def run_cli(*args, timeout=600):
  """Runs a repository script in a subprocess; returns the CompletedProcess (text output)."""
  import subprocess
  import sys
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)


def run_on_8_devices(script: str, *args: str) -> dict:
  """Runs tests/<script> (with `args`) in a subprocess with 8 fake CPU devices; returns the JSON
  object its last output line prints (asserting that it exited cleanly)."""
  import json
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.join(REPO, "tests", script), *args], env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])

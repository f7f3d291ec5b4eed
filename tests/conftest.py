"""Shared pytest set-up: CPU only, quiet logs, helpers to randomise parameters."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

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

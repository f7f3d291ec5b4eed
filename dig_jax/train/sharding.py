"""Where arrays live: the device mesh and the sharding of state and batches (the one place)."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over every device of every process.

  Axis types are given explicitly: the default of jax.make_mesh changed between versions.
  """
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Examples split over the data axis."""
  return NamedSharding(mesh, P("data"))


def state_shardings(state, mesh):
  """Shardings for the train state pytree: replicated (parameters are small enough here)."""
  return jax.tree.map(lambda _: replicated(mesh), state)


def global_batch(local_batch: dict, mesh) -> dict:
  """This process's numpy batch -> one global jax.Array per key, sharded over `data`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}

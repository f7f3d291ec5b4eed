"""Where arrays live: the device mesh and the sharding rules for state and batches (the one place).

Mesh axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose devices also split
the parameters, EMA and optimizer state). A state array is sharded along `fsdp` on its largest
dimension divisible by the fsdp size when it holds at least `fsdp_min_size_mb`; smaller arrays,
the vector of small arrays (layout.py), and every array when fsdp == 1, are replicated. Batches
are split over both axes.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
  """Resolves -1 (all remaining devices) in (data, fsdp) and checks the product."""
  if data == -1 and fsdp == -1:
    raise ValueError("config.mesh: at most one of data and fsdp can be -1")
  if data == -1 or fsdp == -1:
    known = fsdp if data == -1 else data
    if known < 1 or num_devices % known:
      raise ValueError(f"config.mesh: {known} does not divide the {num_devices} devices")
    data, fsdp = (num_devices // known, fsdp) if data == -1 else (data, num_devices // known)
  if data < 1 or fsdp < 1 or data * fsdp != num_devices:
    raise ValueError(f"config.mesh: data={data} x fsdp={fsdp} must equal the number of devices "
                     f"({num_devices})")
  return data, fsdp


def initialize_distributed(config) -> None:
  """With config.distributed: jax.distributed.initialize() before any other JAX call, passing
  the config.cluster values that are set (None: JAX detects them, e.g. from SLURM or TPU)."""
  if config.distributed:
    cluster = config.get("cluster", {})
    jax.distributed.initialize(**{k: v for k, v in dict(cluster).items() if v is not None})


def make_mesh(data: int = -1, fsdp: int = 1) -> jax.sharding.Mesh:
  """A (data, fsdp) mesh over every device of every process.

  Axis types are explicit (Auto): the default of jax.make_mesh changed between JAX versions.
  """
  shape = mesh_shape(data, fsdp, jax.device_count())
  return jax.make_mesh(shape, ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Examples split over every device (both mesh axes)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def array_spec(shape, itemsize: int, fsdp_size: int, min_size_mb: float) -> P:
  """The rule for one state array: fsdp on its largest divisible dimension, if big enough."""
  if fsdp_size == 1 or math.prod(shape) * itemsize < min_size_mb * 2**20:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_specs(state, fsdp_size: int, min_size_mb: float = 4.0):
  """A PartitionSpec for every array of the train state (params, EMA, optimizer, step). The
  layout's vector of small arrays (key "flat", layout.py) stays replicated whatever its size:
  it holds only arrays that stay replicated on their own, so the model's slices of it need no
  gather."""
  def spec(path, x):
    if path and getattr(path[-1], "key", None) == "flat":
      return P()
    return array_spec(x.shape, np.dtype(x.dtype).itemsize, fsdp_size, min_size_mb)
  return jax.tree_util.tree_map_with_path(spec, state)


def state_shardings(state, mesh, min_size_mb: float = 4.0):
  """A NamedSharding for every array of the train state (`state_specs` on `mesh`)."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                      state_specs(state, mesh.shape["fsdp"], min_size_mb),
                      is_leaf=lambda x: isinstance(x, P))


def global_batch(local_batch: dict, mesh) -> dict:
  """This process's numpy batch -> one global jax.Array per key, split over all devices."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}

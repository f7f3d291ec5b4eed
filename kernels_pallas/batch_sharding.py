"""Runs a Pallas kernel per batch shard under the trainer's mesh.

XLA cannot partition a Pallas call (an opaque custom call to it): under a sharded jit it would
gather the whole batch onto every device and run the kernel there, so data-parallel training
would not scale. The kernels here mix values within an example only, so splitting the batch
over every mesh axis, the trainer's batch layout, needs no communication (parameters given to
a kernel, such as the conv's weights, are replicated, and their gradients summed over shards).
"""
from __future__ import annotations

import jax


def ambient_mesh(batch: int):
  """The mesh set with `jax.set_mesh`, if it has several devices and splits `batch` evenly."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or batch % mesh.size:
    return None
  return mesh


def batch_sharded(fn, mesh, batched: tuple[bool, ...], n_out: int):
  """`fn` run on each device's examples: inputs with `batched` True are split along their first
  axis over every mesh axis, the others replicated; the n_out outputs are batched."""
  split = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
  whole = jax.sharding.PartitionSpec()
  in_specs = tuple(split if b else whole for b in batched)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=(split,) * n_out,
                       check_vma=False)


def per_batch_shard(fn, batch: int, batched: tuple[bool, ...], n_out: int):
  """`fn` itself, or `batch_sharded(fn, ...)` under the ambient mesh when it splits `batch`."""
  mesh = ambient_mesh(batch)
  return fn if mesh is None else batch_sharded(fn, mesh, batched, n_out)

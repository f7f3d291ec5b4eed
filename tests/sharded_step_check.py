"""Run by test_sharding.py in a subprocess with 8 fake CPU devices: one train step on several
meshes, printed as JSON (parameters after the step, and the sharding of a large kernel)."""
import json
import sys

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import tiny_config  # noqa: E402
from dig_jax.diffusion import create_schedule  # noqa: E402
from dig_jax.train import sharding  # noqa: E402
from dig_jax.train.layout import flat_below  # noqa: E402
from dig_jax.train.optimizer import make_optimizer  # noqa: E402
from dig_jax.train.state import create_sharded_state  # noqa: E402
from dig_jax.train.step import make_train_step  # noqa: E402


def one_step(mesh, config):
  below = flat_below("auto", mesh.shape["fsdp"], config.mesh.fsdp_min_size_mb)  # the trainer's
  tx = make_optimizer(config.train)
  graphdef, layout, state, shardings = create_sharded_state(config, tx, mesh, below)
  step = jax.jit(make_train_step(graphdef, layout, tx, create_schedule(1000), config.train,
                                 null_class=10, learn_sigma=True, base_key=jax.random.key(0)),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)))
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (8, 32, 32, 1)).astype(np.float32),
           "label": rng.integers(0, 10, 8).astype(np.int32)}
  state, _ = step(state, sharding.global_batch(batch, mesh))
  params = layout.tree(state["params"])  # a large array as it is, a small one sliced
  kernel = params["blocks"][0]["mlp"]["up"]["kernel"]
  return ([np.asarray(x).tolist() for x in jax.tree.leaves(params)],
          str(kernel.sharding.spec), len(kernel.addressable_shards[0].data.reshape(-1)), below)


def lowers_with_kernels(mesh, config) -> dict:
  """Does the sharded train step lower with the Pallas GLA kernels, for tpu and for cuda?"""
  out = {}
  for backend, platform in (("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")):
    config.model.gla_backend = backend
    tx = make_optimizer(config.train)
    graphdef, layout, state, shardings = create_sharded_state(config, tx, mesh, 0)
    step = jax.jit(make_train_step(graphdef, layout, tx, create_schedule(1000), config.train,
                                   null_class=10, learn_sigma=True, base_key=jax.random.key(0)),
                   in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)))
    batch = {"image": jax.ShapeDtypeStruct((8, 32, 32, 1), np.float32),
             "label": jax.ShapeDtypeStruct((8,), np.int32)}
    with jax.set_mesh(mesh):  # as in the trainer
      text = step.trace(state, batch).lower(lowering_platforms=(platform,)).as_text()
    out[platform] = text.count("tpu_custom_call" if platform == "tpu" else "triton")
  config.model.gla_backend = "auto"
  return out


def main():
  config = tiny_config()
  config.mesh.fsdp_min_size_mb = 0.0  # the tiny model's kernels are small: shard them anyway
  devices = np.array(jax.devices())
  results = {}
  for data, fsdp in ((1, 1), (2, 4), (8, 1)):
    mesh = Mesh(devices[:data * fsdp].reshape(data, fsdp), ("data", "fsdp"),
                axis_types=(AxisType.Auto, AxisType.Auto))
    params, spec, shard_size, below = one_step(mesh, config)
    results[f"{data}x{fsdp}"] = {"params": params, "spec": spec, "shard_size": shard_size,
                                 "flat_below": below}
    if (data, fsdp) == (2, 4):
      results["kernel_calls_lowered"] = lowers_with_kernels(mesh, config)
  print(json.dumps({"num_devices": len(devices), "results": results}))


if __name__ == "__main__":
  main()

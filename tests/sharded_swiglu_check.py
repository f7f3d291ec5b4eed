"""Run by test_swiglu_kernels.py in a subprocess with 8 fake CPU devices: `swiglu_linear` with
the Pallas backward (interpret mode) inside a sharded jit under an 8-device mesh; prints JSON
with the relative errors of the loss and the gradients against one device, and the rows each
kernel call sees."""
import json

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from dig_jax.train.sharding import make_mesh
from kernels_pallas.swiglu import swiglu_linear


def main():
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  ab = 2.0 * jax.random.normal(ks[0], (16, 4, 4, 64))
  w = jax.random.normal(ks[1], (32, 24))
  dout = jax.random.normal(ks[2], (16, 4, 4, 24))

  def loss(ab, w):
    return jnp.sum(swiglu_linear(ab, w, backend="pallas_gpu", interpret=True) * dout)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  want_loss, want_grads = step(ab, w)
  mesh = make_mesh(2, 4)  # the trainer's mesh (Auto axes)
  with jax.set_mesh(mesh):
    abs_ = jax.device_put(ab, NamedSharding(mesh, P(("data", "fsdp"))))
    got_loss, got_grads = step(abs_, w)
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(abs_, w)
  sizes = [int(e.invars[0].aval.shape[0]) for e in _eqns(jaxpr.jaxpr)
           if e.primitive.name == "pallas_call"]
  rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
  print(json.dumps({"num_devices": jax.device_count(), "kernel_rows": sizes,
                    "loss_rel_err": rel(got_loss, want_loss),
                    "grad_rel_errs": [rel(a, b) for a, b in zip(got_grads, want_grads)]}))


def _eqns(jaxpr):
  from jax.extend.core import jaxprs_in_params
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jaxprs_in_params(eqn.params):
      yield from _eqns(sub)


if __name__ == "__main__":
  main()

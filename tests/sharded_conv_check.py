"""Run by test_conv_kernels.py in a subprocess with 8 fake CPU devices: the Pallas depthwise
conv (interpret mode) inside a sharded jit under an 8-device mesh; prints JSON with the
relative errors of the output and the gradients against one device, and the batch each kernel
call sees."""
import json

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpr_eqns import eqns
from kernels_pallas.conv import depthwise_conv3x3


def main():
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(ks[0], (16, 4, 8, 32))
  kernel = jax.random.normal(ks[1], (3, 3, 32))
  bias = jax.random.normal(ks[2], (32,))
  dy = jax.random.normal(ks[3], x.shape)

  def loss(x, kernel, bias):
    return jnp.sum(depthwise_conv3x3(x, kernel, bias, backend="pallas_gpu", interpret=True) * dy)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  want_loss, want_grads = step(x, kernel, bias)
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
    got_loss, got_grads = step(xs, kernel, bias)
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(xs, kernel, bias)
  sizes = [int(e.invars[0].aval.shape[0]) for e in eqns(jaxpr.jaxpr)
           if e.primitive.name == "pallas_call"]
  rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
  print(json.dumps({"num_devices": jax.device_count(), "kernel_batch_sizes": sizes,
                    "loss_rel_err": rel(got_loss, want_loss),
                    "grad_rel_errs": [rel(a, b) for a, b in zip(got_grads, want_grads)]}))


if __name__ == "__main__":
  main()

"""Run by test_conv_kernels.py in a subprocess with 8 fake CPU devices: the Pallas depthwise
conv and the gated residual conv (interpret mode) inside a sharded jit under an 8-device mesh;
prints JSON with, for each, the relative errors of the loss and the gradients against one
device, and the batch each kernel call sees."""
import json

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpr_eqns import eqns
from kernels_pallas.conv import depthwise_conv3x3, gated_residual_conv3x3


def check(loss, args, batched):
  """{kernel_batch_sizes, loss_rel_err, grad_rel_errs} of loss's value and gradients over all
  args, one device against the (2, 4) mesh with the `batched` args split over it."""
  argnums = tuple(range(len(args)))
  step = jax.jit(jax.value_and_grad(loss, argnums=argnums))
  want_loss, want_grads = step(*args)
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
  with jax.set_mesh(mesh):
    split = NamedSharding(mesh, P(("data", "fsdp")))
    sharded = [jax.device_put(a, split) if b else a for a, b in zip(args, batched)]
    got_loss, got_grads = step(*sharded)
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=argnums))(*sharded)
  sizes = [int(e.invars[0].aval.shape[0]) for e in eqns(jaxpr.jaxpr)
           if e.primitive.name == "pallas_call"]
  rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
  return {"kernel_batch_sizes": sizes, "loss_rel_err": rel(got_loss, want_loss),
          "grad_rel_errs": [rel(a, b) for a, b in zip(got_grads, want_grads)]}


def main():
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  x = jax.random.normal(ks[0], (16, 4, 8, 32))
  kernel = jax.random.normal(ks[1], (3, 3, 32))
  bias = jax.random.normal(ks[2], (32,))
  dy = jax.random.normal(ks[3], x.shape)
  gate = jax.random.normal(ks[4], (16, 32))
  branch = jax.random.normal(ks[5], x.shape)

  def conv_loss(x, kernel, bias):
    return jnp.sum(depthwise_conv3x3(x, kernel, bias, backend="pallas_gpu", interpret=True) * dy)

  def residual_loss(x, gate, branch, kernel, bias):
    y = gated_residual_conv3x3(x, gate, branch, kernel, bias, backend="pallas_gpu",
                               interpret=True)
    return jnp.sum(y * dy)

  print(json.dumps({
      "num_devices": jax.device_count(),
      "conv": check(conv_loss, (x, kernel, bias), (True, False, False)),
      "gated_residual_conv": check(residual_loss, (x, gate, branch, kernel, bias),
                                   (True, True, True, False, False))}))


if __name__ == "__main__":
  main()

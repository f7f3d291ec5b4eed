"""Run by test_elementwise_sharded.py in a subprocess with 8 fake CPU devices: `swiglu_linear`,
`gated_norm_linear`, `gla_layer` (one VJP), `layer_norm_modulate`,
`layer_norm_modulate_with_input` and `residual_layer_norm_modulate` with their Pallas kernels
(interpret mode) inside a sharded jit under the trainer's 8-device mesh; prints JSON with, per function, the relative
errors of the loss and the gradients against one device and the rows each kernel call sees."""
import json

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from dig_jax.train.sharding import make_mesh
from jaxpr_eqns import eqns
from kernels_pallas.adaln import (layer_norm_modulate, layer_norm_modulate_with_input,
                                  residual_layer_norm_modulate)
from kernels_pallas.gated_norm import gated_norm_linear
from kernels_pallas.gla.layer import gla_layer
from kernels_pallas.swiglu import swiglu_linear

GATE_OFFSET = 64  # gated_norm's gate columns start here in y


def _cases():
  ks = jax.random.split(jax.random.PRNGKey(0), 8)
  ab = 2.0 * jax.random.normal(ks[0], (16, 4, 4, 64))
  w = jax.random.normal(ks[1], (32, 24))
  dout = jax.random.normal(ks[2], (16, 4, 4, 24))
  swiglu = (lambda ab, w: jnp.sum(swiglu_linear(ab, w, backend="pallas_gpu", interpret=True)
                                  * dout), (ab, w))
  o = jax.random.normal(ks[3], (16, 16, 2, 16))
  y = 2.0 * jax.random.normal(ks[4], (16, 16, GATE_OFFSET + 32 + 8))
  scale = 1.0 + 0.1 * jax.random.normal(ks[5], (16,))
  wo = jax.random.normal(ks[6], (32, 24))
  dout2 = jax.random.normal(ks[7], (16, 16, 24))
  gated = (lambda o, y, scale, wo: jnp.sum(
      gated_norm_linear(o, y, scale, wo, gate_offset=GATE_OFFSET, backend="pallas_gpu",
                        interpret=True) * dout2), (o, y, scale, wo))
  # gla_layer with one VJP: 2 heads of K 16, V 32, rank 4 -> y has 2 (32 + 32) + 64 + 4 columns
  ks = jax.random.split(jax.random.PRNGKey(1), 6)
  y = jax.random.normal(ks[0], (16, 16, 196))
  gate = (jax.random.normal(ks[1], (4, 32)), 1.0 + jax.random.normal(ks[2], (32,)))
  dout3 = jax.random.normal(ks[5], (16, 16, 24))
  layer = (lambda y, wg, bg, scale, wo: jnp.sum(gla_layer(
      y, wg, bg, scale, wo, heads=2, key_dim=16, value_dim=32, backend="pallas_gpu",
      output_backend="pallas_gpu", interpret=True) * dout3),
      (y, *gate, 1.0 + 0.1 * jax.random.normal(ks[3], (32,)), jax.random.normal(ks[4], (64, 24))))
  # adaLN's norm on DiG's grid layout [N, h, w, D]
  ks = jax.random.split(jax.random.PRNGKey(2), 4)
  dout4 = jax.random.normal(ks[3], (16, 4, 4, 48))
  norm = (lambda x, shift, scale: jnp.sum(layer_norm_modulate(
      x, shift, scale, backend="pallas_gpu", interpret=True) * dout4),
      (2.0 * jax.random.normal(ks[0], (16, 4, 4, 48)), jax.random.normal(ks[1], (16, 48)),
       jax.random.normal(ks[2], (16, 48))))
  # the same after a gated residual add: both outputs (h and the norm) in the loss
  ks = jax.random.split(jax.random.PRNGKey(3), 6)
  dh = jax.random.normal(ks[5], (16, 4, 4, 48))

  def with_input_loss(x, shift, scale):  # both outputs in the loss: x's gradient is summed
    x_out, y = layer_norm_modulate_with_input(x, shift, scale, backend="pallas_gpu",
                                              interpret=True)
    return jnp.sum(x_out * dh) + jnp.sum(y * dout4)

  with_input = (with_input_loss, norm[1])

  def residual_loss(x, gate, branch, shift, scale):
    h, y = residual_layer_norm_modulate(x, gate, branch, shift, scale, backend="pallas_gpu",
                                        interpret=True)
    return jnp.sum(h * dh) + jnp.sum(y * dout4)

  residual = (residual_loss, (2.0 * jax.random.normal(ks[0], (16, 4, 4, 48)),
                              jax.random.normal(ks[1], (16, 48)),
                              jax.random.normal(ks[2], (16, 4, 4, 48)),
                              jax.random.normal(ks[3], (16, 48)),
                              jax.random.normal(ks[4], (16, 48))))
  return {"swiglu_linear": swiglu, "gated_norm_linear": gated, "gla_layer": layer,
          "layer_norm_modulate": norm, "layer_norm_modulate_with_input": with_input,
          "residual_layer_norm_modulate": residual}


def main():
  mesh = make_mesh(2, 4)  # the trainer's mesh (Auto axes)
  result = {"num_devices": jax.device_count()}
  for name, (loss, args) in _cases().items():
    argnums = tuple(range(len(args)))
    step = jax.jit(jax.value_and_grad(loss, argnums=argnums))
    want_loss, want_grads = step(*args)
    with jax.set_mesh(mesh):
      batch = NamedSharding(mesh, P(("data", "fsdp")))
      # activations ([a, b]; o and y) split over the batch, parameters replicated
      sharded = tuple(jax.device_put(a, batch) if a.ndim >= 3 else a for a in args)
      got_loss, got_grads = step(*sharded)
      jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=argnums))(*sharded)
    rows = [int(e.invars[0].aval.shape[0]) for e in eqns(jaxpr.jaxpr)
            if e.primitive.name == "pallas_call"]
    rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    result[name] = {"kernel_rows": rows, "loss_rel_err": rel(got_loss, want_loss),
                    "grad_rel_errs": [rel(a, b) for a, b in zip(got_grads, want_grads)]}
  print(json.dumps(result))


if __name__ == "__main__":
  main()

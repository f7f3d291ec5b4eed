"""Run by test_gla_kernels.py in a subprocess with 8 fake CPU devices: the Pallas GLA kernel under
a (data 2, fsdp 4) mesh, inside a sharded jit; prints JSON with errors against the token-by-token
reference, the batch size each kernel call sees, and whether the sharded program lowers for cuda
and tpu."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import jaxprs_in_params
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from dig_jax.train.sharding import make_mesh  # noqa: E402
from kernels_pallas.gla import chunk_gla, chunk_gla_packed, reference  # noqa: E402

B, T, H, K, V = 8, 100, 2, 32, 64


def loss_fn(gla):
  def loss(q, k, v, g, h0, do):
    o, ht = gla(q, k, v, g, initial_state=h0, output_final_state=True)
    return jnp.sum(o * do) + jnp.sum(ht * h0)
  return loss


def packed(gla):
  """`gla` as chunk_gla_packed's caller sees it: q, k, v packed into one array (whole chunks,
  so the GPU kernels read it in place)."""
  def run(q, k, v, g, **kw):
    b, t = q.shape[:2]
    qkv = jnp.concatenate([x.reshape(b, t, -1) for x in (q, k, v)], axis=-1)
    return gla(qkv, g, **kw)
  return run


def kernel_batch_sizes(jaxpr) -> list[int]:
  """Leading dim of the first operand of every pallas_call, nested jaxprs included."""
  sizes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      sizes.append(int(eqn.invars[0].aval.shape[0]))
    for sub in jaxprs_in_params(eqn.params):
      sizes += kernel_batch_sizes(sub)
  return sizes


def main():
  rng = np.random.default_rng(0)
  q, k = (rng.standard_normal((B, T, H, K)).astype(np.float32) for _ in range(2))
  v, do = (rng.standard_normal((B, T, H, V)).astype(np.float32) for _ in range(2))
  g = np.log(1 / (1 + np.exp(-rng.standard_normal((B, T, H, K))))).astype(np.float32) / 16
  h0 = rng.standard_normal((B, H, K, V)).astype(np.float32)
  args = (q, k, v, g, h0, do)

  want = jax.jit(jax.value_and_grad(loss_fn(reference.recurrent_gla), argnums=range(5)))(*args)
  kernel = lambda *a, **kw: chunk_gla(*a, backend="pallas_gpu", interpret=True, **kw)
  mesh = make_mesh(data=2, fsdp=4)
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  sharded_args = [jax.device_put(x, batch) for x in args]
  step = jax.jit(jax.value_and_grad(loss_fn(kernel), argnums=range(5)))
  with jax.set_mesh(mesh):
    got = step(*sharded_args)
    sizes = kernel_batch_sizes(jax.make_jaxpr(step)(*sharded_args).jaxpr)
    lowers = {}
    for backend, platform in (("pallas_gpu", "cuda"), ("pallas_tpu", "tpu")):
      fn = jax.jit(jax.value_and_grad(loss_fn(lambda *a, b=backend, **kw: chunk_gla(
          *a, backend=b, **kw)), argnums=range(5)))
      text = fn.trace(*sharded_args).lower(lowering_platforms=(platform,)).as_text()
      lowers[platform] = "triton" in text or "tpu_custom_call" in text
    # The packed entry point, at a T of whole chunks (96 tokens).
    whole = [x[:, :96] if x.ndim == 4 else x for x in args]
    want_packed = jax.jit(jax.value_and_grad(loss_fn(reference.recurrent_gla),
                                             argnums=range(5)))(*whole)
    packed_kernel = packed(lambda *a, **kw: chunk_gla_packed(*a, backend="pallas_gpu",
                                                             interpret=True, **kw))
    packed_step = jax.jit(jax.value_and_grad(loss_fn(packed_kernel), argnums=range(5)))
    sharded_whole = [jax.device_put(x, batch) for x in whole]
    got_packed = packed_step(*sharded_whole)
    sizes_packed = kernel_batch_sizes(jax.make_jaxpr(packed_step)(*sharded_whole).jaxpr)
  rel = lambda a, b: float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))
  print(json.dumps({
      "loss_rel_err": rel(got[0], want[0]),
      "grad_rel_errs": [rel(a, b) for a, b in zip(got[1], want[1])],
      "kernel_batch_sizes": sizes,
      "packed_rel_errs": [rel(got_packed[0], want_packed[0])] + [
          rel(a, b) for a, b in zip(got_packed[1], want_packed[1])],
      "packed_kernel_batch_sizes": sizes_packed,
      "lowers": lowers,
  }))


if __name__ == "__main__":
  main()

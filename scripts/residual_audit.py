"""What one DiG block and one DiT block keep for the backward pass, in bytes per token.

    python scripts/residual_audit.py [--hidden 384] [--grid 32] [--compile]

Lists `saved_residuals` of one block's vjp (w.r.t. its input and parameters) in bf16 compute,
item by item, and the per-token sum of the residuals that scale with the number of tokens.
The token mixers are the GPU paths: DiG's GLA with the `pallas_gpu` kernel in interpret mode
(traced only; its custom_vjp keeps the packed q, k, v array, g and per-block states) and DiT's attention with a
stand-in for cuDNN's custom_vjp (keeps q, k, v, o and the fp32 softmax statistics, as
jax._src.cudnn.fused_attention_stablehlo does).

These are jaxpr-level residuals: XLA keeps fewer (it recomputes cheap elementwise values inside
its fusions, e.g. layer_norm's fp32 temporaries, and the conv's nine shifted slices are one
padded array), and on GPUs it may keep other buffers too; for what the compiled GPU step holds
at its peak, see scripts/memory_probe.py.

--compile also prints the CPU proxy (a weak one: the CPU compiler converts bf16 matmul
operands to fp32 and fuses differently): temp bytes of a compiled bf16 loss+grad of a small
model (depths 2 and 4, batch 4, 32x32 latents), its per-block slope, and a rough step time.
There the GLA is a cheap placeholder with a custom_vjp that keeps exactly the packed q, k, v
array and g, as the kernel does (the jnp reference's fp32 chunk temporaries would hide the residuals on CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import time
from unittest import mock

import jax
import jax.numpy as jnp
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from dig_jax.models import dig, dit, registry
from kernels_pallas.gla import api as gla_api
from kernels_pallas.gla.api import unpack_qkv


@jax.custom_vjp
def _cudnn_like_attention(q, k, v):
  return _attention(q, k, v)[0]


def _attention(q, k, v):
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
  lse = jax.nn.logsumexp(s, axis=-1)
  o = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(s - lse[..., None]).astype(v.dtype), v)
  return o, lse


def _cudnn_like_fwd(q, k, v):
  o, lse = _attention(q, k, v)
  return o, (q, k, v, o, lse)


def _cudnn_like_bwd(res, do):
  q, k, v, _, _ = res
  return jax.vjp(lambda *a: _attention(*a)[0], q, k, v)[1](do)


_cudnn_like_attention.defvjp(_cudnn_like_fwd, _cudnn_like_bwd)


def cudnn_like(q, k, v, implementation=None):
  del implementation
  return _cudnn_like_attention(q, k, v)


def _cheap_gla(q, k, v, g):
  """A placeholder token mixer with GLA's shapes, O(T) and elementwise: CPU compiles of the
  jnp reference GLA hold large fp32 chunk temporaries that would hide the residuals."""
  w = jax.nn.sigmoid(jnp.sum(q.astype(jnp.float32) * k * jnp.exp(g), -1, keepdims=True))
  return (v * w).astype(v.dtype)


def _cheap_packed_gla(qkv, g, value_dim):
  return _cheap_gla(*unpack_qkv(qkv, *g.shape[2:], value_dim), g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _kernel_like(qkv, g, value_dim):
  return _cheap_packed_gla(qkv, g, value_dim)


_kernel_like.defvjp(
    lambda qkv, g, value_dim: (_cheap_packed_gla(qkv, g, value_dim), (qkv, g)),
    lambda value_dim, res, do: jax.vjp(lambda *a: _cheap_packed_gla(*a, value_dim), *res)[1](do))


def kernel_like_gla(qkv, g, *, value_dim, **_):
  """chunk_gla_packed stand-in for CPU compiles: keeps the packed q, k, v array and g, as the
  GPU kernel does (less its small per-block states); its values are not GLA's."""
  return _kernel_like(qkv, g, value_dim), None


@contextlib.contextmanager
def gpu_like_mixers(gla_stand_in: bool):
  """DiT attention as cuDNN's residuals; DiG's GLA as the kernel's (stand-in or interpret)."""
  patches = [mock.patch.object(dit.jax.nn, "dot_product_attention", cudnn_like)]
  if gla_stand_in:
    patches.append(mock.patch.object(gla_api, "chunk_gla_packed", kernel_like_gla))
  with contextlib.ExitStack() as stack:
    for p in patches:
      stack.enter_context(p)
    yield


def make_block(family, hidden, *, layer_index=0):
  rngs = nnx.Rngs(0)
  if family == "DiG":
    return dig.DiGBlock(hidden, hidden // 64, registry.swiglu_hidden(hidden),
                        layer_index=layer_index, dtype=jnp.bfloat16, gla_backend="pallas_gpu",
                        pallas_interpret=True, rngs=rngs)
  heads = {384: 6, 768: 12, 1024: 16, 1152: 16}[hidden]
  return dit.DiTBlock(hidden, heads, 4.0, dtype=jnp.bfloat16, rngs=rngs)


def block_residuals(block, family, hidden, grid, batch=3):
  """[(shape, dtype, bytes per token or None if not token-sized, description)]."""
  graphdef, state = nnx.split(block)
  tokens = batch * grid * grid
  shape = (batch, grid, grid, hidden) if family == "DiG" else (batch, grid * grid, hidden)
  x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.bfloat16)
  c = jax.random.normal(jax.random.PRNGKey(1), (batch, hidden), jnp.bfloat16)

  def f(state, x, c):
    return nnx.merge(graphdef, state)(x, c)

  rows = []
  for aval, where in saved_residuals(f, state, x, c):
    size = math.prod(aval.shape) * aval.dtype.itemsize
    token_sized = aval.shape[:1] == (batch,) and math.prod(aval.shape) % tokens == 0
    per_token = size / tokens if token_sized else None
    rows.append((aval.shape, aval.dtype, per_token, where))
  return rows


def print_audit(family, hidden, grid):
  with gpu_like_mixers(gla_stand_in=False):
    rows = block_residuals(make_block(family, hidden), family, hidden, grid)
  total = 0.0
  print(f"\n{family} block, hidden {hidden}, {grid}x{grid} tokens, bf16 compute")
  for shape, dtype, per_token, where in rows:
    if per_token is None:
      continue
    total += per_token
    print(f"  {per_token:7.1f} B/token  {str(dtype):8s} {str(tuple(shape)):24s} {where[:110]}")
  small = sum(math.prod(s) * d.itemsize for s, d, p, _ in rows if p is None)
  print(f"  total {total:.1f} B/token/block (+ {small / 1e3:.0f} kB not token-sized)")
  return total


def compile_proxy(name, depth, *, batch=4, latent=32, steps=5):
  with gpu_like_mixers(gla_stand_in=True):
    extra = {"gla_backend": "reference"} if name.startswith("DiG") else {}
    model = registry.create_model(name, input_size=latent, in_channels=4, num_classes=10,
                                  rngs=nnx.Rngs(0), depth=depth, dtype=jnp.bfloat16, **extra)
    graphdef, params = nnx.split(model, nnx.Param)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, latent, latent, 4))
    t = jnp.arange(batch) * 100
    y = jnp.arange(batch) % 10

    @jax.jit
    def step(params):
      def loss(params):
        return jnp.mean(nnx.merge(graphdef, params)(x, t, y) ** 2)
      return jax.value_and_grad(loss)(params)

    compiled = step.lower(params).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(params))
    start = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(compiled(params))
    return temp, (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--hidden", type=int, default=384)
  parser.add_argument("--grid", type=int, default=32)
  parser.add_argument("--compile", action="store_true")
  args = parser.parse_args()
  totals = {fam: print_audit(fam, args.hidden, args.grid) for fam in ("DiG", "DiT")}
  print(f"\nDiG / DiT residuals per block: {totals['DiG'] / totals['DiT']:.3f}")
  if args.compile:
    tokens = 4 * 16 * 16
    for name in ("DiG-S/2", "DiT-S/2"):
      (t2, s2), (t4, s4) = compile_proxy(name, 2), compile_proxy(name, 4)
      print(f"{name}: temp {t2 / 2**20:.2f} MiB (depth 2), {t4 / 2**20:.2f} MiB (depth 4), "
            f"{(t4 - t2) / 2 / tokens:.0f} B/token/block; step {s2 * 1e3:.0f} / {s4 * 1e3:.0f} ms")


if __name__ == "__main__":
  main()

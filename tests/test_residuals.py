"""What a DiG block keeps for the backward pass, and that keeping less changed no gradient.

DiG's layers recompute a few elementwise pieces in the backward (jax.checkpoint) and write the
forget gate's derivative from its output (custom_vjp); these tests check the gradients against
plain jnp written from the parameters (no custom rules, no checkpoints), and that the pieces are
not kept.
"""
import contextlib
import io
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from conftest import randomize_params
from dig_jax.models import dig, gla
from dig_jax.models.scan_order import layer_orientation, orient_conv_kernel
from kernels_pallas.gla import api as gla_api
from kernels_pallas.gla import layer as gla_layer
from kernels_pallas.gla import reference
from kernels_pallas.gla.api import unpack_qkv


def _w(layer):
  return layer.kernel[...]


def plain_gla(attn, x, reverse):
  """The GLA layer in plain jnp from its parameters (float32, reference GLA)."""
  n, t, _ = x.shape
  heads = lambda a: a.reshape(n, t, attn.num_heads, -1)
  q, k, v = heads(x @ _w(attn.q_proj)), heads(x @ _w(attn.k_proj)), heads(x @ _w(attn.v_proj))
  gk = (x @ _w(attn.gk_down)) @ _w(attn.gk_up) + attn.gk_up.bias[...]
  gk = heads(jax.nn.log_sigmoid(gk) / 16.0)
  o, _ = reference.chunked_gla(q, k, v, gk, reverse=reverse)
  o = o * jax.lax.rsqrt(jnp.mean(o ** 2, axis=-1, keepdims=True) + 1e-6)
  o = (o * attn.o_norm_scale[...]).reshape(n, t, -1)
  return (o * jax.nn.silu(x @ _w(attn.g_proj))) @ _w(attn.o_proj)


def plain_block(block, x, c):
  """DiGBlock in plain jnp from its parameters (float32)."""
  mod = jax.nn.silu(c) @ _w(block.modulation.linear) + block.modulation.linear.bias[...]
  shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None, None] for m in jnp.split(mod, 6, -1))
  ln = lambda y: (y - y.mean(-1, keepdims=True)) / jnp.sqrt(y.var(-1, keepdims=True) + 1e-6)
  transposed, reverse = layer_orientation(block.layer_index)
  h = ln(x) * (1 + scale1) + shift1
  h = h.transpose(0, 2, 1, 3) if transposed else h
  n, a, b, d = h.shape
  mixed = plain_gla(block.attn, h.reshape(n, a * b, d), reverse).reshape(n, a, b, d)
  x = x + gate1 * (mixed.transpose(0, 2, 1, 3) if transposed else mixed)
  h = ln(x) * (1 + scale2) + shift2
  mlp = block.mlp
  x = x + gate2 * ((jax.nn.silu(h @ _w(mlp.gate)) * (h @ _w(mlp.up))) @ _w(mlp.down))
  kernel = orient_conv_kernel(block.conv_kernel[...], block.layer_index)
  y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", feature_group_count=d,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + block.conv_bias[...]


def _grads(fn, module, *args):
  """Gradients of sum(fn(module, *args) * fixed weights) w.r.t. the parameters and args."""
  graphdef, params = nnx.split(module, nnx.Param)

  def loss(p, *a):
    out = fn(nnx.merge(graphdef, p), *a)
    return jnp.sum(out * jax.random.normal(jax.random.key(9), out.shape))

  return jax.jit(jax.grad(loss, argnums=tuple(range(len(args) + 1))))(params, *args)


def _assert_trees_close(got, want, tol=1e-5):
  """Every gradient within tol of the plain one, relative to its largest entry (float32 matmuls
  summed in another order give about 3e-6; a wrong rule gives order 1)."""
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves)
  for g, w in zip(got_leaves, want_leaves):
    g, w = np.asarray(g), np.asarray(w)
    np.testing.assert_allclose(g, w, rtol=0, atol=tol * np.max(np.abs(w)))


@pytest.mark.parametrize("reverse", [True])
def test_gla_layer_gradients_match_plain_jnp(reverse):
  attn = randomize_params(gla.GatedLinearAttention(64, 2, backend="reference",
                                                   rngs=nnx.Rngs(0)), scale=0.3)
  x = jax.random.normal(jax.random.key(1), (2, 70, 64))  # 70: a partial last chunk
  got = _grads(lambda m, x: m(x, reverse=reverse), attn, x)
  want = _grads(lambda m, x: plain_gla(m, x, reverse), attn, x)
  _assert_trees_close(got, want)


@pytest.mark.parametrize("layer_index", [3])  # transposed and reversed; test_models covers all
def test_dig_block_gradients_match_plain_jnp(layer_index):
  block = randomize_params(dig.DiGBlock(64, 2, 128, layer_index=layer_index,
                                        gla_backend="reference", rngs=nnx.Rngs(0)), scale=0.3)
  keys = jax.random.split(jax.random.key(2), 2)
  x = jax.random.normal(keys[0], (2, 6, 5, 64))
  c = jax.random.normal(keys[1], (2, 64))
  got = _grads(lambda m, x, c: m(x, c), block, x, c)
  want = _grads(plain_block, block, x, c)
  _assert_trees_close(got, want)


def test_forget_gate_derivative_from_its_output():
  """-expm1(log_sigmoid(z)) against sigmoid(-z), in float32, out to saturated gates."""
  z = jnp.concatenate([jnp.linspace(-120.0, 120.0, 4001), jnp.array([-1e-3, 0.0, 1e-3])])
  got = jax.vmap(jax.grad(lambda z: gla_layer.log_sigmoid_scaled(z, 16.0)))(z)
  want = jax.nn.sigmoid(-z) / 16.0
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
  assert np.all(np.isfinite(got))


def _kernel_like_chunk_gla_packed(qkv, g, *, value_dim, reverse=False, **_):
  """chunk_gla_packed with the GPU kernel's residuals (the packed array itself and g) and the
  reference's values."""
  def values(qkv, g):
    return reference.chunked_gla(*unpack_qkv(qkv, *g.shape[2:], value_dim), g,
                                 reverse=reverse)[0]
  fn = jax.custom_vjp(values)
  fn.defvjp(lambda *a: (fn(*a), a), lambda res, do: jax.vjp(values, *res)[1](do))
  return fn(qkv, g), None


_ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "bool": 1}


def saved_residual_bytes(block, x, c, tokens):
  """[(bytes per token, description)] of the token-sized residuals of block's vjp."""
  graphdef, state = nnx.split(block)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(lambda s, x, c: nnx.merge(graphdef, s)(x, c), state, x, c)
  rows = []
  for line in out.getvalue().splitlines():
    m = re.match(r"(\w+)\[([\d,]*)\] (.*)", line)
    if not m or not m.group(2):
      continue
    shape = [int(s) for s in m.group(2).split(",")]
    size = int(np.prod(shape)) * _ITEMSIZE[m.group(1)]
    if len(shape) >= 3 and shape[0] == x.shape[0] and np.prod(shape) % tokens == 0:
      rows.append((size / tokens, m.group(3)))
  return rows


def test_dig_block_keeps_no_recomputable_pieces():
  """At DiG-S/2's width in bf16: nothing from the output norm/gate or the SwiGLU product is
  kept, nor the forget gate's pre-activation, and the total stays at the audited figure."""
  block = dig.DiGBlock(384, 6, 1024, layer_index=1, dtype=jnp.bfloat16,
                       gla_backend="reference", rngs=nnx.Rngs(0))
  x = jnp.ones((3, 8, 8, 384), jnp.bfloat16)
  c = jnp.ones((3, 384), jnp.bfloat16)
  with mock.patch.object(gla_api, "chunk_gla_packed", _kernel_like_chunk_gla_packed):
    rows = saved_residual_bytes(block, x, c, tokens=3 * 64)
  text = "\n".join(f"{b:8.0f} {d}" for b, d in rows)
  for where in ("gated_norm", "swiglu_product", "'log_sigmoid'"):
    assert where not in text, f"{where} keeps residuals:\n{text}"
  # Of the block's two input matmuls (both `over_rows`), the GLA layer keeps its output y
  # (q, k, v, output gate and low-rank gate input: 192 + 192 + 384 + 384 + 16 bf16 per token)
  # and SwiGLU keeps [gate(x), up(x)] as the one matmul made it (2 x 1024 bf16 per token), not
  # two halves sliced out of it.
  assert sorted(b for b, d in rows if "over_rows" in d) == [1168 * 2, 2 * 1024 * 2], text
  # The conv's nine shifted slices are one padded array to XLA: count it once.
  conv = [b for b, d in rows if "depthwise_conv3x3" in d]
  assert len(conv) == 9
  total = sum(b for b, d in rows if "depthwise_conv3x3" not in d) + max(conv)
  # jaxpr-level bytes per token (XLA keeps less, e.g. not layer_norm's fp32 temporaries):
  # 19.6 kB, against 37.0 kB counted the same way before these changes.
  assert total <= 19_600, text

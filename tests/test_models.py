"""DiG/DiT: parameter counts, scan order, equivalence with the reference's flip/transpose forward."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import jaxprs_in_params

from conftest import randomize_params
from dig_jax.models import count_parameters, create_model
from dig_jax.models import layers
from dig_jax.models.scan_order import layer_orientation, token_order

# Reference-code parameter counts (dig_spec.md), in millions, 256 px -> 32x32x4 latent.
PARAM_COUNTS_M = {"DiG-S/2": 33.1, "DiG-B/2": 130.8, "DiG-L/2": 465.0, "DiG-XL/2": 676.0,
                  "DiT-S/2": 33.0, "DiT-B/2": 130.5, "DiT-L/2": 458.1, "DiT-XL/2": 675.1}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS_M))
def test_parameter_counts_match_reference(name):
  model = nnx.eval_shape(lambda: create_model(name, input_size=32, in_channels=4,
                                              num_classes=1000, rngs=nnx.Rngs(0)))
  count = count_parameters(model) / 1e6
  # Within 0.1 %, or within the table's rounding to 0.1 M (DiT-S/2 is 32.96 M, listed as 33.0).
  assert abs(count - PARAM_COUNTS_M[name]) <= max(1e-3 * PARAM_COUNTS_M[name], 0.05), count


def _literal_reference_orders(depth, h, w):
  """Token order before each block, by literally flipping after every block and transposing
  the (current) grid after every odd block, as the reference code does."""
  seq, grid = np.arange(h * w), (h, w)
  orders = []
  for i in range(depth):
    orders.append(seq.copy())
    seq = seq[::-1]
    if i % 2 == 1:
      seq = seq.reshape(grid).T.reshape(-1)
      grid = grid[::-1]
  return orders, seq


@pytest.mark.parametrize("depth", [4, 6, 13])
@pytest.mark.parametrize("h,w", [(4, 4), (3, 5)])
def test_scan_order_matches_reference_steps(depth, h, w):
  orders, final = _literal_reference_orders(depth, h, w)
  for i, expected in enumerate(orders):
    np.testing.assert_array_equal(token_order(i, h, w), expected)
    assert sorted(token_order(i, h, w)) == list(range(h * w))
  # The reference's composed permutation is the identity only at depth % 4 == 0.
  assert np.array_equal(final, np.arange(h * w)) == (depth % 4 == 0)
  # Four directions with period 4: rows fwd, rows back, columns fwd, columns back.
  assert [layer_orientation(i) for i in range(4)] == [(False, False), (False, True),
                                                     (True, False), (True, True)]


def _literal_reference_forward(model, x, t, y):
  """The reference's forward: permute the token sequence between blocks, run each block's conv
  on the current grid with its kernel as stored, undo the composed permutation at the end."""
  p = model.patch_size
  h, w = model.grid
  tok = model.patch_embed(x) + layers.sincos_pos_embed_2d(model.hidden_size, h, w)
  n, d = tok.shape[0], tok.shape[-1]
  seq = tok.reshape(n, h * w, d)
  order, grid = np.arange(h * w), (h, w)
  c = model.t_embedder(t) + model.y_embedder(y)
  for i, block in enumerate(model.blocks):
    s1, sc1, g1, s2, sc2, g2 = block.modulation(c)
    seq = seq + g1[:, None] * block.attn(layers.modulate(layers.layer_norm(seq), s1, sc1))
    seq = seq + g2[:, None] * block.mlp(layers.modulate(layers.layer_norm(seq), s2, sc2))
    img = seq.reshape(n, *grid, d)
    img = jax.lax.conv_general_dilated(img, block.conv_kernel[...], (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=d) + block.conv_bias[...]
    seq = img.reshape(n, -1, d)[:, ::-1]
    order = order[::-1]
    if i % 2 == 1:
      seq = seq.reshape(n, *grid, d).transpose(0, 2, 1, 3).reshape(n, -1, d)
      order = order.reshape(grid).T.reshape(-1)
      grid = grid[::-1]
  seq = seq[:, np.argsort(order)]  # back to raster order
  out = model.final_layer(seq, c).reshape(n, h, w, -1)
  return layers.unpatchify(out, p, model.out_channels)


@pytest.mark.parametrize("depth,size", [(6, 8), (5, (6, 10))])
def test_dig_matches_literal_reference_forward(depth, size):
  model = create_model("DiG-S/2", input_size=size, in_channels=3, num_classes=5, depth=depth,
                       hidden_size=64, num_heads=1, rngs=nnx.Rngs(1))
  model = randomize_params(model)
  hw = (size, size) if isinstance(size, int) else size
  key = jax.random.key(2)
  x = jax.random.normal(key, (2, *hw, 3))
  t, y = jnp.array([10, 900]), jnp.array([0, 5])  # 5 = the null class
  ours = model(x, t, y)
  ref = _literal_reference_forward(model, x, t, y)
  assert ours.shape == (2, *hw, 6)
  np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("family", ["DiG", "DiT"])
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_output_shapes(family, patch):
  model = create_model(f"{family}-S/{patch}", input_size=16, in_channels=4, num_classes=10,
                       depth=1, hidden_size=64, num_heads=1, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
  out = model(x, jnp.array([1, 999]), jnp.array([3, 10]))
  assert out.shape == (2, 16, 16, 8) and out.dtype == jnp.float32


def test_learn_sigma_false_and_bf16_compute():
  model = create_model("DiG-S/4", input_size=8, in_channels=1, num_classes=3, learn_sigma=False,
                       depth=2, hidden_size=64, num_heads=1, dtype="bfloat16", rngs=nnx.Rngs(0))
  model = randomize_params(model)
  out = model(jax.random.normal(jax.random.key(0), (2, 8, 8, 1)), jnp.array([1, 2]),
              jnp.array([0, 1]))
  assert out.shape == (2, 8, 8, 1) and bool(jnp.isfinite(out).all())
  kernel = model.blocks[0].mlp.up.kernel[...]
  assert kernel.dtype == jnp.float32  # parameters stay float32 under bf16 compute


def test_reference_initialisation():
  model = create_model("DiG-S/2", input_size=8, in_channels=4, num_classes=10, depth=2,
                       rngs=nnx.Rngs(0))
  block = model.blocks[0]
  identity = np.zeros((3, 3)); identity[1, 1] = 1
  np.testing.assert_array_equal(block.conv_kernel[...][..., 0, 7], identity)
  assert not np.any(block.modulation.linear.kernel[...])
  assert not np.any(model.final_layer.linear.kernel[...])
  assert abs(float(jnp.std(model.y_embedder.table.embedding[...])) - 0.02) < 2e-3
  # GLA linears: xavier-uniform with gain 2 ** -2.5 -> bound gain * sqrt(6 / (fan_in + fan_out)).
  q = np.asarray(block.attn.q_proj.kernel[...])
  bound = 2 ** -2.5 * np.sqrt(6 / (384 + 192))
  assert q.max() <= bound and q.max() > 0.9 * bound
  # Patch embedding: xavier as a Linear of fan_in p*p*C = 16, fan_out D = 384.
  pe = np.asarray(model.patch_embed.proj.kernel[...])
  assert pe.max() <= np.sqrt(6 / (16 + 384)) and pe.max() > 0.9 * np.sqrt(6 / (16 + 384))


def test_dit_attention_matches_numpy_softmax(rng):
  model = create_model("DiT-S/2", input_size=8, in_channels=4, num_classes=10, depth=1,
                       hidden_size=64, num_heads=2, rngs=nnx.Rngs(0))
  attn = model.blocks[0].attn
  x = rng.normal(size=(2, 5, 64)).astype(np.float32)
  qkv = x @ np.asarray(attn.qkv.kernel[...]) + np.asarray(attn.qkv.bias[...])
  q, k, v = np.split(qkv.reshape(2, 5, 3, 2, 32), 3, axis=2)
  q, k, v = (a[:, :, 0].transpose(0, 2, 1, 3) for a in (q, k, v))     # [N, H, T, hd]
  s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(32)
  p = np.exp(s - s.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
  o = (p @ v).transpose(0, 2, 1, 3).reshape(2, 5, 64)
  want = o @ np.asarray(attn.proj.kernel[...]) + np.asarray(attn.proj.bias[...])
  np.testing.assert_allclose(attn(jnp.asarray(x)), want, rtol=1e-4, atol=1e-5)


def test_sincos_positions_match_mae_formula():
  table = layers.sincos_pos_embed_2d(8, 2, 3)  # [h=2, w=3, 8]
  omega = 1 / 10000 ** (np.arange(2) / 2.0)
  row, col = 1, 2
  want = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                         np.sin(row * omega), np.cos(row * omega)])
  np.testing.assert_allclose(table[row, col], want, rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="DiG-M/2"), "unknown model name 'DiG-M/2'"),
    (dict(input_size=30), "input size 30x30 must be positive and divisible by the patch size 4"),
    (dict(depth_multiplier=2), r"unknown override\(s\) \['depth_multiplier'\]"),
    (dict(remat="some"), r"remat='some'; expected one of \('none', 'full', 'dots'\)"),
])
def test_bad_model_arguments(kwargs, match):
  args = dict(name="DiG-S/4", input_size=32, in_channels=1, num_classes=10, rngs=nnx.Rngs(0))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    create_model(args.pop("name"), **args)


def _count_remat(jaxpr) -> int:
  """Checkpointed calls with a saving policy: the per-block ones of `remat` (DiG's layers also
  checkpoint a few elementwise pieces, with no policy; those are not counted)."""
  n = 0
  for eqn in jaxpr.eqns:
    n += (eqn.primitive.name in ("checkpoint", "remat", "remat2")
          and eqn.params.get("policy") is not None)
    n += sum(_count_remat(sub) for sub in jaxprs_in_params(eqn.params))
  return n


def _remat_case_grads(family, remat):
  """(gradients, gradient jaxpr) of a small model's squared output, for one remat setting."""
  model = randomize_params(create_model(
      f"{family}-S/4", input_size=16, in_channels=2, num_classes=5, depth=2, hidden_size=64,
      num_heads=1, remat=remat, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 2))
  t, y = jnp.array([3, 700]), jnp.array([1, 5])
  graphdef, params = nnx.split(model, nnx.Param)
  loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x, t, y) ** 2)
  # jit: one compiled program instead of op by op (half the time); XLA fuses the two
  # programs differently, so entries near zero differ by float32 rounding of the array's scale
  return jax.jit(jax.grad(loss))(params), jax.make_jaxpr(jax.grad(loss))(params)


_plain_remat_case_grads = functools.lru_cache(maxsize=None)(
    lambda family: _remat_case_grads(family, "none"))  # shared by both remat settings


@pytest.mark.parametrize("family", ["DiG", "DiT"])
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_gradients_and_wraps_every_block(family, remat):
  """Rematerialised blocks give the gradients of the plain model (same parameters), and the
  gradient program holds one checkpointed call per block."""
  (plain, plain_jaxpr), (remat_grads, remat_jaxpr) = (_plain_remat_case_grads(family),
                                                      _remat_case_grads(family, remat))
  assert _count_remat(plain_jaxpr.jaxpr) == 0 and _count_remat(remat_jaxpr.jaxpr) == 2
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat_grads)):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.max(np.abs(a)))


def test_wrong_input_shape_is_refused():
  model = create_model("DiG-S/4", input_size=8, in_channels=1, num_classes=2, depth=1,
                       hidden_size=64, num_heads=1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"built for inputs \[N, 8, 8, 1\].*got \(2, 1, 8, 8\)"):
    model(jnp.ones((2, 1, 8, 8)), jnp.array([1, 2]), jnp.array([0, 1]))


def test_gla_layer_matches_explicit_computation(rng):
  """The GLA token mixer against numpy projections, the token-by-token GLA recurrence,
  per-head RMSNorm and the swish output gate, written out from the parameters."""
  from kernels_pallas.gla import reference
  model = create_model("DiG-S/2", input_size=8, in_channels=4, num_classes=10, depth=1,
                       hidden_size=64, num_heads=2, rngs=nnx.Rngs(0))
  attn = randomize_params(model).blocks[0].attn
  w = lambda layer: np.asarray(layer.kernel[...], np.float64)
  x = rng.normal(size=(2, 7, 64))
  q, k, v = (x @ w(attn.q_proj), x @ w(attn.k_proj), x @ w(attn.v_proj))
  low = x @ w(attn.gk_down)
  gk = low @ w(attn.gk_up) + np.asarray(attn.gk_up.bias[...], np.float64)
  gk = -np.logaddexp(0, -gk) / 16  # log(sigmoid) / 16
  heads = lambda a: jnp.asarray(a.reshape(2, 7, 2, -1), jnp.float32)
  o, _ = reference.recurrent_gla(heads(q), heads(k), heads(v), heads(gk))
  o = np.asarray(o, np.float64)
  o = o / np.sqrt(np.mean(o ** 2, axis=-1, keepdims=True) + 1e-6)
  o = (o * np.asarray(attn.o_norm_scale[...])).reshape(2, 7, 64)
  gate = x @ w(attn.g_proj)
  want = (o * gate / (1 + np.exp(-gate))) @ w(attn.o_proj)
  got = attn(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

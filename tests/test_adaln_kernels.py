"""adaLN's LayerNorm + modulation, alone, returning its input, and after a gated residual add:
the jnp reference and
the Pallas GPU kernels (interpret mode) against the formula in float64 numpy (forward) and its
gradients written out by hand; the kernels' cuda lowering; dispatch and errors. Per batch shard
on 8 devices: test_elementwise_sharded.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.adaln import (layer_norm_modulate, layer_norm_modulate_with_input, pallas_gpu,
                                  residual_layer_norm_modulate)
from kernels_pallas.adaln.api import resolve_backend

EPS = 1e-6


def _numpy_forward_and_grads(x, shift, scale, dy):
  """y = xhat (1 + scale) + shift per example, and dx, dshift, dscale of sum(y * dy), with the
  LayerNorm's gradient written out: dx = (g - mean(g) - xhat mean(g xhat)) / sigma."""
  n, d = x.shape[0], x.shape[-1]
  x = x.reshape(n, -1, d)
  dy = dy.reshape(n, -1, d)
  mean = x.mean(-1, keepdims=True)
  sigma = np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + EPS)
  xhat = (x - mean) / sigma
  y = xhat * (1 + scale[:, None]) + shift[:, None]
  g = dy * (1 + scale[:, None])
  dx = (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True)) / sigma
  return y, dx, dy.sum(1), (dy * xhat).sum(1)


def _inputs(shape, dtype, seed):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  n, d = shape[0], shape[-1]
  offset = jax.random.normal(ks[4], (n,) + (1,) * (len(shape) - 2) + (d,))  # non-zero means
  x = 2.0 * jax.random.normal(ks[0], shape) + offset
  return (x.astype(dtype), (0.3 * jax.random.normal(ks[1], (n, d))).astype(dtype),
          (0.3 * jax.random.normal(ks[2], (n, d))).astype(dtype),
          jax.random.normal(ks[3], shape).astype(dtype))


def _rel_rms(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def _float64(*arrays):
  return [np.asarray(a.astype(jnp.float32), np.float64) for a in arrays]


def _assert_matches(names, got, want, tol):
  """Each got array (any float dtype, any shape of the same size) within relative RMS `tol` of
  its float64 expectation."""
  for name, g, w in zip(names, got, want, strict=True):
    assert _rel_rms(_float64(g)[0].reshape(w.shape), w) < tol, name


def _check(backend, shape, dtype, tol, seed=0):
  x, shift, scale, dy = _inputs(shape, dtype, seed)
  f = lambda x, s, c: layer_norm_modulate(x, s, c, backend=backend, interpret=True)
  y, vjp = jax.vjp(f, x, shift, scale)
  dx, dshift, dscale = vjp(dy)
  assert y.dtype == dtype and dx.dtype == dtype and dshift.dtype == dscale.dtype == dtype
  _assert_matches(("y", "dx", "dshift", "dscale"), (y, dx, dshift, dscale),
                  _numpy_forward_and_grads(*_float64(x, shift, scale, dy)), tol)


# (N, T, D) and DiG's (N, h, w, D): D = 48 (padded to 64), DiG-S's 384, XL's 1152 (2 or 4 rows a
# block), a token count with only a factor 2 (blocks of 2 rows), several blocks per example
SHAPES = [(2, 8, 48), (2, 4, 8, 384), (3, 6, 1152), (2, 8, 1152), (2, 64, 32), (1, 6, 16)]


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu"])
@pytest.mark.parametrize("shape", SHAPES)
def test_float32_matches_numpy(backend, shape):
  _check(backend, shape, jnp.float32, 1e-5)


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu"])
def test_bfloat16_inputs(backend):
  _check(backend, (2, 16, 384), jnp.bfloat16, 1e-2, seed=1)


def test_small_blocks_split_each_example(monkeypatch):
  """Blocks of 2 rows of 64 columns: many programs per example, each a share of dshift/dscale."""
  monkeypatch.setattr(pallas_gpu, "BLOCK_ELEMENTS", 128)
  assert pallas_gpu.block_rows(32, 48) == 2
  _check("pallas_gpu", (2, 32, 48), jnp.float32, 1e-5, seed=2)


def test_wide_rows_get_four_rows_a_block():
  """D = 1152 pads to 2048 columns: 4 rows a program (2 ran slower on an H100), D = 384 8."""
  assert pallas_gpu.block_rows(256, 1152) == 4
  assert pallas_gpu.block_rows(256, 384) == 8
  assert pallas_gpu.block_rows(6, 1152) == 2  # T's power-of-two factor still bounds it


@pytest.mark.parametrize("d", [384, 1152])  # blocks of 8 x 512 and 4 x 2048
def test_kernels_lower_for_cuda(d):
  x, shift, scale, dy = _inputs((2, 256, d), jnp.bfloat16, 0)
  loss = lambda x, s, c: jnp.sum(layer_norm_modulate(x, s, c, backend="pallas_gpu") * dy)
  text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(x, shift, scale).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "adaln_norm_fwd" in text and "adaln_norm_bwd" in text


def test_dispatch_and_errors():
  x = jnp.ones((2, 8, 32))
  assert resolve_backend("auto", x) == "reference"  # CPU
  with pytest.raises(ValueError, match="unknown backend 'triton'"):
    layer_norm_modulate(x, jnp.ones((2, 32)), jnp.ones((2, 32)), backend="triton")
  with pytest.raises(ValueError, match=r"shift, scale \[N, D\].*shift \(2, 16\)"):
    layer_norm_modulate(x, jnp.ones((2, 16)), jnp.ones((2, 16)))
  odd = jnp.ones((2, 7, 32))  # 7 tokens: blocks of one row
  assert not pallas_gpu.supports(7, 32)
  with pytest.raises(ValueError, match="got 7 tokens of D = 32"):
    layer_norm_modulate(odd, jnp.ones((2, 32)), jnp.ones((2, 32)), backend="pallas_gpu")


def _check_with_input(backend, shape, dtype, tol, seed=0):
  """(x, y) = layer_norm_modulate_with_input(x, ...): x's gradient is the norm's plus the
  cotangent of the returned x (the residual path's)."""
  x, shift, scale, dy = _inputs(shape, dtype, seed)
  dpass = jax.random.normal(jax.random.PRNGKey(seed + 20), shape).astype(dtype)
  f = lambda *args: layer_norm_modulate_with_input(*args, backend=backend, interpret=True)
  (x_out, y), vjp = jax.vjp(f, x, shift, scale)
  dx, dshift, dscale = vjp((dpass, dy))
  assert x_out is x or bool(jnp.all(x_out == x))
  assert y.dtype == dx.dtype == dshift.dtype == dtype
  want_y, dnorm, want_dshift, want_dscale = _numpy_forward_and_grads(
      *_float64(x, shift, scale, dy))
  want_dx = dnorm + _float64(dpass)[0].reshape(dnorm.shape)
  _assert_matches(("y", "dx", "dshift", "dscale"), (y, dx, dshift, dscale),
                  (want_y, want_dx, want_dshift, want_dscale), tol)


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu"])
@pytest.mark.parametrize("shape", [(2, 8, 48), (2, 4, 8, 384), (3, 6, 1152)])
def test_with_input_float32_matches_numpy(backend, shape):
  _check_with_input(backend, shape, jnp.float32, 1e-5)


def test_with_input_small_blocks_and_bfloat16(monkeypatch):
  _check_with_input("pallas_gpu", (2, 16, 384), jnp.bfloat16, 1e-2, seed=1)
  monkeypatch.setattr(pallas_gpu, "BLOCK_ELEMENTS", 128)  # 2 rows a program
  _check_with_input("pallas_gpu", (2, 32, 48), jnp.float32, 1e-5, seed=2)


def test_with_input_kernels_lower_for_cuda():
  x, shift, scale, dy = _inputs((2, 256, 384), jnp.bfloat16, 0)

  def loss(x, shift, scale):
    x_out, y = layer_norm_modulate_with_input(x, shift, scale, backend="pallas_gpu")
    return jnp.sum(x_out * dy) + jnp.sum(y * dy)

  text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(x, shift, scale).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "adaln_norm_fwd" in text and "adaln_norm_input_bwd" in text
  assert "adaln_norm_bwd" not in text.replace("adaln_norm_input_bwd", "")


def test_with_input_errors():
  x = jnp.ones((2, 8, 32))
  with pytest.raises(ValueError, match="unknown backend 'triton'"):
    layer_norm_modulate_with_input(x, jnp.ones((2, 32)), jnp.ones((2, 32)), backend="triton")
  with pytest.raises(ValueError, match=r"shift, scale \[N, D\].*shift \(2, 16\)"):
    layer_norm_modulate_with_input(x, jnp.ones((2, 16)), jnp.ones((2, 16)), backend="pallas_gpu")
  with pytest.raises(ValueError, match="got 7 tokens of D = 32"):
    layer_norm_modulate_with_input(jnp.ones((2, 7, 32)), jnp.ones((2, 32)), jnp.ones((2, 32)),
                                   backend="pallas_gpu")


def _numpy_residual(x, gate, branch, shift, scale, dh, dy):
  """h = x + gate * branch and y = the norm of h, and the gradients of x, gate, branch, shift
  and scale of sum(h * dh) + sum(y * dy): h's gradient (dh plus the norm's) is x's, and
  reaches branch times the gate."""
  n, d = x.shape[0], x.shape[-1]
  x, branch, dh = (a.reshape(n, -1, d) for a in (x, branch, dh))
  h = x + gate[:, None] * branch
  y, dnorm, dshift, dscale = _numpy_forward_and_grads(h, shift, scale, dy)
  dx = dnorm + dh
  return h, y, dx, (dx * branch).sum(1), gate[:, None] * dx, dshift, dscale


def _check_residual(backend, shape, dtype, tol, seed=0):
  x, shift, scale, dy = _inputs(shape, dtype, seed)
  kg, kb, kh = jax.random.split(jax.random.PRNGKey(seed + 10), 3)
  gate = jax.random.normal(kg, (shape[0], shape[-1])).astype(dtype)
  branch, dh = (jax.random.normal(k, shape).astype(dtype) for k in (kb, kh))
  f = lambda *args: residual_layer_norm_modulate(*args, backend=backend, interpret=True)
  (h, y), vjp = jax.vjp(f, x, gate, branch, shift, scale)
  grads = vjp((dh, dy))
  assert h.dtype == y.dtype == dtype and all(g.dtype == dtype for g in grads)
  _assert_matches(("h", "y", "dx", "dgate", "dbranch", "dshift", "dscale"), (h, y, *grads),
                  _numpy_residual(*_float64(x, gate, branch, shift, scale, dh, dy)), tol)


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu"])
@pytest.mark.parametrize("shape", [(2, 8, 48), (2, 4, 8, 384), (3, 6, 1152)])
def test_residual_float32_matches_numpy(backend, shape):
  _check_residual(backend, shape, jnp.float32, 1e-5)


def test_residual_small_blocks_split_each_example(monkeypatch):
  """Blocks of 2 rows: each program writes its own share of the gate's gradient."""
  monkeypatch.setattr(pallas_gpu, "BLOCK_ELEMENTS", 128)
  _check_residual("pallas_gpu", (2, 32, 48), jnp.float32, 1e-5, seed=2)


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu"])
def test_residual_bfloat16_inputs(backend):
  _check_residual(backend, (2, 16, 384), jnp.bfloat16, 1e-2, seed=1)


def test_residual_kernels_lower_for_cuda():
  x, shift, scale, dy = _inputs((2, 256, 384), jnp.bfloat16, 0)
  branch = jax.random.normal(jax.random.PRNGKey(5), x.shape, jnp.bfloat16)

  def loss(*args):
    h, y = residual_layer_norm_modulate(*args, backend="pallas_gpu")
    return jnp.sum(h * dy) + jnp.sum(y * dy)

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(
      x, shift, branch, shift, scale).lower(lowering_platforms=("cuda",)).as_text()
  assert "adaln_residual_norm_fwd" in text and "adaln_residual_norm_bwd" in text


def test_residual_errors():
  x, nd = jnp.ones((2, 8, 32)), jnp.ones((2, 32))
  with pytest.raises(ValueError, match=r"branch must be shaped like x \(2, 8, 32\)"):
    residual_layer_norm_modulate(x, nd, jnp.ones((2, 4, 32)), nd, nd)
  with pytest.raises(ValueError, match=r"shift and scale must be \[2, 32\]; got \(2, 16\)"):
    residual_layer_norm_modulate(x, nd, x, jnp.ones((2, 16)), nd)
  odd = jnp.ones((2, 7, 32))
  with pytest.raises(ValueError, match="residual_layer_norm_modulate: pallas_gpu needs"):
    residual_layer_norm_modulate(odd, nd, odd, nd, nd, backend="pallas_gpu")


def test_dit_with_the_kernels_matches_the_jnp_norms():
  """A 2-block DiT with the adaLN kernels (interpret mode) against the same DiT with the jnp
  norms: output and parameter gradients (DiG's blocks: test_gla_model_backends.py)."""
  from flax import nnx

  from dig_jax.models import create_model

  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(ks[0], (2, 8, 8, 4))
  t, y = jnp.array([3, 700]), jnp.array([1, 7])
  target = jax.random.normal(ks[1], (2, 8, 8, 8))

  def loss_and_grads(backend):
    model = create_model("DiT-S/2", input_size=8, in_channels=4, num_classes=10, depth=2,
                         elementwise_backend=backend, pallas_interpret=True, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)  # adaLN-Zero starts at zero: perturb everything
    keys = jax.random.split(ks[2], len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape)
                                       for p, k in zip(leaves, keys)])
    loss = lambda p: jnp.mean((nnx.merge(graphdef, p)(x, t, y) - target) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)  # interpret-mode kernels run compiled

  with jax.default_matmul_precision("highest"):
    want_loss, want_grads = loss_and_grads("reference")
    got_loss, got_grads = loss_and_grads("pallas_gpu")
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6)


def test_bench_cli_times_three_forms_and_checks_the_fused_one(tmp_path, capsys, monkeypatch):
  import json

  from kernels_pallas.adaln import bench
  out = tmp_path / "adaln.json"
  bench.main(["--shape", "2,16,48", "--layers", "2", "--runs", "1", "--interpret", "--check",
              "--json", str(out)])
  result = json.loads(out.read_text())
  assert [r["form"] for r in result["rows"]] == ["reference", "pallas_gpu", "pallas_gpu fused"]
  assert all(r["fwd_us"] > 0 and r["fwd_bwd_us"] > 0 for r in result["rows"])
  assert result["check"]["2,16,48"] < 1e-5
  assert "| 2,16,48 | pallas_gpu fused |" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    bench.main(["--shape", "2,16"])
  # a fused backward that never writes its shift, scale and gate shares fails the check
  with monkeypatch.context() as patch:
    patch.setattr(pallas_gpu, "_store_row", lambda ref, row, value, d: None)
    assert bench.check((2, 16, 48), 2, interpret=True) > 1e-3
  # so does a first norm's backward that drops x's gradient along the residual path
  monkeypatch.setattr(pallas_gpu, "_bwd_with_input_kernel",
                      lambda x_ref, scale_ref, dy_ref, dpass_ref, *outs, **kw:
                      pallas_gpu._bwd_kernel(x_ref, scale_ref, dy_ref, *outs, **kw))
  assert bench.check((2, 16, 48), 2, interpret=True) > 1e-3

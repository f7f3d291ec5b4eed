"""`gla_layer` (DiG's GLA layer after its input projection): the one-VJP GPU path (Pallas
kernels in interpret mode) and the composition, against the layer written out in plain jnp with
the token-by-token GLA recurrence; every column of y's gradient; the cuda lowering with the
aliased gradient buffer; dispatch and errors (8 devices: test_elementwise_sharded.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.gla import api as gla_api
from kernels_pallas.gla import layer, pallas_gpu, reference

H, K, V, R = 2, 16, 32, 4  # heads, key and value dims per head, gate rank
W = H * (2 * K + V) + H * V + R


def plain_layer(y, wg, bg, scale, wo, *, reverse=False, normalizer=16.0, eps=1e-6):
  """The layer in plain jnp: float32, the recurrence token by token, autodiff for gradients."""
  n, t, _ = y.shape
  y = y.astype(jnp.float32)
  q, k, v = (y[..., a:e].reshape(n, t, H, -1) for a, e in
             ((0, H * K), (H * K, 2 * H * K), (2 * H * K, H * (2 * K + V))))
  z = y[..., H * (2 * K + V):H * (2 * K + 2 * V)]
  r = y[..., H * (2 * K + 2 * V):]
  g = jax.nn.log_sigmoid(r @ wg + bg).reshape(n, t, H, K) / normalizer
  o, _ = reference.recurrent_gla(q, k, v, g, reverse=reverse)
  o = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + eps) * scale
  return (o.reshape(n, t, H * V) * jax.nn.silu(z)) @ wo


def _inputs(n, t, d=24, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 7)
  y = jax.random.normal(ks[0], (n, t, W))
  # gate pre-activations around 0 to 3: decays from about e^-0.04 to e^-0.2 per token
  wg = jax.random.normal(ks[1], (R, H * K))
  bg = 1.0 + jax.random.normal(ks[2], (H * K,))
  scale = 1.0 + 0.2 * jax.random.normal(ks[3], (V,))
  wo = jax.random.normal(ks[4], (H * V, d)) / 8.0
  dout = jax.random.normal(ks[5], (n, t, d))
  return (y.astype(dtype), wg, bg, scale, wo), dout


def _rel_rms(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def _value_and_grads(fn, args, dout):
  def value_and_grads(*args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(dout.astype(out.dtype))
  return jax.jit(value_and_grads)(*args)  # jit: interpret-mode kernels run compiled, not op by op


def _layer(backend, output_backend, reverse=False):
  return lambda *a: layer.gla_layer(*a, heads=H, key_dim=K, value_dim=V, reverse=reverse,
                                    backend=backend, output_backend=output_backend,
                                    interpret=True)


CASES = [("pallas_gpu", "pallas_gpu"),  # the one-VJP path
         ("pallas_gpu", "reference"), ("reference", "reference")]  # compositions


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("backends", CASES)
def test_layer_matches_plain_jnp(backends, reverse):
  args, dout = _inputs(2, 48, seed=int(reverse))
  with jax.default_matmul_precision("highest"):
    out, grads = _value_and_grads(_layer(*backends, reverse=reverse), args, dout)
    want_out, want_grads = _value_and_grads(
        lambda *a: plain_layer(*a, reverse=reverse), args, dout)
  assert out.shape == (2, 48, 24)
  assert _rel_rms(out, want_out) < 1e-4
  for name, got, want in zip(("y", "gate kernel", "gate bias", "scale", "out kernel"), grads,
                             want_grads):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    assert _rel_rms(got, want) < 1e-4, name


def test_one_vjp_gradient_of_every_column_of_y():
  """Each part of y's gradient (q, k, v from the GLA kernel; z from the output stage; r from
  the gate) written into the one buffer, across several sequence blocks of the GLA kernels."""
  args, dout = _inputs(1, 64, seed=3)
  with jax.default_matmul_precision("highest"):
    want = _value_and_grads(plain_layer, args, dout)[1][0]
    old = pallas_gpu.BLOCK_CHUNKS
    pallas_gpu.BLOCK_CHUNKS = 1  # four blocks of one chunk each
    try:
      got = _value_and_grads(_layer("pallas_gpu", "pallas_gpu"), args, dout)[1][0]
    finally:
      pallas_gpu.BLOCK_CHUNKS = old
  bounds = {"q, k, v": (0, H * (2 * K + V)), "z": (H * (2 * K + V), H * (2 * K + 2 * V)),
            "r": (H * (2 * K + 2 * V), W)}
  for name, (a, e) in bounds.items():
    assert _rel_rms(got[..., a:e], want[..., a:e]) < 1e-4, name


def test_bfloat16_one_vjp_against_the_composition_and_plain_jnp():
  args, dout = _inputs(2, 32, seed=4, dtype=jnp.bfloat16)
  out, grads = _value_and_grads(_layer("pallas_gpu", "pallas_gpu"), args, dout)
  ref_out, ref_grads = _value_and_grads(_layer("pallas_gpu", "reference"), args, dout)
  f32_args = (args[0].astype(jnp.float32),) + args[1:]
  want_out, want_grads = _value_and_grads(plain_layer, f32_args, dout)
  assert out.dtype == grads[0].dtype == jnp.bfloat16
  assert _rel_rms(out, want_out) < 1e-2
  for got, ref, want in zip(grads, ref_grads, want_grads):
    assert _rel_rms(got, want) < 2e-2
    assert _rel_rms(got, ref) < 1e-2


def test_lowers_for_cuda_with_one_gradient_buffer():
  """DiG-S/2's layer at 256 px (6 heads, K 32, V 64, rank 16): the GLA backward kernel writes
  into the output stage's gradient buffer (an aliased operand), so no sum of y's gradients."""
  n, t, heads, kd, vd, rank = 4, 256, 6, 32, 64, 16
  width = heads * (2 * kd + 2 * vd) + rank
  y = jnp.ones((n, t, width), jnp.bfloat16)
  args = (y, jnp.ones((rank, heads * kd)), jnp.ones((heads * kd,)), jnp.ones((vd,)),
          jnp.ones((heads * vd, 384)))

  def loss(*a):
    return jnp.sum(layer.gla_layer(*a, heads=heads, key_dim=kd, value_dim=vd,
                                   backend="pallas_gpu", output_backend="pallas_gpu"))
  lowered = jax.jit(jax.grad(loss, argnums=range(5))).trace(*args).lower(
      lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert "gla_bwd" in text and "gated_norm_bwd" in text
  assert "output_operand_aliases" in text
  # y's gradient is one [N, T, W] buffer: no add of [N, T, W] arrays in the backward
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=range(5)))(*args)
  adds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("add", "add_any")
          and e.outvars[0].aval.shape == (n, t, width)]
  assert not adds


def _column_order(grid):
  """The raster index of each token of an (h, w) grid in column-major (scan) order."""
  h, w = grid
  return np.arange(h * w).reshape(h, w).T.reshape(-1)


# The block settings matter to the one-VJP path, which reads the columns in place; the
# compositions transpose y and the output around the same layer, whatever the grid.
_COLUMN_CASES = [((32, 3), False, None, None), ((16, 5), True, 1, None), ((48, 2), True, 2, None),
                 ((32, 3), True, None, 2), ((48, 2), False, None, 1)]


@pytest.mark.parametrize("backends,grid,reverse,block_chunks,bwd_block_chunks",
                         [(CASES[0], *case) for case in _COLUMN_CASES]
                         + [(backends, *_COLUMN_CASES[1]) for backends in CASES[1:]])
def test_column_scan_matches_plain_jnp_on_the_transposed_grid(monkeypatch, backends, grid,
                                                              reverse, block_chunks,
                                                              bwd_block_chunks):
  """column_scan = (h, w): y in raster order, the scan down the columns. Reference: plain jnp
  on the tokens gathered into column-major order by index, the output scattered back. The
  GPU path reads the columns in place (strided chunks), across several sequence blocks, or
  one forward block walked backward as shorter ones."""
  monkeypatch.setattr(pallas_gpu, "BLOCK_CHUNKS", block_chunks)
  monkeypatch.setattr(pallas_gpu, "BWD_BLOCK_CHUNKS", bwd_block_chunks)
  args, dout = _inputs(2, grid[0] * grid[1], seed=grid[1])
  run = lambda *a: layer.gla_layer(*a, heads=H, key_dim=K, value_dim=V, reverse=reverse,
                                   column_scan=grid, backend=backends[0],
                                   output_backend=backends[1], interpret=True)

  def want_fn(y, *rest):
    order = _column_order(grid)  # gathered by index, scattered back
    out = plain_layer(y[:, order], *rest, reverse=reverse)
    return jnp.zeros_like(out).at[:, order].set(out)
  with jax.default_matmul_precision("highest"):
    out, grads = _value_and_grads(run, args, dout)
    want_out, want_grads = _value_and_grads(want_fn, args, dout)
  assert _rel_rms(out, want_out) < 1e-4
  for name, got, want in zip(("y", "gate kernel", "gate bias", "scale", "out kernel"), grads,
                             want_grads):
    assert _rel_rms(got, want) < 1e-4, name


def test_column_scan_is_read_in_place_only_where_columns_hold_whole_chunks():
  y = jax.ShapeDtypeStruct((2, 96, W), jnp.bfloat16)
  spec = dict(heads=H, key_dim=K, value_dim=V, backend="pallas_gpu", output_backend="pallas_gpu")
  assert layer.reads_column_scan_in_place(y, column_scan=(32, 3), **spec)
  assert not layer.reads_column_scan_in_place(y, column_scan=(24, 4), **spec)  # 24 % 16
  assert not layer.reads_column_scan_in_place(y, column_scan=(32, 3), heads=H, key_dim=K,
                                              value_dim=V)  # CPU: the references
  with pytest.raises(ValueError, match=r"column_scan must be \(h, w\) with h \* w = T = 96"):
    layer.gla_layer(jnp.ones((2, 96, W)), jnp.ones((R, H * K)), jnp.ones(H * K), jnp.ones(V),
                    jnp.ones((H * V, 8)), heads=H, key_dim=K, value_dim=V, column_scan=(16, 5))
  with pytest.raises(ValueError, match=r"column_scan=\(24, 4\) needs .* h a multiple of the "
                                       r"chunk \(16\)"):
    pallas_gpu.forward(*(jnp.ones((1, 96, 1, 16)),) * 4, jnp.zeros((1, 1, 16, 16)),
                       scale=0.25, reverse=False, column_scan=(24, 4), interpret=True)


@pytest.mark.parametrize("grid", [(32, 8), (16, 16)])  # 2 chunks a column, or 1
def test_column_scan_lowers_for_cuda_with_backward_halves(monkeypatch, grid):
  """One forward block walked backward as halves (DiG-S/2 at 256 px): the chunk-state walk
  over each half, with its column-scan row arithmetic, lowers for CUDA (interpret mode ran
  where Triton's lowering of jnp's floor `%` on the loop index failed)."""
  n, heads, kd, vd, rank = 2, 6, 32, 64, 16
  width = heads * (2 * kd + 2 * vd) + rank
  args = (jnp.ones((n, grid[0] * grid[1], width), jnp.bfloat16), jnp.ones((rank, heads * kd)),
          jnp.ones((heads * kd,)), jnp.ones((vd,)), jnp.ones((heads * vd, 384)))
  monkeypatch.setattr(pallas_gpu, "BWD_BLOCK_CHUNKS", 8)

  def loss(*a):
    return jnp.sum(layer.gla_layer(*a, heads=heads, key_dim=kd, value_dim=vd, reverse=True,
                                   column_scan=grid, backend="pallas_gpu",
                                   output_backend="pallas_gpu"))
  text = jax.jit(jax.grad(loss, argnums=range(5))).trace(*args).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "gla_states_pass" in text and "gla_dstates_leaving" not in text


def test_column_scan_lowers_for_cuda(monkeypatch):
  """The strided chunk slices of a column scan lower for CUDA, forward and backward."""
  n, grid, heads, kd, vd, rank = 2, (32, 8), 6, 32, 64, 16
  width = heads * (2 * kd + 2 * vd) + rank
  args = (jnp.ones((n, grid[0] * grid[1], width), jnp.bfloat16), jnp.ones((rank, heads * kd)),
          jnp.ones((heads * kd,)), jnp.ones((vd,)), jnp.ones((heads * vd, 384)))

  def loss(*a):
    return jnp.sum(layer.gla_layer(*a, heads=heads, key_dim=kd, value_dim=vd, reverse=True,
                                   column_scan=grid, backend="pallas_gpu",
                                   output_backend="pallas_gpu"))
  monkeypatch.setattr(pallas_gpu, "BLOCK_CHUNKS", 4)  # several blocks: every kernel runs
  text = jax.jit(jax.grad(loss, argnums=range(5))).trace(*args).lower(
      lowering_platforms=("cuda",)).as_text()
  for name in ("gla_fwd_states", "gla_states_entering", "gla_fwd", "gla_states_pass",
               "gla_dstates_leaving", "gla_bwd"):
    assert name in text, name
  # the column order is read in place: no transposed copy of a [N, T, ...] array
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=range(5)))(*args)
  assert not [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "transpose"
              and e.invars[0].aval.ndim >= 3]


def test_dispatch_and_errors(monkeypatch):
  y = jnp.ones((2, 32, W))
  spec = dict(heads=H, key_dim=K, value_dim=V)
  lay = layer.Layout(H, K, V, 16.0, False, 1e-6)
  assert not layer._one_vjp_applies(y, lay, "auto", "auto")  # CPU: references
  assert layer._one_vjp_applies(y, lay, "pallas_gpu", "pallas_gpu")
  assert not layer._one_vjp_applies(y, lay, "pallas_gpu", "reference")
  assert not layer._one_vjp_applies(jnp.ones((2, 20, W)), lay, "pallas_gpu", "pallas_gpu")
  monkeypatch.setattr(gla_api, "platform_of", lambda x: "gpu")
  monkeypatch.setattr(layer.gated_norm_api, "platform_of", lambda x: "gpu")
  assert layer._one_vjp_applies(y, lay, "auto", "auto")
  monkeypatch.undo()
  with pytest.raises(ValueError, match=r"y must be \[N, T, W\] with W > 192"):
    layer.gla_layer(jnp.ones((2, 32, 192)), jnp.ones((R, H * K)), jnp.ones(H * K),
                    jnp.ones(V), jnp.ones((H * V, 8)), **spec)
  with pytest.raises(ValueError, match=r"gate kernel must be \[4, 32\] and bias \[32\]"):
    layer.gla_layer(y, jnp.ones((R + 1, H * K)), jnp.ones(H * K), jnp.ones(V),
                    jnp.ones((H * V, 8)), **spec)


@pytest.mark.parametrize("m", [96, 192, 1024, 12544])
def test_rows_transpose_dot_in_row_blocks(m):
  """a.T @ b over rows, whole (96: blocks too short; 1024: a multiple of 512) or in blocks of
  64 / 256 rows (192, 12,544), against numpy in float64."""
  ks = jax.random.split(jax.random.PRNGKey(m), 2)
  a = jax.random.normal(ks[0], (m, 16), jnp.bfloat16)
  b = jax.random.normal(ks[1], (m, 24), jnp.bfloat16)
  got = layer.rows_transpose_dot(a, b)
  want = np.asarray(a, np.float64).T @ np.asarray(b, np.float64)
  assert got.dtype == jnp.float32 and got.shape == (16, 24)
  assert _rel_rms(got, want) < 1e-6


def test_gate_kernel_gradient_over_row_blocks():
  """192 tokens: the one-VJP path's gate kernel gradient is summed over blocks of 64 rows."""
  args, dout = _inputs(1, 192, seed=5)
  with jax.default_matmul_precision("highest"):
    grads = _value_and_grads(_layer("pallas_gpu", "pallas_gpu"), args, dout)[1]
    want = _value_and_grads(plain_layer, args, dout)[1]
  assert _rel_rms(grads[1], want[1]) < 1e-4 and _rel_rms(grads[2], want[2]) < 1e-4

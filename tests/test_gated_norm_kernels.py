"""GLA's gated output stage: `gated_norm_linear` with the jnp backward and with the Pallas GPU
kernel (interpret mode) against float64 numpy formulas for the output and every gradient; the
kernel's cuda lowering; dispatch and errors (the 8-device check: test_elementwise_sharded.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.gated_norm import gated_norm_linear, pallas_gpu
from kernels_pallas.gated_norm import api
from kernels_pallas.gated_norm.api import resolve_backend

EPS = 1e-6


def _numpy(o, y, scale, w, dout, offset):
  """Output and gradients of sum(out * dout), out = (RMSNorm_heads(o) * scale * swish(z)) @ w,
  derived by hand in float64 (the norm's rounding to o's dtype ignored: float32 inputs)."""
  o, y, scale, w, dout = (np.asarray(a, np.float64) for a in (o, y, scale, w, dout))
  lead, (heads, vh) = o.shape[:-2], o.shape[-2:]
  z = y[..., offset:offset + heads * vh].reshape(o.shape)
  r = 1.0 / np.sqrt(np.mean(o ** 2, axis=-1, keepdims=True) + EPS)
  n = o * r * scale
  sig = 1.0 / (1.0 + np.exp(-z))
  u = (n * z * sig).reshape(lead + (heads * vh,))
  out = u @ w
  du = (dout @ w.T).reshape(o.shape)
  dn = du * z * sig
  dz = du * n * (sig + z * sig * (1.0 - sig))
  dscale = np.sum(dn * o * r, axis=tuple(range(o.ndim - 1)))
  g = dn * scale
  # The norm's Jacobian written out: d(o_j r)/d o_i = r [i == j] - o_j o_i r^3 / Vh
  jac = (r[..., None] * np.eye(vh)
         - o[..., :, None] * o[..., None, :] * r[..., None] ** 3 / vh)
  do = np.einsum("...ij,...j->...i", jac, g)
  dy = np.zeros_like(y)
  dy[..., offset:offset + heads * vh] = dz.reshape(lead + (heads * vh,))
  dw = u.reshape(-1, heads * vh).T @ dout.reshape(-1, w.shape[1])
  return out, (do, dy, dscale, dw)


def _rel_rms(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def _inputs(n, t, heads, vh, extra, d, dtype, seed=0, offset=None):
  """o, y (gate at `offset`, other columns random too), scale, w, dout; offset defaults to
  DiG's layout: q and k (heads x 32 each), v (heads x vh), then the gate."""
  offset = heads * (64 + vh) if offset is None else offset
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  o = jax.random.normal(ks[0], (n, t, heads, vh)).astype(dtype)
  y = (2.0 * jax.random.normal(ks[1], (n, t, offset + heads * vh + extra))).astype(dtype)
  scale = 1.0 + 0.2 * jax.random.normal(ks[2], (vh,))
  w = (jax.random.normal(ks[3], (heads * vh, d)) / 8.0).astype(dtype)
  dout = jax.random.normal(ks[4], (n, t, d)).astype(dtype)
  return (o, y, scale, w, dout), offset


def _run(backend, args, offset):
  o, y, scale, w, dout = args
  f = lambda o, y, s, w: gated_norm_linear(o, y, s, w, gate_offset=offset, backend=backend,
                                           interpret=True)
  with jax.default_matmul_precision("highest"):
    out, vjp = jax.vjp(f, o, y, scale, w)
    return out, vjp(dout)


# (N, T, heads, Vh, columns after the gate, D): DiG's layout; rows with only a factor 16
# (48 tokens); one head, Vh 16, the gate last in y
CASES = [(2, 32, 3, 64, 16, 48), (1, 48, 2, 32, 16, 40), (2, 16, 1, 16, 0, 24)]


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu"])
@pytest.mark.parametrize("case", CASES)
def test_output_and_gradients_match_numpy(backend, case):
  args, offset = _inputs(*case, jnp.float32)
  out, grads = _run(backend, args, offset)
  want_out, want_grads = _numpy(*args, offset)
  assert _rel_rms(out, want_out) < 1e-6
  for name, got, want in zip(("do", "dy", "dscale", "dw"), grads, want_grads):
    assert got.shape == want.shape, name
    assert _rel_rms(got, want) < 1e-5, name


def test_gate_at_any_head_aligned_offset_and_several_row_blocks(monkeypatch):
  monkeypatch.setattr(pallas_gpu, "BLOCK_M", 16)
  args, offset = _inputs(2, 32, 2, 32, 8, 24, jnp.float32, seed=4, offset=96)
  out, grads = _run("pallas_gpu", args, offset)
  want_out, want_grads = _numpy(*args, offset)
  assert _rel_rms(out, want_out) < 1e-6
  assert all(_rel_rms(g, w) < 1e-5 for g, w in zip(grads, want_grads))


def test_bfloat16_inputs():
  args, offset = _inputs(2, 32, 3, 64, 16, 48, jnp.bfloat16, seed=1)
  out, grads = _run("pallas_gpu", args, offset)
  assert out.dtype == jnp.bfloat16 and grads[0].dtype == grads[1].dtype == jnp.bfloat16
  want_out, want_grads = _numpy(*(a.astype(jnp.float32) for a in args), offset)
  assert _rel_rms(out, want_out) < 5e-3
  assert all(_rel_rms(g, w) < 1e-2 for g, w in zip(grads, want_grads))


def test_kernel_lowers_for_cuda():
  args, offset = _inputs(4, 256, 6, 64, 16, 384, jnp.bfloat16)
  o, y, scale, w, dout = args
  loss = lambda o, y, s, w: jnp.sum(gated_norm_linear(
      o, y, s, w, gate_offset=offset, backend="pallas_gpu").astype(jnp.float32) * dout)
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(o, y, scale, w).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "gated_norm_bwd" in text


def test_dispatch_and_errors(monkeypatch):
  (o, y, scale, w, _), offset = _inputs(1, 16, 2, 32, 0, 8, jnp.float32)
  assert resolve_backend("auto", o, offset) == "reference"  # CPU
  monkeypatch.setattr(api, "platform_of", lambda x: "gpu")
  assert resolve_backend("auto", o, offset) == "pallas_gpu"
  assert resolve_backend("auto", o, offset + 8) == "reference"  # gate not on a head boundary
  monkeypatch.undo()
  with pytest.raises(ValueError, match="unknown backend 'triton'"):
    gated_norm_linear(o, y, scale, w, gate_offset=offset, backend="triton")
  with pytest.raises(ValueError, match="gate's 64 columns from gate_offset 200"):
    gated_norm_linear(o, y, scale, w, gate_offset=200)
  with pytest.raises(ValueError, match=r"scale must be \[32\] and kernel \[64, D\]"):
    gated_norm_linear(o, y, jnp.ones(16), w, gate_offset=offset)
  assert not pallas_gpu.supports(16, 32, offset + 8)  # gate not on a head boundary
  with pytest.raises(ValueError, match="gate_offset 200, rows 16"):
    gated_norm_linear(o, jnp.pad(y, ((0, 0), (0, 0), (0, 8))), scale, w, gate_offset=200,
                      backend="pallas_gpu")

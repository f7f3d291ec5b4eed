"""SwiGLU's one-pass backward: the jnp reference and the Pallas GPU kernel (interpret mode)
against float64 numpy formulas; `swiglu_linear`'s gradients; the kernel's cuda lowering;
dispatch and errors (the 8-device check: test_elementwise_sharded.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.swiglu import pallas_gpu, swiglu_linear, swiglu_product_backward
from kernels_pallas.swiglu import api
from kernels_pallas.swiglu.api import resolve_backend


def _numpy_swiglu(ab):
  a, b = np.split(np.asarray(ab, np.float64), 2, axis=-1)
  sig = 1.0 / (1.0 + np.exp(-a))
  return a, b, sig, a * sig * b


def _numpy_backward(ab, dh):
  """(d ab, h) of h = swish(a) * b, written out from d/da = b (sig + a sig (1 - sig))."""
  a, b, sig, h = _numpy_swiglu(ab)
  dh = np.asarray(dh, np.float64)
  da = dh * b * (sig + a * sig * (1.0 - sig))
  return np.concatenate([da, dh * a * sig], axis=-1), h


def _rel_rms(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def _inputs(shape, dtype, seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  ab = (2.0 * jax.random.normal(k1, shape)).astype(dtype)  # wide enough to reach sigmoid's tails
  dh = jax.random.normal(k2, shape[:-1] + (shape[-1] // 2,)).astype(dtype)
  return ab, dh


# [..., 2 * inner]: DiG's grid layout, rows with only a factor 16 (48 = 16 x 3), inner 48
SHAPES = [(2, 8, 8, 256), (3, 4, 4, 96), (1, 16, 512)]


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu"])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_numpy(backend, shape):
  ab, dh = _inputs(shape, jnp.float32)
  dab, h = swiglu_product_backward(ab, dh, backend=backend, interpret=True)
  want_dab, want_h = _numpy_backward(ab, dh)
  assert dab.shape == ab.shape and h.shape == dh.shape
  assert _rel_rms(dab, want_dab) < 1e-6 and _rel_rms(h, want_h) < 1e-6


def test_several_blocks_each_way(monkeypatch):
  monkeypatch.setattr(pallas_gpu, "BLOCK_M", 16)
  monkeypatch.setattr(pallas_gpu, "BLOCK_INNER", 16)
  ab, dh = _inputs((2, 8, 8, 128), jnp.float32, seed=3)
  assert pallas_gpu.blocks(128, 64) == (16, 16)  # an 8 x 4 grid
  dab, h = swiglu_product_backward(ab, dh, backend="pallas_gpu", interpret=True)
  want_dab, want_h = _numpy_backward(ab, dh)
  assert _rel_rms(dab, want_dab) < 1e-6 and _rel_rms(h, want_h) < 1e-6


def test_bfloat16_in_and_out():
  ab, dh = _inputs((2, 4, 4, 128), jnp.bfloat16, seed=1)
  dab, h = swiglu_product_backward(ab, dh, backend="pallas_gpu", interpret=True)
  assert dab.dtype == h.dtype == jnp.bfloat16
  want_dab, want_h = _numpy_backward(ab.astype(jnp.float32), dh.astype(jnp.float32))
  assert _rel_rms(dab, want_dab) < 5e-3 and _rel_rms(h, want_h) < 5e-3


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu"])
def test_swiglu_linear_output_and_gradients(backend):
  """(swish(a) * b) @ W and the gradients of ab and W for a random cotangent, against numpy."""
  ab, _ = _inputs((2, 4, 4, 128), jnp.float32, seed=2)
  k1, k2 = jax.random.split(jax.random.PRNGKey(7))
  w = jax.random.normal(k1, (64, 48)) / 8.0
  dout = jax.random.normal(k2, (2, 4, 4, 48))
  with jax.default_matmul_precision("highest"):
    out, vjp = jax.vjp(lambda ab, w: swiglu_linear(ab, w, backend=backend, interpret=True), ab, w)
    dab, dw = vjp(dout)
  w64, dout64 = np.asarray(w, np.float64), np.asarray(dout, np.float64)
  h = _numpy_swiglu(ab)[3]
  want_dab, _ = _numpy_backward(ab, dout64 @ w64.T)
  assert _rel_rms(out, h @ w64) < 1e-6
  assert _rel_rms(dab, want_dab) < 1e-6
  assert _rel_rms(dw, h.reshape(-1, 64).T @ dout64.reshape(-1, 48)) < 1e-6


def test_kernel_lowers_for_cuda():
  ab, _ = _inputs((4, 16, 16, 2048), jnp.bfloat16)
  w = jnp.ones((1024, 384), jnp.bfloat16)
  loss = lambda ab, w: jnp.sum(swiglu_linear(ab, w, backend="pallas_gpu").astype(jnp.float32))
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(ab, w).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "swiglu_bwd" in text


def test_dispatch_and_errors(monkeypatch):
  ab = jnp.ones((2, 4, 4, 64))
  assert resolve_backend("auto", ab) == "reference"  # CPU
  monkeypatch.setattr(api, "platform_of", lambda x: "gpu")
  assert resolve_backend("auto", ab) == "pallas_gpu"
  assert resolve_backend("auto", jnp.ones((1, 7, 7, 64))) == "reference"  # 49 rows
  monkeypatch.undo()
  with pytest.raises(ValueError, match="unknown backend 'triton'"):
    swiglu_product_backward(ab, jnp.ones((2, 4, 4, 32)), backend="triton")
  with pytest.raises(ValueError, match="even last axis"):
    swiglu_linear(jnp.ones((2, 5)), jnp.ones((2, 3)))
  with pytest.raises(ValueError, match=r"dh must have shape \(2, 4, 4, 32\)"):
    swiglu_product_backward(ab, jnp.ones((2, 4, 4, 64)))
  with pytest.raises(ValueError, match=r"kernel must be \[32, D\]"):
    swiglu_linear(ab, jnp.ones((64, 8)))
  odd = jnp.ones((1, 7, 7, 64))  # 49 rows: no power-of-two block
  assert not pallas_gpu.supports(49, 32)
  with pytest.raises(ValueError, match=r"rows \(49\)"):
    swiglu_product_backward(odd, jnp.ones((1, 7, 7, 32)), backend="pallas_gpu")

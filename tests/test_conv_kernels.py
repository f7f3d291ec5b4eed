"""The 3x3 depthwise conv, alone and with DiG's gated residual add before it: the jnp reference
and the Pallas GPU kernels (interpret mode) against a float64 numpy convolution written out tap
by tap; the kernels' cuda lowering; dispatch and errors; the kernels per batch shard on 8
devices."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_on_8_devices
from kernels_pallas.conv import depthwise_conv3x3, gated_residual_conv3x3, pallas_gpu
from kernels_pallas.conv.api import resolve_backend


def _neighbours(h, w):
  """(i, j, r, c, rr, cc) for every tap (i, j) and output pixel (r, c) whose input pixel
  (rr, cc) = (r + i - 1, c + j - 1) lies inside the grid."""
  for i in range(3):
    for j in range(3):
      for r in range(h):
        for c in range(w):
          rr, cc = r + i - 1, c + j - 1
          if 0 <= rr < h and 0 <= cc < w:
            yield i, j, r, c, rr, cc


def _numpy_conv(x, kernel, bias):
  """y[n, r, c] = bias + sum_ij kernel[i, j] * x[n, r + i - 1, c + j - 1] (zero outside)."""
  y = np.broadcast_to(bias, x.shape).astype(np.float64)
  for i, j, r, c, rr, cc in _neighbours(*x.shape[1:3]):
    y[:, r, c] += kernel[i, j] * x[:, rr, cc]
  return y


def _numpy_grads(x, kernel, dy):
  """dx, dkernel, dbias of sum(conv(x) * dy), over the same neighbours."""
  dx = np.zeros_like(x)
  dk = np.zeros((3, 3, x.shape[-1]))
  for i, j, r, c, rr, cc in _neighbours(*x.shape[1:3]):
    dx[:, rr, cc] += kernel[i, j] * dy[:, r, c]
    dk[i, j] += np.sum(x[:, rr, cc] * dy[:, r, c], axis=0)
  return dx, dk, dy.sum(axis=(0, 1, 2))


def _inputs(shape, dtype, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  d = shape[-1]
  return (jax.random.normal(ks[0], shape).astype(dtype), jax.random.normal(ks[1], (3, 3, d)),
          jax.random.normal(ks[2], (d,)), jax.random.normal(ks[3], shape).astype(dtype))


def _rel_rms(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def _assert_float32_matches_numpy(backend, shape, seed):
  """Output and the gradients of x, kernel and bias (random cotangent) within 1e-6 of numpy."""
  x, kernel, bias, dy = _inputs(shape, jnp.float32, seed=seed)
  f = lambda x, k, b: depthwise_conv3x3(x, k, b, backend=backend, interpret=True)
  with jax.default_matmul_precision("highest"):
    y, vjp = jax.vjp(f, x, kernel, bias)
    grads = vjp(dy)
  arrays = [np.asarray(a, np.float64) for a in (x, kernel, bias, dy)]
  assert _rel_rms(y, _numpy_conv(*arrays[:3])) < 1e-6
  for got, want in zip(grads, _numpy_grads(arrays[0], arrays[1], arrays[3])):
    assert _rel_rms(got, want) < 1e-6


# (N, h, w, D): square, wide, a token count with only a factor 16 (blocks of 16), D = 48
# (channel blocks of 16), DiG-S's width
SHAPES = [(2, 8, 8, 32), (1, 4, 16, 64), (2, 16, 3, 48), (1, 4, 4, 384)]


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu"])
@pytest.mark.parametrize("shape", SHAPES)
def test_conv_and_gradients_match_numpy(backend, shape):
  _assert_float32_matches_numpy(backend, shape, seed=0)


@pytest.mark.parametrize("shape", [(2, 8, 8, 32), (2, 16, 3, 48), (1, 8, 4, 16)])
def test_blocks_of_16_tokens(monkeypatch, shape):
  """Blocks of 16 tokens and 16 channels: taps cross block edges, and the grid's first and last
  rows fall in different blocks."""
  monkeypatch.setattr(pallas_gpu, "BLOCK_T", 16)
  monkeypatch.setattr(pallas_gpu, "BLOCK_D", 16)
  _assert_float32_matches_numpy("pallas_gpu", shape, seed=2)


@pytest.mark.parametrize("shape", [(2, 8, 8, 32), (2, 16, 3, 48), (1, 8, 16, 16)])
def test_kernel_gradient_walks_of_several_steps(monkeypatch, shape):
  """The kernel-gradient walk with 16-token steps, 2 steps a program and 16 channels: taps cross
  step and program edges, and programs of one image sum separately."""
  monkeypatch.setattr(pallas_gpu, "DK_BLOCK_T", 16)
  monkeypatch.setattr(pallas_gpu, "DK_STEPS", 2)
  monkeypatch.setattr(pallas_gpu, "DK_BLOCK_D", 16)
  bt, steps, _ = pallas_gpu.dk_blocks(shape[1] * shape[2], shape[3])
  assert shape[1] * shape[2] // (bt * steps) >= 2  # several programs per image
  _assert_float32_matches_numpy("pallas_gpu", shape, seed=3)


def _residual_inputs(shape, dtype, seed):
  """x, gate, branch, kernel, bias and a cotangent dy for the gated residual conv."""
  x, kernel, bias, dy = _inputs(shape, dtype, seed=seed)
  kg, km = jax.random.split(jax.random.PRNGKey(seed + 100))
  gate = jax.random.normal(kg, (shape[0], shape[-1])).astype(dtype)
  return x, gate, jax.random.normal(km, shape).astype(dtype), kernel, bias, dy


def _numpy_residual(x, gate, branch, kernel, bias, dy):
  """The output and the gradients of x, gate, branch, kernel and bias of
  sum(conv(x + gate * branch) * dy), from the numpy conv above: x1's gradient is the conv's
  dx, which reaches x as it is and branch times the gate."""
  x1 = x + gate[:, None, None] * branch
  dx1, dk, db = _numpy_grads(x1, kernel, dy)
  return (_numpy_conv(x1, kernel, bias), dx1, np.sum(dx1 * branch, axis=(1, 2)),
          gate[:, None, None] * dx1, dk, db)


def _assert_residual_matches_numpy(backend, shape, dtype, tolerance, seed):
  inputs = _residual_inputs(shape, dtype, seed)
  f = lambda *args: gated_residual_conv3x3(*args, backend=backend, interpret=True)
  with jax.default_matmul_precision("highest"):
    y, vjp = jax.vjp(f, *inputs[:5])
    got = (y, *vjp(inputs[5]))
  assert y.dtype == dtype and [g.dtype for g in got[1:4]] == [dtype] * 3
  want = _numpy_residual(*(np.asarray(a.astype(jnp.float32), np.float64) for a in inputs))
  for name, a, b in zip(("y", "dx", "dgate", "dbranch", "dkernel", "dbias"), got, want):
    assert _rel_rms(a, b) < tolerance, name


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu"])
@pytest.mark.parametrize("shape", [(2, 8, 8, 32), (2, 16, 3, 48), (1, 4, 4, 384)])
def test_gated_residual_conv_matches_numpy(backend, shape):
  _assert_residual_matches_numpy(backend, shape, jnp.float32, 1e-6, seed=4)


@pytest.mark.parametrize("shape", [(2, 8, 8, 32), (1, 8, 4, 16)])
def test_gated_residual_conv_blocks_of_16_tokens(monkeypatch, shape):
  """Taps of x and branch cross block edges; each block writes its own share of the gate's
  gradient."""
  monkeypatch.setattr(pallas_gpu, "BLOCK_T", 16)
  monkeypatch.setattr(pallas_gpu, "BLOCK_D", 16)
  _assert_residual_matches_numpy("pallas_gpu", shape, jnp.float32, 1e-6, seed=5)


def test_gated_residual_conv_bfloat16_accumulates_in_float32():
  _assert_residual_matches_numpy("pallas_gpu", (2, 8, 8, 64), jnp.bfloat16, 5e-3, seed=6)


def test_gated_residual_conv_promotes_mixed_dtypes_as_jnp():
  x, gate, branch, kernel, bias, dy = _residual_inputs((1, 8, 8, 32), jnp.float32, seed=7)
  gate = gate.astype(jnp.bfloat16)
  y = gated_residual_conv3x3(x, gate, branch, kernel, bias, backend="pallas_gpu", interpret=True)
  assert y.dtype == jnp.float32
  want = _numpy_residual(*(np.asarray(a.astype(jnp.float32), np.float64)
                           for a in (x, gate, branch, kernel, bias, dy)))[0]
  assert _rel_rms(y, want) < 1e-6


def test_bfloat16_inputs_accumulate_in_float32():
  x, kernel, bias, dy = _inputs((2, 8, 8, 64), jnp.bfloat16, seed=1)
  f = lambda x, k, b: depthwise_conv3x3(x, k, b, backend="pallas_gpu", interpret=True)
  y, vjp = jax.vjp(f, x, kernel, bias)
  assert y.dtype == jnp.bfloat16
  arrays = [np.asarray(a.astype(jnp.float32), np.float64) for a in (x, kernel, bias, dy)]
  assert _rel_rms(y, _numpy_conv(*arrays[:3])) < 5e-3
  for got, want in zip(vjp(dy), _numpy_grads(arrays[0], arrays[1], arrays[3])):
    assert _rel_rms(got, want) < 5e-3


def test_kernel_lowers_for_cuda():
  x, kernel, bias, dy = _inputs((2, 16, 16, 384), jnp.bfloat16)
  loss = lambda x, k, b: jnp.sum(depthwise_conv3x3(x, k, b, backend="pallas_gpu") * dy)
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, kernel, bias).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "depthwise_conv_fwd" in text and "depthwise_conv_dk" in text
  assert "depthwise_conv_bwd" not in text  # dx is the forward kernel on dy


def test_gated_residual_kernels_lower_for_cuda():
  x, gate, branch, kernel, bias, dy = _residual_inputs((2, 16, 16, 384), jnp.bfloat16, seed=8)
  loss = lambda *args: jnp.sum(gated_residual_conv3x3(*args, backend="pallas_gpu") * dy)
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(
      x, gate, branch, kernel, bias).lower(lowering_platforms=("cuda",)).as_text()
  for name in ("depthwise_conv_fwd", "gated_residual_conv_dx", "depthwise_conv_dk"):
    assert name in text


def test_dispatch_and_errors():
  x = jnp.ones((1, 8, 8, 32))
  assert resolve_backend("auto", x) == "reference"  # CPU
  with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
    depthwise_conv3x3(x, jnp.ones((3, 3, 32)), jnp.ones(32), backend="cudnn")
  with pytest.raises(ValueError, match=r"kernel must be \[3, 3, 32\]"):
    depthwise_conv3x3(x, jnp.ones((3, 3, 16)), jnp.ones(32))
  odd = jnp.ones((1, 7, 7, 32))  # 49 tokens: no power-of-two block
  assert not pallas_gpu.supports(7, 7, 32)
  with pytest.raises(ValueError, match="h \\* w = 49"):
    depthwise_conv3x3(odd, jnp.ones((3, 3, 32)), jnp.ones(32), backend="pallas_gpu")
  with pytest.raises(ValueError, match=r"gated_residual_conv3x3: branch must be shaped like x"):
    gated_residual_conv3x3(x, jnp.ones((1, 32)), jnp.ones((1, 8, 4, 32)), jnp.ones((3, 3, 32)),
                           jnp.ones(32))
  with pytest.raises(ValueError, match=r"gate \[1, 32\], got \(1, 8, 8, 32\) and \(32,\)"):
    gated_residual_conv3x3(x, jnp.ones(32), x, jnp.ones((3, 3, 32)), jnp.ones(32))
  with pytest.raises(ValueError, match="gated_residual_conv3x3: pallas_gpu needs"):
    gated_residual_conv3x3(odd, jnp.ones((1, 32)), odd, jnp.ones((3, 3, 32)), jnp.ones(32),
                           backend="pallas_gpu")


def test_kernels_run_per_batch_shard_on_8_devices():
  result = run_on_8_devices("sharded_conv_check.py")
  assert result["num_devices"] == 8
  for name, calls in (("conv", 3), ("gated_residual_conv", 3)):  # fwd, dx, dk
    check = result[name]
    assert check["kernel_batch_sizes"] == [2] * calls, name
    assert check["loss_rel_err"] < 1e-5 and max(check["grad_rel_errs"]) < 1e-5, name


def test_bench_cli_times_and_checks_the_chain(tmp_path, capsys, monkeypatch):
  from kernels_pallas.conv import bench
  out = tmp_path / "conv.json"
  names = ("BLOCK_T", "BLOCK_D", "NUM_WARPS", "DK_BLOCK_T", "DK_STEPS", "DK_BLOCK_D",
           "DK_NUM_WARPS")
  settings = lambda: tuple(getattr(pallas_gpu, n) for n in names)
  defaults, seen = settings(), []
  time_chain = bench.time_chain

  def spy(conv, *args):  # the kernel's settings while each row is timed
    seen.append(settings())
    return time_chain(conv, *args)

  monkeypatch.setattr(bench, "time_chain", spy)
  bench.main(["--shape", "2,8,8,32", "--layers", "2", "--runs", "2", "--interpret", "--check",
              "--tile", "16,16,2", "--dk_tile", "16,2,16,1", "--json", str(out)])
  result = json.loads(out.read_text())
  assert [r["backend"] for r in result["rows"]] == [
      "reference", "pallas_gpu", "pallas_gpu tile (16, 16, 2)",
      "pallas_gpu dk_tile (16, 2, 16, 1)"]
  assert seen[2] == (16, 16, 2) + defaults[3:] and seen[3] == defaults[:3] + (16, 2, 16, 1)
  assert all(r["fwd_us"] > 0 and r["fwd_bwd_us"] > 0 for r in result["rows"])
  assert result["check"]["2,8,8,32"] < 1e-6
  assert settings() == defaults  # restored
  assert "| 2,8,8,32 | pallas_gpu |" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    bench.main(["--shape", "2,8,8"])


def test_bench_chain_check_sees_a_wrong_kernel(monkeypatch):
  """The bench's check is a real comparison: a kernel with a dropped tap fails it."""
  from kernels_pallas.conv import bench
  monkeypatch.setattr(pallas_gpu, "TAPS", pallas_gpu.TAPS[:-1])
  assert bench.check((2, 8, 8, 32), 2, interpret=True) > 1e-3


def test_bench_residual_chain_times_three_forms_and_checks_the_fused_one(tmp_path, monkeypatch):
  from kernels_pallas.conv import bench, pallas_gpu_residual
  out = tmp_path / "residual.json"
  bench.main(["--shape", "1,8,8,32", "--layers", "2", "--runs", "1", "--interpret", "--check",
              "--residual", "--tile", "16,16,2", "--json", str(out)])
  result = json.loads(out.read_text())
  assert result["residual"] and result["check"]["1,8,8,32"] < 1e-6
  assert [r["backend"] for r in result["rows"]] == [
      "reference", "pallas_gpu", "pallas_gpu fused", "pallas_gpu fused tile (16, 16, 2)"]
  # a fused dx kernel that loses the gate's shares fails the check
  dx_kernel = pallas_gpu_residual._dx_kernel

  def without_gate_shares(*refs, **kw):
    dx_kernel(*refs, **kw)
    refs[-1][...] = jnp.zeros(refs[-1].shape, refs[-1].dtype)

  monkeypatch.setattr(pallas_gpu_residual, "_dx_kernel", without_gate_shares)
  assert bench.check((1, 8, 8, 32), 2, interpret=True, residual=True) > 1e-3

"""The carry across GLA sequence blocks (kernels_pallas/gla/block_carry.py, Triton kernels in
interpret mode) against the block-by-block recurrence in float64 numpy; and its CUDA lowering."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.gla import block_carry


def _inputs(seed, b, h, kd, nb, vd):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  # total log-decays of whole blocks: from about -0.1 to -40 (strong gates erase the state)
  lam = -np.exp(rng.uniform(np.log(0.1), np.log(40.0), (b, h, nb, 1, kd))).astype(np.float32)
  return f(b, h, kd, nb, vd), lam, f(b, h, kd, vd), f(b, h, kd, nb, vd)


def _entering_reference(u, lam, h0):
  decay = np.exp(lam[:, :, :, 0, :].astype(np.float64)).transpose(0, 1, 3, 2)  # [B, H, K, NB]
  s, out = h0.astype(np.float64), np.zeros(u.shape)
  for n in range(u.shape[3]):
    out[:, :, :, n] = s
    s = decay[:, :, :, n, None] * s + u[:, :, :, n]
  return out


def _leaving_reference(w_local, lam, dht, s_out):
  decay = np.exp(lam[:, :, :, 0, :].astype(np.float64)).transpose(0, 1, 3, 2)
  ds, out = dht.astype(np.float64), np.zeros(w_local.shape)
  for n in reversed(range(w_local.shape[3])):
    out[:, :, :, n] = ds
    ds = decay[:, :, :, n, None] * ds + w_local[:, :, :, n]
  dgc = np.sum(s_out * out, axis=-1).transpose(0, 1, 3, 2)[:, :, :, None, :]
  return out, dgc


def _rel(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.sqrt(np.mean((x - ref) ** 2) / np.mean(ref ** 2)))


@pytest.mark.parametrize("b,h,kd,nb,vd", [(1, 2, 16, 3, 32), (2, 1, 32, 17, 64),
                                          (1, 1, 16, 40, 16)])
def test_carry_matches_block_by_block_recurrence(b, h, kd, nb, vd):
  """Block counts below, above and not a power of two (the kernel's tiles of 16, 32, 64)."""
  u, lam, h0, s_out = _inputs(nb, b, h, kd, nb, vd)
  s_in = block_carry.states_entering(u, lam, h0, interpret=True)
  assert _rel(s_in, _entering_reference(u, lam, h0)) < 1e-5
  ds_out, dgc = block_carry.dstates_leaving(u, lam, h0, s_out, interpret=True)
  want_ds, want_dgc = _leaving_reference(u, lam, h0, s_out)
  assert ds_out.shape == u.shape and dgc.shape == lam.shape
  assert _rel(ds_out, want_ds) < 1e-5
  assert _rel(dgc, want_dgc) < 1e-5


def test_carry_kernels_lower_for_cuda():
  u, lam, h0, s_out = (jnp.asarray(x) for x in _inputs(0, 1, 6, 32, 61, 64))
  for fn, args, name in ((block_carry.states_entering, (u, lam, h0), "gla_states_entering"),
                         (block_carry.dstates_leaving, (u, lam, h0, s_out),
                          "gla_dstates_leaving")):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert name in text, name

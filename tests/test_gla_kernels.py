"""Pallas GLA kernels (GPU and TPU, interpret mode on CPU) against the token-by-token reference:
output, final state and every gradient, plus dispatch errors and lowering for cuda and tpu."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from conftest import run_on_8_devices
from jaxpr_eqns import eqns
from kernels_pallas.gla import chunk_gla, chunk_gla_packed, chunk_math, pallas_gpu, reference

KERNELS = ("pallas_gpu", "pallas_tpu")
TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 5e-3}


def _rel_rms(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.sqrt(np.mean((x - ref) ** 2) / np.mean(ref ** 2))


def _inputs(seed, b, t, h, kd, vd, dtype, strong):
  ks = jax.random.split(jax.random.PRNGKey(seed), 7)
  q, k = (jax.random.normal(ks[i], (b, t, h, kd), dtype) for i in range(2))
  v = jax.random.normal(ks[2], (b, t, h, vd), dtype)
  # Gate normaliser 16 is DiG's; 0.1 gives per-step log-decays down to about -40, half of them
  # below -7 (stress case).
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h, kd))) / (0.1 if strong else 16.0)
  h0 = jax.random.normal(ks[4], (b, h, kd, vd))
  do = jax.random.normal(ks[5], (b, t, h, vd), dtype)
  dht = jax.random.normal(ks[6], (b, h, kd, vd))
  return (q, k, v, g, h0), (do, dht)


def _outputs_and_grads(fn, primals, cotangents, with_h0):
  """(o, final state) and the vjp of both under random cotangents, for all inputs."""
  q, k, v, g, h0 = primals

  def run(q, k, v, g, h0):
    return fn(q, k, v, g, initial_state=h0 if with_h0 else None, output_final_state=True)

  (o, ht), vjp = jax.vjp(run, q, k, v, g, h0)
  do, dht = cotangents
  grads = vjp((do.astype(o.dtype), dht))
  return {"o": o, "ht": ht, **dict(zip(("dq", "dk", "dv", "dg", "dh0"), grads))}


CASES = {  # B, T, H, K, V, dtype, reverse, initial state, strong gates
    "T%C!=0, K=36 V=72, h0": (1, 100, 2, 36, 72, jnp.float32, False, True, False),
    "T<C, K=16, reverse, strong, BH=1": (1, 40, 1, 16, 32, jnp.float32, True, False, True),
    "K=V=64, strong, BH=4": (2, 130, 2, 64, 64, jnp.float32, False, False, True),
    "bf16 K=32 V=64, reverse, h0": (1, 100, 2, 32, 64, jnp.bfloat16, True, True, False),
    "bf16 K=32 V=64, strong, T=300": (1, 300, 1, 32, 64, jnp.bfloat16, False, False, True),
}


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_recurrent_reference(backend, case):
  _check_case(backend, case)


# The GPU kernel splits the sequence into blocks of chunks (states across blocks by an XLA pass);
# the cases above run with one or two blocks. Force many, including a short last block.
_BLOCK_CASES = [
    ("T%C!=0, K=36 V=72, h0", 3),                 # 4 chunks: blocks of 3 + 1
    ("K=V=64, strong, BH=4", 1),                  # 5 chunks, one per block
    ("bf16 K=32 V=64, reverse, h0", 2),           # reverse scan over 2 blocks
    ("bf16 K=32 V=64, strong, T=300", 3),         # 10 chunks: 3 + 3 + 3 + 1
]


# Stored chunk states (RECOMPUTE_STATES off, not the default) on two of the cases.
@pytest.mark.parametrize("case,block_chunks,recompute",
                         [(*c, True) for c in _BLOCK_CASES]
                         + [(*c, False) for c in _BLOCK_CASES[2:]])
def test_gpu_kernel_sequence_blocks(monkeypatch, case, block_chunks, recompute):
  monkeypatch.setattr(pallas_gpu, "BLOCK_CHUNKS", block_chunks)
  monkeypatch.setattr(pallas_gpu, "RECOMPUTE_STATES", recompute)
  _check_case("pallas_gpu", case)


# With one forward block, the backward may walk it as shorter blocks (`BWD_BLOCK_CHUNKS`, or
# `backward_block_chunks` by waves): the chunk-state walk then also takes each such block's
# gradient-state share and joins them (the state gradient leaving each, the gate's carry).
@pytest.mark.parametrize("case,half", [
    ("T%C!=0, K=36 V=72, h0", 2),                 # 4 chunks: 2 + 2, final-state gradient
    ("T<C, K=16, reverse, strong, BH=1", 1),      # 3 chunks, one per backward block, reverse
    ("bf16 K=32 V=64, reverse, h0", 3),           # 4 chunks: 3 + 1
])
def test_gpu_kernel_backward_blocks_within_one_forward_block(monkeypatch, case, half):
  monkeypatch.setattr(pallas_gpu, "BWD_BLOCK_CHUNKS", half)
  _check_case("pallas_gpu", case)


@pytest.mark.parametrize("n_chunks,sequences,expected", [
    (16, 384, 8),    # DiG-S/2 256 px, batch 64: 2 waves x 16 steps -> 3 x 8
    (16, 192, 16),   # one wave either way
    (16, 768, 16),   # 3 x 16 against 6 x 8: no gain
    (16, 576, 16),   # 3 x 16 against 5 x 8: 17 %, below the fifth asked for
    (16, 1024, 16),  # DiG-XL/2 256 px (16 heads): 4 x 16 against 8 x 8
    (1, 999, 1),
    (3, 2, 3),       # one wave: the walk is short already, no carry added
])
def test_backward_block_chunks_by_waves(n_chunks, sequences, expected):
  """Worked by hand with 264 program slots."""
  assert pallas_gpu.backward_block_chunks(n_chunks, sequences, slots=264) == expected


@pytest.mark.parametrize("recompute,per_chunk", [(True, False), (False, True)])
def test_gpu_residuals_keep_block_states_only_when_recomputing(monkeypatch, recompute,
                                                               per_chunk):
  """With RECOMPUTE_STATES the forward keeps the state entering each block, not each chunk."""
  monkeypatch.setattr(pallas_gpu, "RECOMPUTE_STATES", recompute)
  monkeypatch.setattr(pallas_gpu, "BLOCK_CHUNKS", 4)
  b, t, h, kd, vd = 1, 16 * pallas_gpu.CHUNK, 2, 32, 64
  spec = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)
  _, _, residuals = jax.eval_shape(
      lambda *a: pallas_gpu.forward(*a, scale=0.1, reverse=False),
      spec((b, t, h, kd)), spec((b, t, h, kd)), spec((b, t, h, vd)),
      spec((b, t, h, kd), jnp.float32), spec((b, h, kd, vd), jnp.float32))
  # per chunk [B, H, NC, K, V]; per block [B, H, K, NB, V] (blocks beside V)
  assert residuals[0].shape == ((b, h, 16, kd, vd) if per_chunk else (b, h, kd, 4, vd))


# The GPU kernel's default scheme (chunk_math diag=16) keeps gates >= -10 per step; the exact
# scheme (diag=1) is still a setting: check it on the strong-gate cases with no floor.
@pytest.mark.parametrize("case", [c for c in CASES if "strong" in c])
def test_gpu_kernel_exact_scheme(monkeypatch, case):
  monkeypatch.setattr(pallas_gpu, "DIAG", 1)
  _check_case("pallas_gpu", case)


def test_gpu_settings_changed_after_a_trace_take_effect(monkeypatch):
  """Settings the kernels read while traced (the backward walk's warps, the forward's V tiles)
  reach the kernels even when the same shapes were traced before with other settings (the jit
  cache once reused the first trace's kernels, so bench variants and tests setting them
  changed nothing)."""
  (q, k, v, g, _), (do, _) = _inputs(0, 1, 64, 2, 32, 64, jnp.float32, False)

  def backward_warps(warps):
    monkeypatch.setattr(pallas_gpu, "NUM_WARPS", {"default": 4, "gla_bwd": warps})
    f = lambda *a: chunk_gla(*a, backend="pallas_gpu", interpret=True)[0]
    jaxpr = jax.make_jaxpr(lambda *a: jax.vjp(f, *a)[1](do))(q, k, v, g).jaxpr
    calls = [e for e in eqns(jaxpr)
             if e.primitive.name == "pallas_call" and str(e.params["name"]) == "gla_bwd"]
    params = [e.params["compiler_params"] for e in calls]
    return [(p["triton"] if isinstance(p, dict) else p).num_warps for p in params]

  assert backward_warps(4) == [4]
  assert backward_warps(2) == [2]
  assert backward_warps(8) == [8]

  def forward_grid(min_programs):  # 2 programs (b x h): V tiles while below min_programs
    monkeypatch.setattr(pallas_gpu, "V_TILE_PROGRAMS", min_programs)
    f = lambda *a: chunk_gla(*a, backend="pallas_gpu", interpret=True)[0]
    jaxpr = jax.make_jaxpr(f)(q, k, v, g).jaxpr
    return [tuple(e.params["grid_mapping"].grid) for e in eqns(jaxpr)
            if e.primitive.name == "pallas_call" and str(e.params["name"]) == "gla_fwd"]

  assert forward_grid(2) == [(1, 2, 1)]
  assert forward_grid(4) == [(1, 2, 2)]


# Chunks of 32 rows (a bench setting) take the other in-chunk path of the diag scheme: an
# anchored matmul between the two 16-row halves plus the diagonal blocks.
@pytest.mark.parametrize("case", ["T%C!=0, K=36 V=72, h0", "bf16 K=32 V=64, strong, T=300"])
def test_gpu_kernel_chunk_32(monkeypatch, case):
  monkeypatch.setattr(pallas_gpu, "CHUNK", 32)
  _check_case("pallas_gpu", case)


def _gate_floor(backend):
  return chunk_math.gate_floor(pallas_gpu.DIAG) if backend == "pallas_gpu" else None


def _check_case(backend, case):
  dtype = CASES[case][5]
  errors = _case_errors(backend, case)
  assert all(e < TOLERANCE[dtype] for e in errors.values()), errors
  if dtype == jnp.bfloat16:
    # bf16 do enters the backward's products as it is (exact in bf16), with the scale on the
    # other factor. In interpret mode, where the float32 products are exact, dq, dk and dg then
    # match the float32 reference to a few 1e-5; rounding scale * do to bf16 first had put
    # them at 0.6-2.3e-3.
    assert max(errors[n] for n in ("dq", "dk", "dg")) < 3e-4, errors


def _case_errors(backend, case):
  """Relative RMS error of the output, final state and every gradient (interpret mode)."""
  b, t, h, kd, vd, dtype, reverse, with_h0, strong = CASES[case]
  primals, cotangents = _inputs(list(CASES).index(case), b, t, h, kd, vd, dtype, strong)
  floor = _gate_floor(backend)
  if strong and floor is not None:  # the stress gates reach -40: the floor is exercised
    assert float(jnp.min(primals[3])) < floor

  def kernel(*args, **kw):
    return chunk_gla(*args, reverse=reverse, backend=backend, interpret=True, **kw)

  def truth(q, k, v, g, **kw):  # fp32 ground truth on the same (rounded) inputs
    up = lambda x: x.astype(jnp.float32)
    if floor is not None:  # the kernel's contract: gates below the floor act as the floor,
      g = g + jax.lax.stop_gradient(jnp.maximum(g, floor) - g)  # dg taken at the floor
    return reference.recurrent_gla(up(q), up(k), up(v), g, reverse=reverse, **kw)

  got = _outputs_and_grads(kernel, primals, cotangents, with_h0)
  want = _outputs_and_grads(truth, primals, cotangents, with_h0)
  assert got["o"].dtype == dtype and got["ht"].dtype == jnp.float32
  names = [n for n in got if with_h0 or n != "dh0"]
  return {n: _rel_rms(got[n], want[n]) for n in names}


def test_tpu_kernel_has_no_races():
  primals, cotangents = _inputs(0, 1, 150, 2, 16, 32, jnp.float32, False)
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)

  def kernel(*args, **kw):
    return chunk_gla(*args, backend="pallas_tpu", interpret=params, **kw)

  got = _outputs_and_grads(kernel, primals, cotangents, True)
  want = _outputs_and_grads(reference.recurrent_gla, primals, cotangents, True)
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # races flag lives here
  assert not interpret_pallas_call.races.races_found
  assert all(_rel_rms(got[n], want[n]) < 1e-4 for n in got)


@pytest.mark.parametrize("backend,platform", [("pallas_gpu", "cuda"), ("pallas_tpu", "tpu")])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("reverse", [False, True])
def test_forward_and_backward_lower(backend, platform, dtype, reverse):
  b, t, h, kd, vd = 2, 200, 3, 32, 64

  def loss(q, k, v, g, h0):
    o, ht = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, reverse=reverse,
                      backend=backend)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(ht)

  spec = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt)
  args = (spec((b, t, h, kd)), spec((b, t, h, kd)), spec((b, t, h, vd)),
          spec((b, t, h, kd), jnp.float32), spec((b, h, kd, vd), jnp.float32))
  lowered = jax.jit(jax.grad(loss, argnums=range(5))).trace(*args).lower(
      lowering_platforms=(platform,))
  text = lowered.as_text()
  marker = "tpu_custom_call" if platform == "tpu" else "triton"
  assert text.count(marker) >= 2, "expected a forward and a backward kernel"


@pytest.mark.parametrize("n_chunks,sequences,expected", [
    (16, 384, 16),    # DiG-S/2 256 px, batch 64: one block (no state passes) whatever the waves
    (784, 6, 18),     # 1792 px, batch 1: 294 programs of 16 = 2 waves (32 steps); 366 of 13:
                      # 26; 264 of 18: one wave (18)
    (784, 12, 13),    # batch 2: 732 of 13 = 3 waves (39); one wave would need 36 chunks
    (1024, 6, 24),    # 2048 px, batch 1: 64 blocks of 16 = 2 waves (32); 12 would take 24 steps
                      # but 86 blocks; 258 programs of 24: one wave (24)
    (576, 6, 14),     # 1536 px: 42 blocks of 14 = 252 programs, one wave of 14 steps
    (64, 96, 13),     # 512 px, batch 16: 480 programs of 13, 2 waves (26); of 16: 2 waves (32)
    (1024, 16, 16),   # XL/2 2048 px: 64 blocks already, so no smaller size (4 waves of 16),
                      # and one wave would need 64 chunks a block
    (2048 * 16, 1, 256),  # 128 blocks at most: the base doubles to 256; 128 programs of 256
])
def test_block_size_fills_the_last_wave_of_backward_programs(n_chunks, sequences, expected):
  """Worked by hand with 264 program slots (an H100: 132 SMs x 2 backward programs)."""
  assert pallas_gpu.block_chunks_for(n_chunks, sequences, slots=264) == expected


def test_gpu_sequence_blocks_lower():
  """At T = 4096 the GPU kernel runs four kernels besides the carry across blocks: block
  states and outputs forward; recomputed chunk states with the block gradient states (one
  pass), and gradients backward."""
  b, t, h, kd, vd = 1, 4096, 2, 32, 64

  def loss(q, k, v, g):
    return jnp.sum(chunk_gla(q, k, v, g, backend="pallas_gpu")[0].astype(jnp.float32))

  spec = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)
  args = (spec((b, t, h, kd)), spec((b, t, h, kd)), spec((b, t, h, vd)),
          spec((b, t, h, kd), jnp.float32))
  text = jax.jit(jax.grad(loss, argnums=range(4))).trace(*args).lower(
      lowering_platforms=("cuda",)).as_text()
  for name in ("gla_fwd_states", "gla_fwd", "gla_states_pass", "gla_bwd"):
    assert name in text, name


def test_gpu_backward_blocks_lower():
  """DiG-S/2 at 256 px, batch 64 (384 sequences of 16 chunks, one forward block): the backward
  walks halves, so the chunk-state walk takes their shares and no carry kernel runs."""
  b, t, h, kd, vd = 64, 256, 6, 32, 64
  assert pallas_gpu.backward_block_chunks(t // pallas_gpu.CHUNK, b * h) == 8

  def loss(q, k, v, g):
    return jnp.sum(chunk_gla(q, k, v, g, backend="pallas_gpu")[0].astype(jnp.float32))

  spec = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)
  args = (spec((b, t, h, kd)), spec((b, t, h, kd)), spec((b, t, h, vd)),
          spec((b, t, h, kd), jnp.float32))
  text = jax.jit(jax.grad(loss, argnums=range(4))).trace(*args).lower(
      lowering_platforms=("cuda",)).as_text()
  for name in ("gla_fwd", "gla_states_pass", "gla_bwd"):
    assert name in text, name
  for name in ("gla_fwd_states", "gla_chunk_states", "gla_dstates_leaving"):
    assert name not in text, name


def test_auto_uses_reference_on_cpu():
  (q, k, v, g, _), _ = _inputs(1, 1, 20, 1, 16, 16, jnp.float32, False)
  o, _ = chunk_gla(q, k, v, g)
  want, _ = reference.chunked_gla(q, k, v, g)
  np.testing.assert_array_equal(o, want)


@pytest.mark.parametrize("kd,vd,bad", [(8, 32, "K=8"), (32, 512, "V=512")])
def test_kernel_head_dim_limits_are_named(kd, vd, bad):
  (q, k, v, g, _), _ = _inputs(2, 1, 20, 1, kd, vd, jnp.float32, False)
  with pytest.raises(ValueError, match=f"16 to 256, got {bad}"):
    chunk_gla(q, k, v, g, backend="pallas_gpu", interpret=True)


def test_kernel_runs_per_batch_shard_under_a_mesh():
  """On 8 devices (data 2 x fsdp 4) each Pallas call sees 1 of the 8 examples (XLA would
  otherwise gather the whole batch onto every device), results match the token-by-token
  reference, and the sharded program lowers for cuda and tpu; chunk_gla_packed too."""
  result = run_on_8_devices("sharded_gla_check.py")
  assert result["kernel_batch_sizes"] and set(result["kernel_batch_sizes"]) == {1}
  assert result["loss_rel_err"] < 1e-4 and max(result["grad_rel_errs"]) < 1e-4
  assert result["lowers"] == {"cuda": True, "tpu": True}
  # chunk_gla_packed (the GLA layer's entry point) likewise
  assert result["packed_kernel_batch_sizes"]
  assert set(result["packed_kernel_batch_sizes"]) == {1}
  assert max(result["packed_rel_errs"]) < 1e-4


def test_backward_waits_for_the_cotangents():
  """The Pallas backward's inputs pass through one optimization barrier with the cotangents, so
  XLA cannot run the residual-only part (the recomputed chunk states) during the forward, where
  every layer's states would be live at once."""
  b, t, h, kd, vd = 1, 64, 2, 32, 64

  def loss(q, k, v, g):
    return jnp.sum(chunk_gla(q, k, v, g, backend="pallas_gpu", interpret=True)[0])

  (q, k, v, g, _), _ = _inputs(0, b, t, h, kd, vd, jnp.float32, False)
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=range(4)))(q, k, v, g).jaxpr
  barriers = [e for e in eqns(jaxpr) if e.primitive.name == "optimization_barrier"]
  assert len(barriers) == 1
  shapes = [tuple(x.aval.shape) for x in barriers[0].invars]
  assert shapes.count((b, t, h, vd)) == 2  # v and the output cotangent
  assert (b, h, kd, vd) in shapes  # the final-state cotangent (and the final state)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("backend", KERNELS)
def test_score_factors_are_anchored_at_each_blocks_mid_row(reverse, backend):
  """chunk_math's in-chunk score factors against numpy: for every halving level, rows get
  exp(-|G_r - G_mid|) with mid the last row (scan order) of the first half of their block, so
  no factor exceeds 1 whatever the gates; the diagonal blocks' query factor is exp(G_r - G_mid).
  (The scores alone cannot show a wrong anchor: it cancels in q . k; only the range changes.)"""
  from kernels_pallas.gla import pallas_tpu
  ops = pallas_gpu.OPS if backend == "pallas_gpu" else pallas_tpu.OPS
  c, diag = 32, 8
  g = -np.random.default_rng(3).uniform(0.0, 3.0, (c, 4)).astype(np.float32)
  scan = np.arange(c)[::-1] if reverse else np.arange(c)
  big_g = np.empty_like(g, dtype=np.float64)
  big_g[scan] = np.cumsum(g[scan].astype(np.float64), axis=0)
  with jax.default_matmul_precision("highest"):
    terms = chunk_math._score_terms(jnp.asarray(g), reverse, diag, ops)
  for (fq, _, _), h in zip(terms, (16, 8)):
    first = np.arange(c) // (2 * h) * (2 * h)  # first row (memory order) of each row's block
    mid = first + (h if reverse else h - 1)
    # exponents compared (down to about -48 here): float32 sums carry ~1e-5 absolute error
    np.testing.assert_allclose(np.log(np.asarray(fq)), -np.abs(big_g - big_g[mid]), atol=1e-4)
  mid = np.arange(c) // diag * diag + (diag // 2 if reverse else diag // 2 - 1)
  np.testing.assert_allclose(np.log(np.asarray(terms[-1][0])), big_g - big_g[mid], atol=1e-4)


def _pack(q, k, v, trailing):
  """[q heads | k heads | v heads | trailing columns], as one projection matmul writes them."""
  b, t = q.shape[:2]
  return jnp.concatenate([x.reshape(b, t, -1) for x in (q, k, v)] + [trailing], axis=-1)


PACKED_CASES = {  # B, T, H, K, V, dtype, reverse, initial state, trailing columns, block chunks
    "bf16 K=32 V=64, reverse, h0, trailing": (2, 64, 3, 32, 64, jnp.bfloat16, True, True, 20,
                                              None),
    "several blocks, V tiles": (1, 96, 2, 32, 64, jnp.float32, False, False, 0, 2),
    "T%C!=0 (sliced, chunk_gla)": (1, 40, 2, 16, 32, jnp.float32, False, True, 5, None),
}


@pytest.mark.parametrize("case", list(PACKED_CASES))
def test_packed_gla_matches_recurrent_reference(monkeypatch, case):
  """chunk_gla_packed on [q | k | v | other columns] against the token-by-token reference on the
  three parts: output, final state and the gradients (the other columns' gradient is zero)."""
  b, t, h, kd, vd, dtype, reverse, with_h0, extra, block_chunks = PACKED_CASES[case]
  monkeypatch.setattr(pallas_gpu, "BLOCK_CHUNKS", block_chunks)
  (q, k, v, g, h0), (do, dht) = _inputs(7, b, t, h, kd, vd, dtype, False)
  trailing = jax.random.normal(jax.random.PRNGKey(8), (b, t, extra), dtype)
  qkv = _pack(q, k, v, trailing)
  init = h0 if with_h0 else None

  def kernel(qkv, g, h0):
    return chunk_gla_packed(qkv, g, value_dim=vd, initial_state=h0, output_final_state=True,
                            reverse=reverse, backend="pallas_gpu", interpret=True)

  def truth(qkv, g, h0):
    parts = [qkv[..., a:a + h * d].reshape(b, t, h, d).astype(jnp.float32)
             for a, d in ((0, kd), (h * kd, kd), (2 * h * kd, vd))]
    return reference.recurrent_gla(*parts, g, initial_state=h0, output_final_state=True,
                                   reverse=reverse)

  results = []
  for fn in (kernel, truth):
    out, vjp = jax.vjp(fn, qkv, g, init)
    results.append((*out, *vjp((do.astype(out[0].dtype), dht))))
  got, want = results
  assert got[0].dtype == dtype
  np.testing.assert_array_equal(got[2][..., h * (2 * kd + vd):], 0)
  names = ["o", "ht", "dqkv", "dg"] + (["dh0"] if with_h0 else [])
  errors = {n: _rel_rms(a, w) for n, a, w in zip(names, got, want)}
  assert all(e < TOLERANCE[dtype] for e in errors.values()), errors


def test_packed_gla_reads_and_writes_the_packed_array_in_place():
  """On the GPU path the kernels take the packed array itself (no q, k, v sliced out of it)
  and the backward writes the packed gradient (no concatenation)."""
  b, t, h, kd, vd = 1, 64, 2, 32, 64
  (q, k, v, g, _), _ = _inputs(3, b, t, h, kd, vd, jnp.float32, False)
  qkv = _pack(q, k, v, jnp.ones((b, t, 16)))

  def loss(qkv, g):
    return jnp.sum(chunk_gla_packed(qkv, g, value_dim=vd, backend="pallas_gpu",
                                    interpret=True)[0])

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(qkv, g).jaxpr
  kernels = [e for e in eqns(jaxpr) if e.primitive.name == "pallas_call"]
  assert any(x.aval.shape == qkv.shape for e in kernels for x in e.invars)
  assert any(x.aval.shape == (b, t, h * (2 * kd + vd)) for e in kernels for x in e.outvars)
  copies = {"slice", "concatenate", "split", "dynamic_slice"}
  outside = [e.primitive.name for e in jaxpr.eqns if e.primitive.name in copies]
  assert not outside, outside


def test_packed_gla_width_errors_name_the_values():
  g = jnp.zeros((1, 16, 2, 32), jnp.float32)
  with pytest.raises(ValueError, match="width 100 cannot hold"):
    chunk_gla_packed(jnp.ones((1, 16, 100)), g, value_dim=64)
  with pytest.raises(ValueError, match="same B, T"):
    chunk_gla_packed(jnp.ones((1, 8, 256)), g)


def test_packed_gpu_kernels_lower():
  """Packed, with trailing columns and many sequence blocks: all four GPU walks lower for
  cuda, forward and backward."""
  b, t, h, kd, vd = 1, 4096, 2, 32, 64

  def loss(qkv, g):
    o, _ = chunk_gla_packed(qkv, g, value_dim=vd, reverse=True, backend="pallas_gpu")
    return jnp.sum(o.astype(jnp.float32))

  args = (jax.ShapeDtypeStruct((b, t, h * (2 * kd + vd) + 48), jnp.bfloat16),
          jax.ShapeDtypeStruct((b, t, h, kd), jnp.float32))
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(*args).lower(
      lowering_platforms=("cuda",)).as_text()
  for name in ("gla_fwd_states", "gla_fwd", "gla_states_pass", "gla_bwd"):
    assert name in text, name


def test_bench_check_covers_the_backward_halves(monkeypatch):
  """`python -m kernels_pallas.bench --check` (what a GPU user runs) checks the GPU kernel on
  two paths; here in interpret mode. The "halves" path really walks one forward block
  backward as two, and both are within the bf16 tolerance of the float32 reference."""
  from kernels_pallas import bench
  halves, states_pass = [], pallas_gpu._states_pass

  def spy(*args, **kw):
    halves.append(kw.get("half"))
    return states_pass(*args, **kw)
  monkeypatch.setattr(pallas_gpu, "_states_pass", spy)
  rows = bench.check(["pallas_gpu"], interpret=True)
  assert [r["backend"] for r in rows] == ["pallas_gpu", "pallas_gpu halves"] * 2
  assert 10 in halves and None in halves
  for r in rows:
    assert max(v for n, v in r.items() if n not in ("backend", "reverse")) < 5e-3, r


@pytest.mark.parametrize("dtype,reverse,block_chunks", [
    (jnp.float32, False, None), (jnp.float32, True, 2), (jnp.bfloat16, False, 2)])
def test_gpu_backward_gives_the_gate_preactivation_gradient(monkeypatch, dtype, reverse,
                                                            block_chunks):
  """`gate_normalizer`: the backward returns dL/dz for g = log_sigmoid(z) / 16 (in q's dtype)
  instead of dg; checked against autodiff through the token-by-token reference. Some z are
  far below -160, so their gates sit under the kernels' floor of -10."""
  monkeypatch.setattr(pallas_gpu, "BLOCK_CHUNKS", block_chunks)
  b, t, h, kd, vd = 1, 64, 2, 32, 64
  (q, k, v, _, _), (do, _) = _inputs(7, b, t, h, kd, vd, dtype, False)
  z = 3.0 * jax.random.normal(jax.random.PRNGKey(8), (b, t, h, kd))
  z = z.at[0, 5:9, 0, :4].set(-250.0)
  gate = lambda z: jax.nn.log_sigmoid(z) / 16.0
  kw = dict(scale=kd ** -0.5, reverse=reverse)

  def ref(z):
    args = (a.astype(jnp.float32) for a in (q, k, v))
    return reference.recurrent_gla(*args, gate(z), **kw)[0]

  want = jax.vjp(ref, z)[1](do.astype(jnp.float32))[0]
  h0 = jnp.zeros((b, h, kd, vd), jnp.float32)

  @jax.jit
  def kernel_dz(z):
    g = gate(z)
    o, _, res = pallas_gpu.forward(q, k, v, g, h0, **kw, interpret=True)
    return pallas_gpu.backward(q, k, v, g, do.astype(o.dtype), res, h0, None,
                               gate_normalizer=16.0, **kw, interpret=True)[3]

  got = kernel_dz(z)
  assert got.dtype == dtype
  assert _rel_rms(got, want) < TOLERANCE[dtype]


def test_worst_relative_rms_counts_a_non_finite_error_as_infinite():
  """The kernel benches' checks: a NaN after a finite error must not pass as the finite one."""
  from kernels_pallas.bench import worst_relative_rms
  want = [jnp.ones(4), jnp.full(4, 2.0)]
  assert worst_relative_rms([jnp.full(4, 1.1), jnp.full(4, 2.0)], want) == pytest.approx(0.1)
  assert worst_relative_rms([jnp.full(4, 1.1), jnp.full(4, jnp.nan)], want) == float("inf")

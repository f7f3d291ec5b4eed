"""dig_jax.flops against independent counts; the dig_jax.bench CLI end to end on CPU."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import run_cli
from dig_jax import bench, bench_report, flops
from kernels_pallas.gla.api import unpack_qkv
from dig_jax.models import create_model
from kernels_pallas.settings import module_settings


def _dot_flops(jaxpr) -> int:
  """2 x multiply-adds of every dot_general and convolution in a (closed) jaxpr, recursively."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      (_, rc), (_, rb) = eqn.params["dimension_numbers"]
      rhs_free = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
      total += 2 * math.prod(lhs) * math.prod(rhs_free)
    elif eqn.primitive.name == "conv_general_dilated":
      out = eqn.outvars[0].aval.shape
      rhs = eqn.invars[1].aval.shape
      out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
      total += 2 * math.prod(out) * math.prod(rhs) // rhs[out_feature_dim]
    for sub in _sub_jaxprs(eqn.params):
      total += _dot_flops(sub)
  return total


def _sub_jaxprs(params):
  for value in params.values():
    for v in value if isinstance(value, (list, tuple)) else (value,):
      if hasattr(v, "eqns"):
        yield v
      elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
        yield v.jaxpr


def _forward_jaxpr(model, batch, latent):
  graphdef, state = nnx.split(model)
  x = jnp.ones((batch, latent, latent, 4), jnp.float32)
  t = jnp.ones((batch,), jnp.int32)
  y = jnp.ones((batch,), jnp.int32)
  fn = lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y)
  return fn, (state, x, t, y), jax.make_jaxpr(fn)(state, x, t, y).jaxpr


TINY = dict(depth=2, hidden_size=128, num_heads=2)


@pytest.mark.parametrize("name,latent", [("DiT-S/2", 16), ("DiT-S/4", 24)])
def test_dit_flops_match_jaxpr_and_xla(name, latent):
  model = create_model(name, input_size=latent, in_channels=4, num_classes=10,
                       attention_impl="xla", rngs=nnx.Rngs(0), **TINY)
  fn, args, jaxpr = _forward_jaxpr(model, 2, latent)
  want = flops.forward_flops_shape(flops.model_shape(name, **TINY), (latent, latent))
  # Every matmul, the T^2 attention terms included, exactly.
  assert 2 * want["total"] == _dot_flops(jaxpr)
  # XLA's own count adds elementwise work (norms, softmax, GELU), a little on top.
  xla = jax.jit(fn).lower(*args).compile().cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  assert 1.0 <= xla["flops"] / (2 * want["total"]) < 1.25


def test_dig_flops_match_jaxpr_outside_the_gla_kernel(monkeypatch):
  """The projections, SwiGLU (down projection included), gate, embedders and final layer:
  the jaxpr with the GLA kernel stubbed out has exactly the analytic matmuls less mixer_core."""
  import kernels_pallas.gla.api as gla_api
  def stub(qkv, g, *, value_dim, **kw):  # o = v: no matmul
    return unpack_qkv(qkv, *g.shape[2:], value_dim)[2], None
  monkeypatch.setattr(gla_api, "chunk_gla_packed", stub)
  name, latent = "DiG-S/2", 16
  model = create_model(name, input_size=latent, in_channels=4, num_classes=10,
                       rngs=nnx.Rngs(0), **TINY)
  _, _, jaxpr = _forward_jaxpr(model, 3, latent)
  parts = flops.forward_flops_shape(flops.model_shape(name, **TINY), (latent, latent))
  matmuls = parts["total"] - parts["mixer_core"] - parts["dwconv"]
  assert 3 * matmuls == _dot_flops(jaxpr)
  # SwiGLU's three matmuls: 2 * T * 3 * D * I per layer (I = 512 for D = 128).
  assert parts["mlp"] == 2 * 2 * 64 * 3 * 128 * 512


def test_gla_core_hand_count():
  """Per head and token: intra-chunk C*(K+V), inter-chunk q@S and k^T v at 2*K*V each; 3x of
  that is perf.md's training floor T * [12 K V + 3 C (K + V)]."""
  t, h, kd, vd, c = 4096, 6, 32, 64, 32
  fwd = flops.gla_core_flops(t, h, kd, vd, c)
  assert fwd == t * h * (32 * 96 + 4 * 32 * 64)
  assert 3 * fwd == h * t * (12 * kd * vd + 3 * c * (kd + vd))
  assert flops.gla_core_flops(16, 1, kd, vd, 64) == 16 * (16 * 96 + 4 * 32 * 64)  # T < C


def test_released_sizes_match_dit_paper():
  """DiT's paper counts multiply-adds: 6.06 G (S/2) and 118.6 G (XL/2) at 256 px."""
  assert flops.forward_flops("DiT-S/2", 256) / 2e9 == pytest.approx(6.06, rel=0.01)
  assert flops.forward_flops("DiT-XL/2", 256) / 2e9 == pytest.approx(118.6, rel=0.01)
  assert flops.train_flops("DiG-S/2", 1024) == 3 * flops.forward_flops("DiG-S/2", 1024)
  # Linear in tokens for DiG, quadratic attention term for DiT.
  dig = [flops.forward_flops("DiG-XL/2", px) for px in (1024, 2048)]
  dit = [flops.forward_flops("DiT-XL/2", px) for px in (1024, 2048)]
  assert dig[1] / dig[0] == pytest.approx(4, rel=0.02)
  assert dit[1] / dit[0] > 6


def test_model_and_resolution_parsing():
  assert bench.expand_models("S/2,DiG-XL/2") == ["DiG-S/2", "DiT-S/2", "DiG-XL/2"]
  with pytest.raises(ValueError, match="unknown model 'Q/2'"):
    bench.expand_models("Q/2")
  with pytest.raises(ValueError, match="resolution 300 px"):
    bench.parse_resolutions("256,300", (2,))
  with pytest.raises(ValueError, match="not an integer"):
    bench.parse_resolutions("256px", (2,))
  assert [bench.default_batch(px, 2) for px in (256, 512, 1024, 1536, 2048)] == [64, 16, 4, 1, 1]


def test_cli_rejects_unknown_model_and_resolution():
  res = run_cli("-m", "dig_jax.bench", "--models", "DiG-Q/2", timeout=120)
  assert res.returncode == 2 and "unknown model" in res.stderr
  res = run_cli("-m", "dig_jax.bench", "--resolutions", "100", timeout=120)
  assert res.returncode == 2 and "resolution 100 px" in res.stderr


def test_cli_end_to_end(tmp_path):
  out, png = tmp_path / "rows.json", tmp_path / "plot.png"
  res = run_cli("-m", "dig_jax.bench", "--models", "DiG-S/8,DiT-S/8", "--resolutions", "64",
                "--steps", "2", "--warmup", "1", "--depth", "1", "--hidden_size", "64",
                "--batch", "2", "--matmul_size", "256", "--json", str(out), "--plot", str(png),
                "--interleave", "2",
                timeout=300)  # default mode: one subprocess per configuration
  assert res.returncode == 0, res.stdout + res.stderr
  data = json.loads(out.read_text())
  rows = {(r["model"], r["impl"]): r for r in data["rows"]}
  assert set(rows) == {("DiG-S/8", "reference"), ("DiT-S/8", "cudnn"), ("DiT-S/8", "xla")}
  assert rows[("DiT-S/8", "cudnn")]["status"] == "skipped"  # no GPU here
  for key in (("DiG-S/8", "reference"), ("DiT-S/8", "xla")):
    r = rows[key]
    assert r["status"] == "ok", r
    for k in ("images_per_s", "step_ms", "peak_gib", "train_gflops_per_image", "mfu",
              "matmul_tflops", "achieved_tflops", "batch", "px", "tokens", "device"):
      assert k in r, k
    assert r["images_per_s"] > 0 and 0 < r["mfu"] and np.isfinite(r["loss"])
    assert r["train_gflops_per_image"] == pytest.approx(
        3 * flops.forward_flops(key[0], 64, depth=1, hidden_size=64, num_heads=1,
                                gla_chunk=r.get("gla_chunk", 32)) / 1e9)
  assert rows[("DiG-S/8", "reference")]["dig_speed_vs_dit_xla"] > 0
  # --interleave: both measured rows timed again side by side in one more worker process
  dig, dit = rows[("DiG-S/8", "reference")], rows[("DiT-S/8", "xla")]
  assert dig["interleave_rounds"] == dit["interleave_rounds"] == 2
  assert dig["dig_speed_vs_dit_xla_interleaved"] == pytest.approx(
      dig["images_per_s_interleaved"] / dit["images_per_s_interleaved"])
  assert dit["images_per_s_interleaved"] == pytest.approx(2e3 / dit["step_ms_interleaved"])
  assert "same-process step ms" in res.stdout
  assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
  assert "| DiG-S/8 |" in res.stdout


def test_side_by_side_ratios_and_table():
  """Same-process ratios pair DiG and DiT rows like the separate ones; a configuration that
  failed side by side shows its error and gets no same-process ratio."""
  base = dict(size="S/2", px=256, batch=64, status="ok", step_ms=10.0, achieved_tflops=1.0,
              train_gflops_per_image=1.0)
  dig = dict(base, model="DiG-S/2", family="DiG", impl="pallas_gpu", images_per_s=6400.0,
             images_per_s_interleaved=3200.0, step_ms_interleaved=20.0)
  cudnn = dict(base, model="DiT-S/2", family="DiT", impl="cudnn", images_per_s=3200.0,
               images_per_s_interleaved=4000.0, step_ms_interleaved=16.0)
  xla = dict(base, model="DiT-S/2", family="DiT", impl="xla", images_per_s=1600.0,
             interleave_error="RESOURCE_EXHAUSTED: out of memory")
  rows = [dig, cudnn, xla]
  bench_report.add_ratios(rows)
  assert dig["dig_speed_vs_dit_cudnn"] == 2.0 and dig["dig_speed_vs_dit_cudnn_interleaved"] == 0.8
  assert dig["dig_speed_vs_dit_xla"] == 4.0 and "dig_speed_vs_dit_xla_interleaved" not in dig
  text = bench_report.table(rows)
  assert "| 2.00x [0.80x], 4.00x |" in text
  assert "RESOURCE_EXHAUSTED" in text and "| 20.0 |" in text
  assert "*" not in text  # no peak given as the process's so far
  cudnn.update(peak_gib=3.5, peak_cumulative=True)
  dig.update(peak_gib=2.25)
  text = bench_report.table(rows)
  assert "| 2.25 |" in text and "| 3.50* |" in text and "peak of the whole process" in text


def test_resume_keeps_measured_rows_and_adds_missing_ones(tmp_path):
  out = str(tmp_path / "rows.json")
  tiny = ["--resolutions", "64", "--steps", "1", "--warmup", "0", "--depth", "1",
          "--hidden_size", "64", "--batch", "2", "--matmul_size", "128", "--in_process",
          "--dit_attention", "xla", "--json", out]
  first = bench.main(["--models", "DiG-S/8", *tiny])
  second = bench.main(["--models", "DiG-S/8,DiT-S/8", "--resume", *tiny])
  assert [(r["model"], r["status"]) for r in second] == [("DiG-S/8", "ok"), ("DiT-S/8", "ok")]
  assert second[0]["step_ms"] == first[0]["step_ms"]  # kept, not measured again
  with open(out) as fh:
    assert len(json.load(fh)["rows"]) == 2
  with pytest.raises(SystemExit):  # --resume without --json
    bench.main(["--models", "DiG-S/8", "--resume", *tiny[:-2]])


def test_sample_mode_times_the_guided_sampler_step(tmp_path):
  """--mode sample: rows report one guided denoising step and images/s at --sample_steps steps;
  the timed step is the sampler's (at the last index it returns the guided posterior mean), and
  guidance doubles the FLOPs of a step."""
  from dig_jax.diffusion import cfg_model_fn, create_schedule
  from dig_jax.diffusion.gaussian import p_mean_variance

  out = tmp_path / "rows.json"
  tiny = ["--resolutions", "64", "--steps", "2", "--warmup", "0", "--depth", "1",
          "--hidden_size", "64", "--batch", "2", "--matmul_size", "128", "--in_process",
          "--dit_attention", "xla", "--mode", "sample", "--sample_steps", "50"]
  rows = bench.main(["--models", "DiG-S/8,DiT-S/8", *tiny, "--json", str(out)])
  assert [(r["model"], r["status"], r["mode"]) for r in rows] == [
      ("DiG-S/8", "ok", "sample"), ("DiT-S/8", "ok", "sample")]
  for r in rows:
    assert r["images_per_s"] == pytest.approx(2 / (50 * r["step_ms"] / 1e3))
    fwd = flops.forward_flops(r["model"], 64, depth=1, hidden_size=64, num_heads=1,
                              gla_chunk=r.get("gla_chunk", 32))
    assert r["step_gflops_per_image"] == pytest.approx(2 * fwd / 1e9)
    assert np.isfinite(r["x_rms"]) and r["x_rms"] > 0
  assert "denoising step ms" in bench_report.table(rows) and "img/s (50 steps)" in bench_report.table(rows)
  unguided = bench.main(["--models", "DiT-S/8", *tiny, "--cfg_scale", "1"])
  assert unguided[0]["step_gflops_per_image"] == pytest.approx(
      rows[1]["step_gflops_per_image"] / 2)

  config = dict(model="DiT-S/8", px=64, batch=2, impl="xla", dtype="float32", depth=1,
                hidden_size=64, sample_steps=2, cfg_scale=1.5)
  step, init_state, _, _ = bench._build_sampler(config)
  state = init_state()
  x = np.asarray(state["x"])
  inputs = bench._sample_inputs(2, 2)[1]
  assert int(inputs["t"]) == 0  # the last step: the posterior mean, no noise added
  # Random weights: at its adaLN-Zero start the network outputs zeros whatever the label.
  leaves, treedef = jax.tree.flatten(state["params"])
  keys = jax.random.split(jax.random.key(5), len(leaves))
  params = jax.tree.unflatten(treedef, [0.2 * jax.random.normal(key, leaf.shape, leaf.dtype)
                                        for key, leaf in zip(keys, leaves)])
  state = {"params": jax.tree.map(jnp.copy, params), "x": state["x"]}
  graphdef, _ = nnx.split(bench._create_model(config)[0])
  model = nnx.merge(graphdef, params)
  schedule = create_schedule(1000, 2)
  t_model = schedule.timestep_map[jnp.zeros((2,), jnp.int32)]

  def mean(cfg_scale):
    out = cfg_model_fn(model, inputs["label"], bench.NUM_CLASSES, cfg_scale)(x, t_model)
    return np.asarray(p_mean_variance(schedule, out, x, jnp.zeros((2,), jnp.int32),
                                      learn_sigma=True)["mean"])

  got, _ = step(state, inputs)
  np.testing.assert_allclose(np.asarray(got["x"]), mean(1.5), rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(mean(1.0) - mean(1.5))) > 1e-3  # so the check above sees the guidance
  for bad in (["--find_max_batch"], ["--sample_steps", "1"], ["--cfg_scale", "0.5"]):
    with pytest.raises(SystemExit):
      bench.main(["--models", "DiT-S/8", *tiny, *bad])


def test_max_batch_search_stops_at_first_oom():
  tried = []

  def fits(step, init_state, batch, latent):
    tried.append(batch)
    return batch <= 37

  orig, bench._fits = bench._fits, fits
  try:
    best, capped = bench.find_max_batch(None, None, 4, 8, limit=4096, progress=lambda s: None)
  finally:
    bench._fits = orig
  assert not capped and 33 <= best <= 37 and tried[:5] == [4, 8, 16, 32, 64]


def test_bench_imports_no_data_pipeline():
  code = ("import sys, dig_jax.bench, dig_jax.flops, dig_jax.train.step; "
          "bad = [m for m in ('grain', 'ml_collections', 'tensorflow_datasets', 'orbax', "
          "'dig_jax.train.loop', 'dig_jax.data') if m in sys.modules]; print(bad); "
          "sys.exit(1 if bad else 0)")
  res = run_cli("-c", code, timeout=120)
  assert res.returncode == 0, res.stdout + res.stderr


def test_kernel_bench_variants_set_and_restore_gpu_settings():
  """`kernels_pallas.bench --variants`: letters map to pallas_gpu settings, in force only while
  the variant is traced; bad names are refused with the letters it knows."""
  from kernels_pallas import bench as kbench
  from kernels_pallas.gla import pallas_gpu
  label, _, settings = kbench._variant_fn("C64D8L2B8")
  assert label == "pallas_gpu C64D8L2B8"
  assert settings == {"CHUNK": 64, "DIAG": 8, "BLOCK_CHUNKS": 2, "NUM_WARPS": {"gla_bwd": 8}}
  before = (pallas_gpu.CHUNK, pallas_gpu.DIAG, pallas_gpu.NUM_WARPS)
  with module_settings(pallas_gpu, settings):
    assert (pallas_gpu.CHUNK, pallas_gpu.DIAG, pallas_gpu.BLOCK_CHUNKS) == (64, 8, 2)
  assert (pallas_gpu.CHUNK, pallas_gpu.DIAG, pallas_gpu.NUM_WARPS) == before
  assert pallas_gpu.BLOCK_CHUNKS is None
  assert kbench._variant_fn("N3S0")[2] == {"NUM_STAGES": 3, "RECOMPUTE_STATES": 0}
  assert kbench._variant_fn("T512")[2] == {"V_TILE_PROGRAMS": 512}
  assert kbench._variant_fn("R168Q128")[2] == {"MAX_REGISTERS": {"gla_bwd": 168,
                                                                 "gla_fwd": 128}}
  stages = kbench._variant_fn("P2")[2]["NUM_STAGES"]
  others = {k: v for k, v in stages.items() if k not in ("gla_fwd", "gla_fwd_states")}
  assert (stages["gla_fwd"], stages["gla_fwd_states"]) == (2, 2) and 2 not in others.values()
  assert kbench._variant_fn("N1P3")[2]["NUM_STAGES"] == {"default": 1, "gla_fwd": 3,
                                                         "gla_fwd_states": 3}
  for bad in ("X3", "C", "C32x"):
    with pytest.raises(ValueError, match="expected letters"):
      kbench._variant_fn(bad)
  with pytest.raises(RuntimeError):  # restored when the block raises too
    with module_settings(pallas_gpu, {"CHUNK": 64}):
      raise RuntimeError
  assert pallas_gpu.CHUNK == before[0]
  with pytest.raises(AttributeError, match="NUM_WRAPS"):  # a misspelt setting is refused
    with module_settings(pallas_gpu, {"NUM_WRAPS": 8}):
      pass


def test_several_batches_give_rows_and_ratios_per_batch(tmp_path):
  """--batch 2,3: every model at each batch, DiG/DiT ratios paired by batch, one plot line per
  model and batch; a bad batch is named in the error."""
  png = tmp_path / "batches.png"
  tiny = ["--resolutions", "64", "--steps", "1", "--warmup", "0", "--depth", "1",
          "--hidden_size", "64", "--matmul_size", "128", "--in_process", "--dit_attention", "xla"]
  rows = bench.main(["--models", "DiG-S/8,DiT-S/8", "--batch", "2,3", "--plot", str(png), *tiny])
  assert [(r["model"], r["batch"], r["status"]) for r in rows] == [
      ("DiG-S/8", 2, "ok"), ("DiT-S/8", 2, "ok"), ("DiG-S/8", 3, "ok"), ("DiT-S/8", 3, "ok")]
  for dig, dit in ((rows[0], rows[1]), (rows[2], rows[3])):
    assert dig["dig_speed_vs_dit_xla"] == pytest.approx(dig["images_per_s"] / dit["images_per_s"])
  assert png.stat().st_size > 0
  for bad in ("0", "2,x", "-1"):
    with pytest.raises(SystemExit):
      bench.main(["--models", "DiG-S/8", "--batch", bad, *tiny])
  assert bench.parse_batches("") == [] and bench.parse_batches(" 4, 8 ") == [4, 8]

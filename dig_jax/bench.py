"""Model throughput benchmark: `python -m dig_jax.bench [--models S/2,XL/2] [--resolutions ...]`.

Times a full training step (forward, diffusion loss, backward, AdamW, EMA: the project's
`make_train_step`) of DiG and of DiT at the same size, DiT both with cuDNN attention
(`attention_impl="cudnn"`) and with XLA's materialised attention (`"xla"`), on random latents
(4 channels, latent = px / 8), bf16 compute (`dtype` override) with fp32 params.
Per configuration it reports images/s (median step time after warm-up, steps run back to back
in groups of STEPS_PER_SYNC as the training loop runs them), peak device memory
(`peak_bytes_in_use`; OOM is caught and reported), optionally the largest batch that fits,
analytic model FLOPs per image (`dig_jax.flops`, training = 3x forward), achieved TFLOP/s and
MFU against a dense bf16 matmul rate measured in the same run, and DiG/DiT ratios.

`--mode sample` times sampling instead: one classifier-free-guided DDPM denoising step (the
model on the conditional and unconditional halves in one batched call, then the ancestral
update: what `sample.py` runs `--sample_steps` times per image), reported as milliseconds per
denoising step and images/s at `--sample_steps` steps, with the same memory, FLOP and MFU columns
(FLOPs per image and step: the forward, twice with guidance).

By default every configuration runs in its own subprocess, so that its peak memory is its own
and an OOM or a crash cannot disturb the next one (`--in_process` runs them all in this process;
then peaks are cumulative). Separate processes of the same code can differ by 10 % or more in
step time (small steps: the gaps between ~1,000 kernels); `--interleave R` then also times each
resolution's (and batch's) configurations side by side in one process, in R rounds that alternate between
them, and reports those step times and DiG/DiT ratios too. Does not import the data pipeline
(grain, tfds, ml_collections).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import types

from dig_jax.bench_report import (DIT_ATTENTION, add_ratios, fmt, gflops_per_image, mode,
                                  peak_cell, plot, table)

RESOLUTIONS = (256, 512, 1024, 1536, 1792, 2048)
DEFAULT_MODELS = ("S/2", "XL/2")
LATENT_CHANNELS = 4
NUM_CLASSES = 1000
TOKENS_PER_BATCH = 16384  # default batch: 64 images at 256 px (S/2), 1 at >= 1536 px
MAX_DEFAULT_BATCH = 64
STEPS_PER_SYNC = 5  # steps run back to back between syncs when timing (see _time_steps)
RESULT_TAG = "BENCH_RESULT "


# --------------------------------------------------------------------------------------------
# Configurations


def _model_names():
  from dig_jax.models.registry import MODEL_NAMES, PATCHES, SIZES
  return MODEL_NAMES, PATCHES, SIZES


def expand_models(spec: str) -> list[str]:
  """'S/2,DiG-B/4' -> ['DiG-S/2', 'DiT-S/2', 'DiG-B/4']: a bare size means both families."""
  names, _, _ = _model_names()
  out = []
  for item in (x.strip() for x in spec.split(",")):
    if not item:
      continue
    full = [item] if "-" in item else [f"DiG-{item}", f"DiT-{item}"]
    for name in full:
      if name not in names:
        sizes = sorted({n.split("-")[1] for n in names}, key=lambda s: (s[-1], s))
        raise ValueError(f"unknown model {item!r}; expected a size ({', '.join(sizes)}) for "
                         f"both families, or a full name such as DiG-S/2 or DiT-XL/2")
      if name not in out:
        out.append(name)
  if not out:
    raise ValueError("no models given")
  return out


def parse_resolutions(spec: str, patches) -> list[int]:
  out = []
  for item in (x.strip() for x in spec.split(",")):
    if not item:
      continue
    try:
      px = int(item)
    except ValueError:
      raise ValueError(f"resolution {item!r} is not an integer number of pixels") from None
    need = 8 * max(patches)
    if px <= 0 or px % need:
      raise ValueError(f"resolution {px} px: must be a positive multiple of {need} (latent = "
                       f"px / 8, divisible by the patch size {max(patches)}); the defaults are "
                       f"{', '.join(map(str, RESOLUTIONS))}")
    out.append(px)
  if not out:
    raise ValueError("no resolutions given")
  return out


def parse_batches(spec: str) -> list[int]:
  """"" -> [] (the default batch per resolution); "1,2,4" -> [1, 2, 4]."""
  out = []
  for item in filter(None, (x.strip() for x in spec.split(","))):
    if not item.isdigit() or int(item) < 1:
      raise ValueError(f"--batch: {item!r} is not a whole number of images >= 1 (give one "
                       f"batch, or several as 1,2,4)")
    out.append(int(item))
  return out


def default_batch(px: int, patch: int) -> int:
  tokens = (px // 8 // patch) ** 2
  return max(1, min(MAX_DEFAULT_BATCH, TOKENS_PER_BATCH // tokens))


def make_configs(args) -> list[dict]:
  models = expand_models(args.models)
  patches = sorted({int(m.split("/")[1]) for m in models})
  resolutions = parse_resolutions(args.resolutions, patches)
  attentions = [a.strip() for a in args.dit_attention.split(",") if a.strip()]
  bad = set(attentions) - set(DIT_ATTENTION)
  if bad or not attentions:
    raise ValueError(f"--dit_attention: unknown {sorted(bad)}; expected some of {DIT_ATTENTION}")
  batches = parse_batches(args.batch)
  configs = []
  for px in resolutions:
    for batch, name in ((b, n) for b in batches or [0] for n in models):
      patch = int(name.split("/")[1])
      batch = batch or default_batch(px, patch)
      impls = [args.gla_backend] if name.startswith("DiG") else attentions
      for impl in impls:
        extra = {"elementwise_backend": args.elementwise_backend}
        if name.startswith("DiG"):
          extra["conv_backend"] = args.conv_backend
        if args.mode == "sample":
          extra.update(sample_steps=args.sample_steps, cfg_scale=args.cfg_scale)
        configs.append(dict(model=name, px=px, batch=batch, impl=impl, steps=args.steps,
                            mode=args.mode, **extra, optimizer_layout=args.optimizer_layout,
                            warmup=args.warmup, depth=args.depth, hidden_size=args.hidden_size,
                            dtype=args.dtype, remat=args.remat, find_max_batch=args.find_max_batch,
                            max_batch_limit=args.max_batch_limit))
  return configs


# --------------------------------------------------------------------------------------------
# Measurements (these import JAX; the parent process of an isolated run never does)


def is_oom(err: BaseException) -> bool:
  text = f"{type(err).__name__} {err}".lower()
  return any(s in text for s in ("resource_exhausted", "out of memory", "resourceexhausted",
                                 "oom when allocating", "failed to allocate"))


def _peak_bytes():
  import jax
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:
    return None
  return None if not stats else stats.get("peak_bytes_in_use")


def device_info() -> dict:
  import jax
  dev = jax.devices()[0]
  return dict(platform=dev.platform, device=dev.device_kind, jax=jax.__version__)


def matmul_tflops(size: int = 0, runs: int = 20, warmup_s: float = 1.0) -> float:
  """Dense bf16 matmul rate (TFLOP/s) of the default device: products of two random size x size
  matrices, timed as the steps are (groups of STEPS_PER_SYNC back to back, one sync per group;
  median of `runs` groups) after `warmup_s` seconds of them, so that the clocks have settled
  as they have during a step's timing. size 0: 8192, or 1024 on a CPU."""
  import jax
  import jax.numpy as jnp
  size = size or (1024 if jax.default_backend() == "cpu" else 8192)
  keys = jax.random.split(jax.random.key(0), 4)
  sets = [(jax.random.normal(keys[2 * i], (size, size), jnp.bfloat16),
           jax.random.normal(keys[2 * i + 1], (size, size), jnp.bfloat16)) for i in range(2)]
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))

  def group():
    start = time.perf_counter()
    for i in range(STEPS_PER_SYNC):
      out = f(*sets[i % 2])
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / STEPS_PER_SYNC

  group()  # compiles
  end = time.perf_counter() + warmup_s
  while time.perf_counter() < end:
    group()
  return 2 * size ** 3 / statistics.median(group() for _ in range(runs)) / 1e12


def _create_model(config):
  """(model, parameter count, latent size) of a configuration: bf16 compute, fp32 params."""
  import jax.numpy as jnp
  from flax import nnx

  from dig_jax.models import count_parameters, create_model

  name, px = config["model"], config["px"]
  overrides = dict(dtype=jnp.dtype(config["dtype"]), remat=config.get("remat", "none"))
  if config.get("depth"):
    overrides["depth"] = config["depth"]
  if config.get("hidden_size"):
    overrides["hidden_size"] = config["hidden_size"]
    overrides["num_heads"] = max(1, config["hidden_size"] // 64)
  if name.startswith("DiG"):
    overrides["gla_backend"] = config["impl"]
    overrides["conv_backend"] = config.get("conv_backend", "auto")
  else:
    overrides["attention_impl"] = config["impl"]
  overrides["elementwise_backend"] = config.get("elementwise_backend", "auto")
  latent = px // 8
  model = create_model(name, input_size=latent, in_channels=LATENT_CHANNELS,
                       num_classes=NUM_CLASSES, learn_sigma=True, rngs=nnx.Rngs(0), **overrides)
  return model, count_parameters(model), latent


def _build(config):
  """The training step and its initial state: (step(state, batch), init_state, params, latent)."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from dig_jax.diffusion import create_schedule
  from dig_jax.train.layout import StateLayout, flat_below
  from dig_jax.train.step import make_train_step

  model, params_count, latent = _create_model(config)
  graphdef, params = nnx.split(model, nnx.Param)
  del model
  layout = StateLayout(params, flat_below(config.get("optimizer_layout", "auto")))
  tx = optax.adamw(1e-4, weight_decay=0.0)  # the paper's recipe
  train_config = types.SimpleNamespace(ema_decay=0.9999, label_dropout=0.1)
  step = make_train_step(graphdef, layout, tx, create_schedule(1000), train_config,
                         null_class=NUM_CLASSES, learn_sigma=True, base_key=jax.random.key(1))

  def init_state():  # the trainer's running form (small arrays as one vector)
    return layout.running({"step": jnp.zeros((), jnp.int32), "params": params,
                           "ema_params": jax.tree.map(jnp.copy, params),
                           "opt_state": tx.init(params)})

  return jax.jit(step, donate_argnums=0), init_state, params_count, latent


def step_flop_fields(config, fwd: float) -> dict:
  """A row's mode fields and FLOPs per image (GFLOP) from the forward's FLOPs per image: a
  training step is 3 forwards; a denoising step one, or two with guidance (both halves)."""
  if config.get("mode", "train") == "sample":
    passes = 1 if config["cfg_scale"] == 1.0 else 2
    return dict(mode="sample", sample_steps=config["sample_steps"],
                cfg_scale=config["cfg_scale"], fwd_gflops_per_image=fwd / 1e9,
                step_gflops_per_image=passes * fwd / 1e9)
  return dict(mode="train", fwd_gflops_per_image=fwd / 1e9, train_gflops_per_image=3 * fwd / 1e9)


def _build_sampler(config):
  """One guided DDPM denoising step as sample.py runs it, in the training step's form:
  step({"params", "x"}, {"label", "t"}) -> (state with the next x, metrics)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from dig_jax.diffusion import cfg_model_fn, create_schedule
  from dig_jax.diffusion.samplers import ddpm_step

  model, params_count, latent = _create_model(config)
  graphdef, params = nnx.split(model)
  del model
  schedule = create_schedule(1000, config["sample_steps"])

  def step(state, inputs):
    net = nnx.merge(graphdef, state["params"])
    model_fn = cfg_model_fn(net, inputs["label"], NUM_CLASSES, config["cfg_scale"])
    t, x = inputs["t"], state["x"]
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(3), t), x.shape, x.dtype)
    x = ddpm_step(model_fn, schedule, x, t, noise, learn_sigma=True)
    return {"params": state["params"], "x": x}, {"x_rms": jnp.sqrt(jnp.mean(x * x))}

  def init_state():
    shape = (config["batch"], latent, latent, LATENT_CHANNELS)
    return {"params": params, "x": jax.random.normal(jax.random.key(2), shape, jnp.float32)}

  return jax.jit(step, donate_argnums=0), init_state, params_count, latent


def _sample_inputs(batch, sample_steps, count=2):
  """Labels and schedule indices for denoising steps (every index costs the same)."""
  import jax
  import jax.numpy as jnp
  return [{"label": jax.random.randint(jax.random.key(200 + i), (batch,), 0, NUM_CLASSES),
           "t": jnp.int32(max(0, sample_steps - 1 - i))} for i in range(count)]


def _batches(batch, latent, count=2):
  import jax
  import jax.numpy as jnp
  out = []
  for i in range(count):
    k1, k2 = jax.random.split(jax.random.key(100 + i))
    out.append({"image": jax.random.normal(k1, (batch, latent, latent, LATENT_CHANNELS),
                                           jnp.float32),
                "label": jax.random.randint(k2, (batch,), 0, NUM_CLASSES)})
  return out


def _time_steps(step, state, batches, steps, warmup, per_sync=STEPS_PER_SYNC):
  """Per-step seconds of `steps` steps, timed in groups of `per_sync` steps run back to back
  with one sync per group, as the training loop runs them (it syncs only to log): a sync after
  every step would add the host's dispatch time to each step."""
  import jax
  for i in range(warmup):
    state, metrics = step(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
  times = []
  for first in range(0, steps, per_sync):
    group = range(first, min(first + per_sync, steps))
    start = time.perf_counter()
    for i in group:
      state, metrics = step(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - start) / len(group))
  return state, metrics, times


def _fits(step, init_state, batch, latent) -> bool:
  """One compile and two steps at `batch`; False on OOM."""
  import jax
  state = None
  try:
    state = init_state()
    for b in _batches(batch, latent, count=2):
      state, metrics = step(state, b)
    jax.block_until_ready((state, metrics))
    return True
  except Exception as e:  # noqa: BLE001
    if is_oom(e):
      return False
    raise
  finally:
    del state


def find_max_batch(step, init_state, start: int, latent: int, limit: int,
                   progress=print) -> tuple[int, bool]:
  """Largest batch that runs (doubling from `start`, then bisection); (batch, hit_limit)."""
  lo, hi = 0, None
  b = start
  while b <= limit:
    ok = _fits(step, init_state, b, latent)
    progress(f"    max-batch search: batch {b} {'fits' if ok else 'OOM'}")
    if not ok:
      hi = b
      break
    lo, b = b, b * 2
  if hi is None:
    return lo, True
  while hi - lo > max(1, lo // 8):  # to within 1/8
    mid = (lo + hi) // 2
    ok = _fits(step, init_state, mid, latent)
    progress(f"    max-batch search: batch {mid} {'fits' if ok else 'OOM'}")
    lo, hi = (mid, hi) if ok else (lo, mid)
  return lo, False


def _compiled_step(config):
  """(compiled step, initial state, input batches, parameter count) of a configuration."""
  sampling = mode(config) == "sample"
  step, init_state, params_count, latent = (_build_sampler if sampling else _build)(config)
  state = init_state()
  batches = (_sample_inputs(config["batch"], config["sample_steps"]) if sampling
             else _batches(config["batch"], latent))
  return step.lower(state, batches[0]).compile(), state, batches, params_count


def run_config(config, progress=print) -> dict:
  """Times one configuration in this process; returns its row (status ok / OOM / error)."""
  import jax

  from dig_jax import flops
  from kernels_pallas.gla import api as gla_api
  from kernels_pallas.gla import pallas_gpu, pallas_tpu, reference

  name, px, batch = config["model"], config["px"], config["batch"]
  family = name.split("-")[0]
  row = dict(model=name, family=family, size=name.split("-")[1], px=px, latent=px // 8,
             tokens=(px // 8 // int(name.split("/")[1])) ** 2, batch=batch,
             impl=config["impl"], dtype=config["dtype"], steps=config["steps"],
             warmup=config["warmup"], depth=config.get("depth"),
             hidden_size=config.get("hidden_size"),
             optimizer_layout=config.get("optimizer_layout", "auto"), **device_info())
  shape_overrides = {k: config[k] for k in ("depth", "hidden_size") if config.get(k)}
  if config.get("hidden_size"):
    shape_overrides["num_heads"] = max(1, config["hidden_size"] // 64)
  chunk = flops.DEFAULT_GLA_CHUNK
  if family == "DiG":
    backend = gla_api.resolve_backend(config["impl"], jax.numpy.zeros(()))
    chunk = {"pallas_gpu": pallas_gpu.CHUNK, "pallas_tpu": pallas_tpu.CHUNK,
             "reference": reference.CHUNK}.get(backend, chunk)
    row.update(impl=backend, gla_chunk=chunk, conv_backend=config.get("conv_backend", "auto"))
  row.update(elementwise_backend=config.get("elementwise_backend", "auto"))
  fwd = flops.forward_flops(name, px, gla_chunk=chunk, **shape_overrides)
  row.update(step_flop_fields(config, fwd))
  sampling = row["mode"] == "sample"
  step_flops = gflops_per_image(row) * 1e9 * batch
  if family == "DiT" and config["impl"] == "cudnn" and row["platform"] != "gpu":
    row.update(status="skipped", error="cuDNN attention needs a GPU")
    return row
  state = None
  try:
    t0 = time.perf_counter()
    compiled, state, batches, params_count = _compiled_step(config)
    row["params_m"] = params_count / 1e6
    row["compile_s"] = time.perf_counter() - t0
    state, metrics, times = _time_steps(compiled, state, batches, config["steps"],
                                        config["warmup"])
    med = statistics.median(times)
    per_image = config["sample_steps"] if sampling else 1  # steps that make one image
    row.update(status="ok", step_ms=med * 1e3, step_ms_min=min(times) * 1e3,
               step_ms_max=max(times) * 1e3, images_per_s=batch / med / per_image,
               achieved_tflops=step_flops / med / 1e12)
    value_name = "x_rms" if sampling else "loss"
    row[value_name] = float(metrics[value_name])
    if not math.isfinite(row[value_name]):
      row["warning"] = f"non-finite {value_name}"
    peak = _peak_bytes()
    row.update(peak_bytes=peak, peak_gib=None if peak is None else peak / 2**30)
  except Exception as e:  # noqa: BLE001 -- one failing configuration is a result too
    row.update(status="OOM" if is_oom(e) else "error", error=f"{type(e).__name__}: "
               f"{str(e).splitlines()[0] if str(e) else ''}"[:400])
    peak = _peak_bytes()
    row.update(peak_bytes=peak, peak_gib=None if peak is None else peak / 2**30)
  finally:
    del state
  if config.get("find_max_batch") and row["status"] in ("ok", "OOM"):
    try:
      step, init_state, _, latent = _build(config)
      start = batch if row["status"] == "ok" else 1
      if row["status"] == "OOM" and not _fits(step, init_state, 1, latent):
        row.update(max_batch=0)
      else:
        best, capped = find_max_batch(step, init_state, start, latent,
                                      config.get("max_batch_limit", 4096), progress)
        row.update(max_batch=best, max_batch_capped=capped)
    except Exception as e:  # noqa: BLE001
      row["max_batch_error"] = f"{type(e).__name__}: {str(e)[:200]}"
  return row


def run_interleaved(configs, rounds: int, progress=print) -> list[dict]:
  """Times configurations side by side in this process: each is compiled and warmed up, then
  in each of `rounds` rounds every one runs its timed steps in turn, so that all see the same
  process, clocks and neighbours. Returns per configuration its median step time over all
  rounds (step_ms_interleaved, images_per_s_interleaved) or interleave_error."""
  arms = []
  for config in configs:
    try:
      compiled, state, batches, _ = _compiled_step(config)
      state, _, _ = _time_steps(compiled, state, batches, 0, config["warmup"])
      arms.append(dict(step=compiled, state=state, batches=batches, times=[]))
    except Exception as e:  # noqa: BLE001 -- e.g. out of memory with the others' states
      arms.append(dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                             [:300]))
    progress(f"    interleave: {config['model']} ({config['impl']}) "
             f"{'ready' if 'step' in arms[-1] else arms[-1]['error']}")
  for _ in range(rounds):
    for arm, config in zip(arms, configs):
      if "step" in arm:
        arm["state"], _, times = _time_steps(arm["step"], arm["state"], arm["batches"],
                                             config["steps"], 0)
        arm["times"] += times
  results = []
  for arm, config in zip(arms, configs):
    if "step" not in arm:
      results.append(dict(interleave_error=arm["error"]))
      continue
    med = statistics.median(arm["times"])
    per_image = config["sample_steps"] if mode(config) == "sample" else 1
    results.append(dict(step_ms_interleaved=med * 1e3, interleave_rounds=rounds,
                        images_per_s_interleaved=config["batch"] / med / per_image))
  return results


# --------------------------------------------------------------------------------------------
# Orchestration


def _run_isolated(payload: dict, timeout: float) -> dict:
  """Runs `python -m dig_jax.bench --worker JSON` and returns the row it prints."""
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  env.setdefault("PYTHONUNBUFFERED", "1")
  cmd = [sys.executable, "-m", "dig_jax.bench", "--worker", json.dumps(payload)]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  try:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout,
                          env=env)
  except subprocess.TimeoutExpired:
    return dict(status="error", error=f"timed out after {timeout:.0f} s")
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT_TAG):
      return json.loads(line[len(RESULT_TAG):])
    print(line, flush=True)
  return dict(status="error", error=f"worker exited with code {proc.returncode} and no result "
              "(crash or killed; out of host memory?)")


def _worker(payload_json: str):
  payload = json.loads(payload_json)
  if payload.get("kind") == "matmul":
    result = dict(matmul_tflops=matmul_tflops(payload["size"], payload["runs"]),
                  **device_info())
  elif payload.get("kind") == "interleave":
    result = dict(results=run_interleaved(
        payload["configs"], payload["rounds"],
        progress=lambda s: print(s, file=sys.stderr, flush=True)))
  else:
    result = run_config(payload, progress=lambda s: print(s, file=sys.stderr, flush=True))
  print(RESULT_TAG + json.dumps(result), flush=True)


def _row_key(row: dict) -> tuple:
  """What --resume matches on; a DiG row counts whatever GLA backend "auto" resolved to."""
  impl = row["impl"] if row["model"].startswith("DiT") else "gla"
  layout = row.get("optimizer_layout", "per_leaf") if mode(row) == "train" else None
  return (row["model"], impl, row.get("conv_backend", "auto"),
          row.get("elementwise_backend", "auto"), row["px"], row["batch"],
          row.get("remat", "none"), mode(row), row.get("sample_steps"), row.get("cfg_scale"),
          layout)  # rows from before the option were per-leaf


def previous_rows(path: str) -> list[dict]:
  """The finished rows (measured, or out of memory) of an earlier run's --json file."""
  if not os.path.exists(path):
    return []
  with open(path) as fh:
    rows = json.load(fh)["rows"]
  return [r for r in rows if r.get("status") in ("ok", "OOM")]


def _write_json(args, info, rows):
  with open(args.json, "w") as fh:
    json.dump({"settings": {k: v for k, v in vars(args).items() if k != "worker"},
               "device": info, "rows": rows}, fh, indent=1)


def _interleave(args, measured, say):
  """Adds same-process step times to the rows measured fine alone: one process per resolution
  and batch (and mode) runs those configurations side by side (`run_interleaved`)."""
  groups = {}
  for row, config in measured:
    if row.get("status") == "ok":
      groups.setdefault((config["px"], config["batch"], mode(config)), []).append((row, config))
  for (px, batch, _), members in groups.items():
    say(f"side by side: {px} px, batch {batch}, {len(members)} configurations x "
        f"{args.interleave} rounds ...")
    configs = [c for _, c in members]
    if args.in_process:
      results = run_interleaved(configs, args.interleave)
    else:
      payload = dict(kind="interleave", configs=configs, rounds=args.interleave)
      out = _run_isolated(payload, args.timeout * len(members))
      results = out.get("results") or [dict(interleave_error=out.get("error", "no result"))
                                        ] * len(members)
    for (row, _), result in zip(members, results):
      row.update(result)


def build_parser():
  doc = __doc__.split("\n\n")
  parser = argparse.ArgumentParser(
      prog="python -m dig_jax.bench", description="\n\n".join(doc[:3]),
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="examples: python -m dig_jax.bench --models S/2 --resolutions 256,1024 "
             "--steps 20 --json rows.json --plot throughput.png; python -m dig_jax.bench "
             "--mode sample --models XL/2 --resolutions 256,2048 --dit_attention cudnn")
  parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                      help="comma-separated sizes (S/2, B/4, XL/2: DiG and DiT) or full names "
                           "(DiG-S/8, DiT-XL/2); default %(default)s")
  parser.add_argument("--resolutions", default=",".join(map(str, RESOLUTIONS)),
                      help="comma-separated image sizes in px (latent = px / 8); "
                           "default %(default)s")
  parser.add_argument("--batch", default="",
                      help="images per step, or several (1,2,4,8: every resolution at each, "
                           "ratios per batch); default: 16384 tokens' worth, from 1 to 64 "
                           "(64 at 256 px with patch 2, 4 at 1024, 1 from 1536). A model whose "
                           "step does not fill the GPU at the default gains from a larger one "
                           "(BENCHMARKS.md: DiG-S/2 at 1792 px)")
  parser.add_argument("--mode", default="train", choices=("train", "sample"),
                      help="time the training step (train) or a guided denoising step of "
                           "sampling (sample); default %(default)s")
  parser.add_argument("--sample_steps", type=int, default=250,
                      help="--mode sample: denoising steps per image, for images/s "
                           "(sample.py's default, 250)")
  parser.add_argument("--cfg_scale", type=float, default=1.5,
                      help="--mode sample: classifier-free guidance scale; any value above 1 "
                           "runs the model on twice the batch, 1.0 runs it once")
  parser.add_argument("--steps", type=int, default=20, help="timed steps, in groups of "
                      f"{STEPS_PER_SYNC} run back to back (median group mean reported)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
  parser.add_argument("--dit_attention", default=",".join(DIT_ATTENTION),
                      help="DiT attention implementations: cudnn, xla; default %(default)s "
                           "(cudnn rows are skipped off GPU)")
  parser.add_argument("--gla_backend", default="auto",
                      help="DiG's chunk_gla backend (auto, reference, pallas_gpu, pallas_tpu)")
  parser.add_argument("--conv_backend", default="auto",
                      help="DiG's depthwise conv backend (auto, reference, pallas_gpu)")
  parser.add_argument("--elementwise_backend", default="auto",
                      help="backend of the adaLN norm kernels (both models) and of the "
                           "one-pass backward of DiG's SwiGLU and GLA gated output (auto, "
                           "reference, pallas_gpu)")
  parser.add_argument("--optimizer_layout", default="auto", choices=("auto", "flat", "per_leaf"),
                      help="small parameter arrays, their EMA and Adam's moments as one "
                           "vector each (auto, what training uses), all arrays (flat), or "
                           "none (per_leaf)")
  parser.add_argument("--dtype", default="bfloat16", help="compute dtype (params stay fp32)")
  parser.add_argument("--remat", default="none", choices=("none", "full", "dots"),
                      help="what each block keeps for the backward pass: everything (none), its "
                           "input only (full), or its input and matmul outputs (dots); less "
                           "memory for more compute at high resolutions")
  parser.add_argument("--find_max_batch", action="store_true",
                      help="also search the largest batch that fits (doubling, then bisection "
                           "to within 1/8); slow: one compile per try")
  parser.add_argument("--max_batch_limit", type=int, default=4096,
                      help="stop the max-batch search here")
  parser.add_argument("--depth", type=int, default=0, help="override the depth (tests)")
  parser.add_argument("--hidden_size", type=int, default=0,
                      help="override the width (tests); heads = width / 64")
  parser.add_argument("--matmul_size", type=int, default=0,
                      help="n of the n x n x n bf16 matmul that sets the MFU peak; "
                           "default 8192 (1024 on CPU)")
  parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                      help="after the separate runs, also time each resolution's configurations "
                           "side by side in one process, in this many alternating rounds of "
                           "--steps steps; adds same-process step times and DiG/DiT ratios "
                           "(steadier than ratios of separate processes); 0: off")
  parser.add_argument("--in_process", action="store_true",
                      help="run every configuration in this process (peaks become cumulative: "
                           "starred in the table, left out of the plot)")
  parser.add_argument("--timeout", type=float, default=1200,
                      help="seconds per configuration when isolated")
  parser.add_argument("--json", help="write the rows (and the run's settings) to this file")
  parser.add_argument("--resume", action="store_true",
                      help="keep the rows already in --json and measure only the configurations "
                           "it lacks (or that failed there), so a long sweep can be split over "
                           "several runs")
  parser.add_argument("--plot", help="draw throughput and memory against resolution (PNG)")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  return parser


def main(argv=None):
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.worker:
    return _worker(args.worker)
  for flag in ("steps", "warmup", "depth", "hidden_size", "interleave"):
    if getattr(args, flag) < (1 if flag == "steps" else 0):
      parser.error(f"--{flag} must be {'>= 1' if flag == 'steps' else '>= 0'}")
  if not 2 <= args.sample_steps <= 1000:
    parser.error(f"--sample_steps {args.sample_steps}: expected 2 to 1000 (a respacing of the "
                 "1000-step diffusion schedule)")
  if args.cfg_scale < 1.0:
    parser.error(f"--cfg_scale {args.cfg_scale}: expected >= 1.0 (1.0 disables guidance)")
  if args.mode == "sample" and (args.find_max_batch or args.remat != "none"):
    parser.error("--find_max_batch and --remat apply to --mode train only")
  try:
    configs = make_configs(args)
  except ValueError as e:
    parser.error(str(e))
  if args.resume and not args.json:
    parser.error("--resume needs --json FILE (the rows to keep)")
  kept = previous_rows(args.json) if args.resume else []
  done = {_row_key(r) for r in kept}
  configs = [c for c in configs if _row_key(c) not in done]
  if kept:
    print(f"dig_jax.bench: keeping {len(kept)} rows from {args.json}", flush=True)

  say = lambda s: print(s, flush=True)
  say(f"dig_jax.bench: {len(configs)} configurations "
      f"({'in process' if args.in_process else 'one subprocess each'})")
  mm = dict(kind="matmul", size=args.matmul_size, runs=20)
  if args.in_process:
    info = dict(matmul_tflops=matmul_tflops(mm["size"], mm["runs"]), **device_info())
  else:
    info = _run_isolated(mm, args.timeout)
  peak = info.get("matmul_tflops")
  say(f"device: {info.get('device')} ({info.get('platform')}), jax {info.get('jax')}; "
      f"dense bf16 matmul rate: "
      f"{'failed: ' + info.get('error', '') if peak is None else f'{peak:.1f} TFLOP/s'}")

  rows = list(kept)
  measured = []  # (row, config) of this run
  for i, config in enumerate(configs):
    say(f"[{i + 1}/{len(configs)}] {config['model']} ({config['impl']}) {config['px']} px, "
        f"batch {config['batch']} ...")
    start = time.perf_counter()
    if args.in_process:
      row = run_config(config)
    elif config["impl"] == "cudnn" and info.get("platform") not in (None, "gpu"):
      row = dict(status="skipped", error="cuDNN attention needs a GPU")
    else:
      row = _run_isolated(config, args.timeout)
    row = {**dict(model=config["model"], family=config["model"].split("-")[0],
                  size=config["model"].split("-")[1], px=config["px"], batch=config["batch"],
                  impl=config["impl"], remat=config["remat"],
                  optimizer_layout=config["optimizer_layout"]), **row}
    if "fwd_gflops_per_image" not in row:  # a worker that never got as far (crash, timeout)
      from dig_jax import flops
      overrides = {k: config[k] for k in ("depth", "hidden_size") if config.get(k)}
      if config.get("hidden_size"):
        overrides["num_heads"] = max(1, config["hidden_size"] // 64)
      row.update(step_flop_fields(config, flops.forward_flops(config["model"], config["px"],
                                                              **overrides)))
    if row.get("status") == "ok" and peak:
      row["mfu"] = row["achieved_tflops"] / peak
    row["matmul_tflops"] = peak
    if args.in_process and measured and row.get("peak_gib") is not None:
      row["peak_cumulative"] = True  # the process's peak so far, not this configuration's own
    rows.append(row)
    measured.append((row, config))
    if row.get("status") == "ok":
      say(f"    {row['images_per_s']:.2f} img/s, "
          f"{'denoising step' if args.mode == 'sample' else 'step'} {row['step_ms']:.1f} ms, peak "
          f"{peak_cell(row)} GiB, MFU "
          f"{fmt(None if row.get('mfu') is None else 100 * row['mfu'], '.1f')}% "
          f"(compile {row.get('compile_s', 0):.0f} s; {time.perf_counter() - start:.0f} s in all)")
    else:
      say(f"    {row.get('status')}: {row.get('error', '')}")
    if args.json:  # after every configuration, so a killed run keeps what it measured
      add_ratios(rows)
      _write_json(args, info, rows)
  if args.interleave:
    _interleave(args, measured, say)
  add_ratios(rows)
  say("\n" + table(rows))
  if args.json:
    _write_json(args, info, rows)
    say(f"wrote {args.json}")
  if args.plot:
    plot(rows, args.plot)
    say(f"wrote {args.plot}")
  return rows


if __name__ == "__main__":
  main()

"""On the GPU: kernels_pallas/gla/mosaic_gpu_proto.py against the float32 reference and pallas_gpu
(accuracy, then kernel time with Mosaic's CUPTI profiler and batched wall time). Writes
$OUT/mgpu_check.json. `PYTHONPATH=$PWD python scripts/check_mosaic_gpu_proto.py`"""
import json, os, sys, time, traceback
import jax, jax.numpy as jnp, numpy as np
from jax.experimental.mosaic.gpu import profiler
from kernels_pallas.gla import chunk_gla, reference
from kernels_pallas.bench import median_ms
from kernels_pallas.gla import mosaic_gpu_proto as mgpu_fwd

OUT = os.environ.get("OUT", ".")
rows = []
def rec(**kw):
  rows.append(kw); print(json.dumps(kw), flush=True)
  json.dump(rows, open(os.path.join(OUT, "mgpu_check.json"), "w"), indent=1)

def rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))

def inputs(b, t, h, kd, vd, strong=False, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, h, kd), jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, t, h, kd), jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, t, h, vd), jnp.bfloat16)
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h, kd))) * (6.0 if strong else 1 / 16)
  return q, k, v, jnp.maximum(g, -10.0)

import functools
proto = jax.jit(mgpu_fwd.gla_forward)
proto_b = jax.jit(functools.partial(mgpu_fwd.gla_forward, batched=True))
triton = jax.jit(lambda q, k, v, g: chunk_gla(q, k, v, g, output_final_state=True, backend="pallas_gpu"))
ref = jax.jit(lambda q, k, v, g: reference.recurrent_gla(*(x.astype(jnp.float32) for x in (q, k, v, g)), output_final_state=True))
for strong in (False, True):
  try:
    args = inputs(2, 512, 3, 32, 64, strong)
    ro, rs = ref(*args)
    to, ts = triton(*args)
    row = dict(check="strong" if strong else "dig", triton_o=rel(to, ro), triton_state=rel(ts, rs))
    for name, f in (("proto", proto), ("batched", proto_b)):
      try:
        po, ps = f(*args)
        row.update({name + "_o": rel(po, ro), name + "_state": rel(ps, rs)})
      except Exception:
        row[name + "_error"] = traceback.format_exc()[-2500:]
    rec(**row)
  except Exception as e:
    rec(check=strong, error=traceback.format_exc()[-3000:])
for shape in [(64, 256, 6, 32, 64), (64, 256, 18, 32, 64), (8, 1024, 6, 32, 64), (2, 4096, 6, 32, 64)]:
  try:
    args = inputs(*shape)
    row = dict(shape=shape)
    for name, f in (("triton", triton), ("proto", proto), ("batched", proto_b)):
      try:
        row[name + "_kernels_ms"] = profiler.measure(f)(*args)[1]
        row[name + "_ms"] = median_ms(f, [args], 30)
      except Exception:
        row[name + "_error"] = traceback.format_exc()[-1500:]
    rec(**row)
  except Exception as e:
    rec(shape=shape, error=traceback.format_exc()[-3000:])

# backward prototype
mgpu_bwd = mgpu_fwd
fwd_st = jax.jit(functools.partial(mgpu_fwd.gla_forward, batched=True, states=True))
bwd = jax.jit(mgpu_bwd.gla_backward)

def proto_fb(q, k, v, g, do):
  _, _, sts = fwd_st(q, k, v, g)
  return bwd(q, k, v, g, do, sts)

def triton_fb(q, k, v, g, do):
  o, vjp = jax.vjp(lambda q, k, v, g: chunk_gla(q, k, v, g, backend="pallas_gpu")[0], q, k, v, g)
  return vjp(do)

def ref_fb(q, k, v, g, do):
  f = lambda q, k, v, g: reference.recurrent_gla(q, k, v, g)[0]
  o, vjp = jax.vjp(f, *(x.astype(jnp.float32) for x in (q, k, v, g)))
  return vjp(do.astype(jnp.float32))

proto_fb, triton_fb, ref_fb = jax.jit(proto_fb), jax.jit(triton_fb), jax.jit(ref_fb)
for strong in (False, True):
  args = inputs(2, 512, 3, 32, 64, strong)
  do = jax.random.normal(jax.random.key(7), (2, 512, 3, 64), jnp.bfloat16)
  row = dict(check_bwd="strong" if strong else "dig")
  r = ref_fb(*args, do)
  for name, f in (("triton", triton_fb), ("proto", proto_fb)):
    try:
      out = f(*args, do)
      row.update({f"{name}_{n}": rel(a, b) for n, a, b in zip(("dq", "dk", "dv", "dg"), out, r)})
    except Exception:
      row[name + "_error"] = traceback.format_exc()[-2500:]
  rec(**row)
for shape in [(64, 256, 6, 32, 64), (64, 256, 18, 32, 64), (8, 1024, 6, 32, 64)]:
  args = inputs(*shape)
  do = jax.random.normal(jax.random.key(7), shape[:3] + (64,), jnp.bfloat16)
  row = dict(shape_fb=shape)
  for name, f in (("triton", triton_fb), ("proto", proto_fb)):
    try:
      row[name + "_fb_kernels_ms"] = profiler.measure(f)(*args, do)[1]
      row[name + "_fb_ms"] = median_ms(f, [args + (do,)], 30)
    except Exception:
      row[name + "_error"] = traceback.format_exc()[-1500:]
  rec(**row)

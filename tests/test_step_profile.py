"""scripts/step_profile.py's attribution: kernel events named like the fusions of a real
compiled HLO module get the model source line of the op that made them."""
import inspect
import os
import re
import sys

import jax
import jax.numpy as jnp

from kernels_pallas.adaln import reference as adaln

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import step_profile  # noqa: E402


def test_kernel_time_goes_to_the_model_line_of_its_fusion():
  two_norms = jax.jit(lambda a, b: (adaln.layer_norm(a), adaln.layer_norm(b)))
  hlo = two_norms.lower(jnp.ones((4, 8)), jnp.ones((3, 16))).compile().as_text()
  fusions = re.findall(r"^\s*(?:ROOT )?%?([\w.\-]*fusion[\w.\-]*) = ", hlo, re.M)
  assert any("." in f for f in fusions), fusions  # numbered: "x_fusion.1"
  # Kernel names as a GPU trace spells them ("fusion.3" -> "fusion_3"), 2 steps, plus a
  # library kernel that is no HLO op of the model.
  events = [{"name": f.replace(".", "_"), "dur": 10.0 * (i + 1)} for i, f in enumerate(fusions)]
  events.append({"name": "sm90_xmma_gemm_bf16", "dur": 7.0})
  lines, ops, kernels, info = step_profile.attribute(events, hlo, steps=2)

  source, first = inspect.getsourcelines(adaln.layer_norm)
  model_lines = {k for k in lines if k.startswith("reference.py:")}
  assert model_lines and all(
      first <= int(k.split(":")[1].split()[0]) < first + len(source) and k.endswith("layer_norm")
      for k in model_lines)
  fusion_us = sum(e["dur"] for e in events[:-1]) / 2
  assert abs(sum(lines[k] for k in model_lines) - fusion_us) < 1e-9
  assert lines["-"] == 3.5 and kernels["sm90_xmma_gemm_bf16"] == 3.5
  assert info["sm90_xmma_gemm_bf16"][0] == 0.5  # launches per step
  assert abs(sum(ops.values()) - sum(kernels.values())) < 1e-9


def test_gpu_kernel_events_keep_the_device_rows_only():
  trace = {"traceEvents": [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
      {"ph": "X", "pid": 1, "name": "fusion_1", "dur": 5},
      {"ph": "X", "pid": 2, "name": "PjitFunction", "dur": 50},
      {"ph": "i", "pid": 1, "name": "marker"}]}
  assert [e["name"] for e in step_profile.gpu_kernel_events(trace)] == ["fusion_1"]


def test_families_sort_kernels_by_name_then_by_model_line():
  info = {"nvjet_sm90_tst_192x128": (1, "", "-"), "gemm_fusion_dot_5": (1, "", "dig.py:57 f"),
          "gla_bwd__1": (1, "", "-"), "depthwise_conv_bwd": (1, "", "-"),
          "gated_residual_conv_dx": (1, "", "-"), "swiglu_bwd": (1, "", "-"),
          "cudnn_generated_fort_native_sdpa": (1, "", "-"),
          "loop_add_fusion_3": (1, "", "layers.py:28 modulate"),
          "input_reduce_fusion_9": (1, "", "update.py:71 < update.py:69")}
  kernels = dict(zip(info, (1.0, 2.0, 4.0, 8.0, 0.25, 0.5, 16.0, 32.0, 64.0)))
  model = step_profile.model_files()
  assert {"layers.py", "dig.py", "gla.py", "pallas_gpu.py"} <= model and "update.py" not in model
  got = step_profile.families(kernels, info, model)
  assert got == {"matmuls": 3.0, "GLA kernels": 4.0, "conv kernels": 8.25,
                 "SwiGLU / gated-norm kernels": 0.5,
                 "attention (cuDNN)": 16.0, "model's XLA fusions": 32.0,
                 "other (optimizer, loss, copies)": 64.0}

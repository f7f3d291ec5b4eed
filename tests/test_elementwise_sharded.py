"""The one-pass backward kernels (SwiGLU, GLA's gated output) run per batch shard on 8 fake
devices inside a sharded jit, and match one device (tests/sharded_elementwise_check.py, one
subprocess for both)."""
import json
import os
import subprocess
import sys


def test_kernels_run_per_batch_shard_on_8_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  script = os.path.join(os.path.dirname(__file__), "sharded_elementwise_check.py")
  out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["num_devices"] == 8
  # 2 of the 16 examples per device: 4 x 4 tokens (SwiGLU), 16 tokens (gated output)
  assert result["swiglu_linear"]["kernel_rows"] == [2 * 4 * 4]
  assert result["gated_norm_linear"]["kernel_rows"] == [2 * 16]
  for name in ("swiglu_linear", "gated_norm_linear"):
    assert result[name]["loss_rel_err"] < 1e-5, name
    assert max(result[name]["grad_rel_errs"]) < 1e-5, name

"""scripts/triton_resources.py, the part that needs no triton: every pallas_call of a lowered
training-step function, with its Triton module and its own warps and stages; clear errors."""
import os
import sys

import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import triton_resources  # noqa: E402

from kernels_pallas.adaln import layer_norm_modulate  # noqa: E402
from kernels_pallas.gla import pallas_gpu as gla_gpu  # noqa: E402


def test_lowered_kernels_pairs_each_module_with_its_settings():
  import jax
  x, vec = jnp.ones((1, 64, 48), jnp.bfloat16), jnp.ones((1, 48), jnp.bfloat16)
  loss = lambda x, s, c: jnp.sum(layer_norm_modulate(x, s, c, backend="pallas_gpu") * x)
  kernels = triton_resources.lowered_kernels(jax.value_and_grad(loss, argnums=(0, 1, 2)),
                                             (x, vec, vec))
  assert [k[0] for k in kernels] == ["adaln_norm_fwd", "adaln_norm_bwd"]
  for name, asm, warps, stages in kernels:
    assert f"tt.func public @{name}" in asm and "loc(" not in asm  # no debug info
    assert (warps, stages) == (4, 1)


def test_lowered_kernels_reads_each_kernels_own_warps():
  """The GLA kernels run with different warps and stages; each gets its own."""
  import jax
  from kernels_pallas.gla import chunk_gla
  q = jnp.ones((1, 256, 2, 32), jnp.bfloat16)
  v = jnp.ones((1, 256, 2, 64), jnp.bfloat16)
  g = -0.1 * jnp.ones((1, 256, 2, 32))
  loss = lambda q, k, v, g: jnp.sum(chunk_gla(q, k, v, g, backend="pallas_gpu")[0])
  kernels = triton_resources.lowered_kernels(jax.grad(loss, argnums=(0, 1, 2, 3)), (q, q, v, g))
  settings = {name: (warps, stages) for name, _, warps, stages in kernels}
  warps = gla_gpu.NUM_WARPS
  if isinstance(warps, dict):  # {kernel name or "default": warps}
    warps = warps.get("gla_fwd", warps["default"])
  assert settings["gla_fwd"] == (warps, gla_gpu.NUM_STAGES)
  assert "gla_bwd" in settings


def test_unknown_case_is_an_error(capsys):
  with pytest.raises(SystemExit):
    triton_resources.main(["--cases", "conv,attention"])
  assert "unknown ['attention']" in capsys.readouterr().err

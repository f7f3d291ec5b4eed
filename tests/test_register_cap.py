"""Register caps for the Pallas-Triton kernels (kernels_pallas.register_cap).

What XLA compiles for a Pallas-Triton kernel is the Triton module serialised into the custom
call's backend config; these tests read that module back (with the Triton dialect) and check
the cap Triton will see, `ttg.maxnreg`, on exactly the kernels that asked for one."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.lib import triton
from jax._src.lib.mlir import ir

from kernels_pallas import register_cap
from kernels_pallas.gla import chunk_gla, pallas_gpu, reference
from kernels_pallas.settings import module_settings


def _custom_calls(op):
  op = op.operation
  if op.name == "stablehlo.custom_call":
    yield op
  for region in op.regions:
    for block in region.blocks:
      for inner in block.operations:
        yield from _custom_calls(inner)


def _triton_modules(lowered) -> dict[str, dict[str, str]]:
  """{kernel name: attributes of its Triton module} of every Pallas-Triton call lowered."""
  modules = {}
  for op in _custom_calls(lowered.compiler_ir("stablehlo")):
    if ir.StringAttr(op.attributes["call_target_name"]).value != "__gpu$xla.gpu.triton":
      continue
    config = op.attributes["mhlo.backend_config" if "mhlo.backend_config" in op.attributes
                           else "backend_config"]
    config = ir.DictAttr(config)
    context = ir.Context()
    triton.dialect.register_dialect(context)
    with context:
      module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
      attributes = module.operation.attributes
      modules[ir.StringAttr(config["name"]).value] = {
          attributes[i].name: str(attributes[i].attr) for i in range(len(attributes))}
  return modules


def _lower_gla_grad(max_registers):
  spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
  args = (spec((1, 40, 2, 32)), spec((1, 40, 2, 32)), spec((1, 40, 2, 64)),
          spec((1, 40, 2, 32), jnp.float32))
  loss = lambda q, k, v, g: jnp.sum(
      chunk_gla(q, k, v, g, backend="pallas_gpu")[0].astype(jnp.float32))
  with module_settings(pallas_gpu, {"MAX_REGISTERS": max_registers}):
    return jax.jit(jax.grad(loss, argnums=range(4))).trace(*args).lower(
        lowering_platforms=("cuda",))


def test_cap_reaches_only_the_kernels_that_ask_for_it():
  plain = _triton_modules(_lower_gla_grad(None))
  assert set(plain) == {"gla_fwd", "gla_chunk_states", "gla_bwd"}
  assert all(register_cap.MODULE_ATTRIBUTE not in attrs for attrs in plain.values())

  capped = _triton_modules(_lower_gla_grad({"gla_bwd": 168, "gla_fwd": 96}))
  assert set(capped) == {"gla_fwd_maxnreg96", "gla_chunk_states", "gla_bwd_maxnreg168"}
  assert capped["gla_bwd_maxnreg168"][register_cap.MODULE_ATTRIBUTE] == "168 : i32"
  assert capped["gla_fwd_maxnreg96"][register_cap.MODULE_ATTRIBUTE] == "96 : i32"
  assert register_cap.MODULE_ATTRIBUTE not in capped["gla_chunk_states"]


def test_a_cap_set_after_a_trace_takes_effect():
  """The cap is part of the kernels' jit cache key: set after an uncapped trace of the same
  shapes, it still reaches the lowered kernel."""
  _lower_gla_grad(None)
  assert "gla_bwd_maxnreg200" in _triton_modules(_lower_gla_grad({"gla_bwd": 200}))


def test_capped_kernels_compute_the_same_values():
  """The cap changes the kernel's name only: in interpret mode its gradients still match the
  token-by-token reference."""
  ks = jax.random.split(jax.random.PRNGKey(3), 5)
  q, k = (jax.random.normal(ks[i], (1, 40, 2, 32)) for i in range(2))
  v = jax.random.normal(ks[2], (1, 40, 2, 64))
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (1, 40, 2, 32))) / 4
  do = jax.random.normal(ks[4], (1, 40, 2, 64))

  def grads(f):
    _, vjp = jax.vjp(f, q, k, v, g)
    return vjp(do)

  with module_settings(pallas_gpu, {"MAX_REGISTERS": 168}):
    got = grads(lambda *a: chunk_gla(*a, backend="pallas_gpu", interpret=True)[0])
  want = grads(lambda *a: reference.recurrent_gla(*a)[0])
  for x, y in zip(got, want):
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-4)


def test_names_carry_the_cap_and_bad_caps_are_refused():
  assert register_cap.capped_name("gla_bwd", None) == "gla_bwd"
  assert register_cap.cap_of(register_cap.capped_name("gla_bwd", 168)) == 168
  assert register_cap.cap_of("gla_bwd") is None
  for bad in (0, 16, 256):
    with pytest.raises(ValueError, match=f"register cap {bad} for kernel 'gla_bwd'"):
      register_cap.capped_name("gla_bwd", bad)

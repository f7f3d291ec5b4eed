"""Register caps for Pallas-Triton kernels on CUDA.

Why: a GPU runs as many programs of a kernel per SM as its registers allow, and a latency-bound
walk (the GLA backward: 255 registers x 4 warps, 2 programs per SM) can gain from more programs
per SM even if the compiler then keeps some values in local memory. Pallas-Triton's
CompilerParams carry warps and pipelining stages only, while Triton itself reads a cap from the
module attribute `ttg.maxnreg` (its `maxnreg` option sets that attribute, and its conversion to
LLVM turns it into the kernel's `nvvm.maxnreg`, `.maxnreg` in the PTX).

How: a kernel asks for a cap through its name (`capped_name`), so the cap travels with the
pallas_call in every jaxpr and cache that holds it; `install()` wraps the Triton module that
Pallas-Triton's lowering builds and sets `ttg.maxnreg` on the modules of kernels whose names ask
for a cap. XLA (or jaxlib) then compiles the module as usual.
"""
from __future__ import annotations

import re

from jax._src.lib.mlir import ir

MODULE_ATTRIBUTE = "ttg.maxnreg"  # Triton's register cap (TritonGPU dialect)
_CAP_SUFFIX = re.compile(r"_maxnreg(\d+)$")


def capped_name(name: str, cap: int | None) -> str:
  """The kernel name that asks for at most `cap` registers per thread (None: `name`)."""
  if cap is None:
    return name
  if not 24 <= cap <= 255:
    raise ValueError(f"register cap {cap} for kernel {name!r}: expected 24 to 255 or None")
  return f"{name}_maxnreg{cap}"


def cap_of(name: str) -> int | None:
  """The cap a kernel name asks for, or None."""
  match = _CAP_SUFFIX.search(name)
  return int(match.group(1)) if match else None


class _CappingLowering:
  """Stands in for Pallas-Triton's `lowering` module inside its pallas_call lowering rule."""

  def __init__(self, lowering):
    self._lowering = lowering

  def __getattr__(self, name):
    return getattr(self._lowering, name)

  def lower_jaxpr_to_triton_module(self, jaxpr, *args, **kwargs):
    result = self._lowering.lower_jaxpr_to_triton_module(jaxpr, *args, **kwargs)
    cap = cap_of(jaxpr.debug_info.func_name)
    if cap is not None:
      module = result.module.operation
      with module.context:
        module.attributes[MODULE_ATTRIBUTE] = ir.IntegerAttr.get(
            ir.IntegerType.get_signless(32), cap)
    return result


def install() -> None:
  """Route Pallas-Triton's lowering through the cap (idempotent)."""
  from jax._src.pallas.triton import pallas_call_registration as registration
  if not isinstance(registration.lowering, _CappingLowering):
    registration.lowering = _CappingLowering(registration.lowering)

"""The platform an array lives on, for the kernels' backend dispatch."""
from __future__ import annotations

import jax


def platform_of(x) -> str:
  """"cpu", "gpu"/"cuda", "tpu", ...: of x's device, or the default backend for a tracer."""
  try:
    return next(iter(x.devices())).platform
  except Exception:  # a tracer under jit: use the default backend
    return jax.default_backend()

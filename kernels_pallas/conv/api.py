"""`depthwise_conv3x3`: checks inputs and picks a backend (the Pallas kernel on GPUs, the
jnp form elsewhere)."""
from __future__ import annotations

from kernels_pallas import batch_sharding
from kernels_pallas.conv import pallas_gpu, reference
from kernels_pallas.platform import platform_of

BACKENDS = ("auto", "reference", "pallas_gpu")


def resolve_backend(backend: str, x) -> str:
  """"auto": pallas_gpu on GPUs when the grid suits its blocks (`pallas_gpu.supports`), else
  the jnp reference (which XLA fuses well on CPU and TPU)."""
  if backend not in BACKENDS:
    raise ValueError(f"depthwise_conv3x3: unknown backend {backend!r}; expected one of "
                     f"{BACKENDS}")
  if backend != "auto":
    return backend
  on_gpu = platform_of(x) in ("gpu", "cuda")
  return "pallas_gpu" if on_gpu and pallas_gpu.supports(*x.shape[1:]) else "reference"


def depthwise_conv3x3(x, kernel, bias, *, backend: str = "auto", interpret: bool = False):
  """3x3 depthwise convolution, zero padding: x [N, h, w, D], kernel [3, 3, D], bias [D].

  Under a multi-device mesh set with `jax.set_mesh` (the trainer's), the Pallas kernel runs on
  each device's share of the batch when N divides evenly."""
  if x.ndim != 4:
    raise ValueError(f"depthwise_conv3x3: x must be [N, h, w, D], got shape {x.shape}")
  d = x.shape[-1]
  if kernel.shape != (3, 3, d) or bias.shape != (d,):
    raise ValueError(f"depthwise_conv3x3: kernel must be [3, 3, {d}] and bias [{d}] for x "
                     f"{x.shape}, got {kernel.shape} and {bias.shape}")
  backend = resolve_backend(backend, x)
  if backend == "reference":
    return reference.depthwise_conv3x3(x, kernel, bias)
  if not pallas_gpu.supports(*x.shape[1:]):
    bt, bd = pallas_gpu.blocks(x.shape[1] * x.shape[2], d)
    raise ValueError(
        f"depthwise_conv3x3: pallas_gpu needs h * w with a power-of-two factor >= "
        f"{pallas_gpu.MIN_BLOCK_T} and D with one >= 16; got h * w = {x.shape[1] * x.shape[2]} "
        f"(factor {bt}) and D = {d} (factor {bd}); use backend='reference'")
  run = lambda x, kernel, bias: (pallas_gpu.depthwise_conv3x3(x, kernel, bias, interpret),)
  mesh = batch_sharding.ambient_mesh(x.shape[0])
  if mesh is not None:
    run = batch_sharding.batch_sharded(run, mesh, (True, False, False), 1)
  return run(x, kernel, bias)[0]

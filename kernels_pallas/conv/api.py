"""`depthwise_conv3x3` and `gated_residual_conv3x3` (DiG's block ending: the gated residual
add, then the conv): check inputs and pick a backend (the Pallas kernels on GPUs, the jnp form
elsewhere)."""
from __future__ import annotations

import jax.numpy as jnp

from kernels_pallas import batch_sharding
from kernels_pallas.conv import pallas_gpu, pallas_gpu_residual, reference
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


def _check_conv(name, x, kernel, bias, backend):
  """The backend to run, after checking x, kernel and bias (and that pallas_gpu suits x)."""
  if x.ndim != 4:
    raise ValueError(f"{name}: x must be [N, h, w, D], got shape {x.shape}")
  d = x.shape[-1]
  if kernel.shape != (3, 3, d) or bias.shape != (d,):
    raise ValueError(f"{name}: kernel must be [3, 3, {d}] and bias [{d}] for x "
                     f"{x.shape}, got {kernel.shape} and {bias.shape}")
  backend = resolve_backend(backend, x)
  if backend == "pallas_gpu" and not pallas_gpu.supports(*x.shape[1:]):
    bt, bd = pallas_gpu.blocks(x.shape[1] * x.shape[2], d)
    raise ValueError(
        f"{name}: pallas_gpu needs h * w with a power-of-two factor >= "
        f"{pallas_gpu.MIN_BLOCK_T} and D with one >= 16; got h * w = {x.shape[1] * x.shape[2]} "
        f"(factor {bt}) and D = {d} (factor {bd}); use backend='reference'")
  return backend


def depthwise_conv3x3(x, kernel, bias, *, backend: str = "auto", interpret: bool = False):
  """3x3 depthwise convolution, zero padding: x [N, h, w, D], kernel [3, 3, D], bias [D].

  Under a multi-device mesh set with `jax.set_mesh` (the trainer's), the Pallas kernel runs on
  each device's share of the batch when N divides evenly."""
  backend = _check_conv("depthwise_conv3x3", x, kernel, bias, backend)
  if backend == "reference":
    return reference.depthwise_conv3x3(x, kernel, bias)
  run = lambda x, kernel, bias: (pallas_gpu.depthwise_conv3x3(x, kernel, bias, interpret),)
  sharded = batch_sharding.per_batch_shard(run, x.shape[0], (True, False, False), 1)
  return sharded(x, kernel, bias)[0]


def gated_residual_conv3x3(x, gate, branch, kernel, bias, *, backend: str = "auto",
                           interpret: bool = False):
  """depthwise_conv3x3(x + gate[:, None, None] * branch, kernel, bias): x and branch [N, h, w,
  D], gate [N, D]. The Pallas backend makes the gradients of branch and gate inside the conv's
  dx kernel instead of an XLA pass after it; x, gate and branch are computed in their promoted
  dtype, as the jnp form would."""
  backend = _check_conv("gated_residual_conv3x3", x, kernel, bias, backend)
  if branch.shape != x.shape or gate.shape != (x.shape[0], x.shape[-1]):
    raise ValueError(f"gated_residual_conv3x3: branch must be shaped like x {x.shape} and gate "
                     f"[{x.shape[0]}, {x.shape[-1]}], got {branch.shape} and {gate.shape}")
  if backend == "reference":
    return reference.gated_residual_conv3x3(x, gate, branch, kernel, bias)
  dtype = jnp.result_type(x, gate, branch)
  x, gate, branch = x.astype(dtype), gate.astype(dtype), branch.astype(dtype)
  run = lambda *args: (pallas_gpu_residual.gated_residual_conv3x3(*args, interpret),)
  return batch_sharding.per_batch_shard(run, x.shape[0], (True, True, True, False, False), 1)(
      x, gate, branch, kernel, bias)[0]

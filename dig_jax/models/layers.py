"""Pieces shared by DiG and DiT: embeddings, adaLN modulation, patching, final layer, initialisers."""
from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels_pallas.adaln import layer_norm_modulate
# adaLN normalisation's jnp form, for callers that want it without the kernels' dispatch
from kernels_pallas.adaln.reference import layer_norm, modulate  # noqa: F401

xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
normal_002 = nnx.initializers.normal(stddev=0.02)


@functools.lru_cache(maxsize=16)
def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed MAE-style 2-D sin-cos table, [grid_h, grid_w, dim]: half for column, half for row."""
  if dim % 4:
    raise ValueError(f"hidden size must be divisible by 4 for 2-D sin-cos positions, got {dim}")

  def one_axis(pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64),
                           np.arange(grid_w, dtype=np.float64), indexing="ij")
  table = np.concatenate([one_axis(cols), one_axis(rows)], axis=1)
  return table.reshape(grid_h, grid_w, dim).astype(np.float32)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """Sinusoidal timestep features [N, dim]: cos first, then sin (as DiT)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nnx.Module):
  """Sinusoid(256) -> Linear -> SiLU -> Linear; weights N(0, 0.02) as DiT."""

  def __init__(self, hidden: int, *, freq_dim: int = 256, dtype=jnp.float32, rngs: nnx.Rngs):
    self.freq_dim = freq_dim
    self.fc1 = nnx.Linear(freq_dim, hidden, kernel_init=normal_002, bias_init=zeros,
                          dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, hidden, kernel_init=normal_002, bias_init=zeros,
                          dtype=dtype, rngs=rngs)

  def __call__(self, t):
    return self.fc2(nnx.silu(self.fc1(timestep_embedding(t, self.freq_dim))))


class LabelEmbedder(nnx.Module):
  """Class table with one extra row, the null class used for classifier-free guidance.

  Label dropout is applied by the training step (it replaces labels with `null_class`), so the
  module itself is deterministic.
  """

  def __init__(self, num_classes: int, hidden: int, *, rngs: nnx.Rngs):
    self.null_class = num_classes
    self.table = nnx.Embed(num_classes + 1, hidden, embedding_init=normal_002, rngs=rngs)

  def __call__(self, y):
    return self.table(y)


def _patch_kernel_init(key, shape, dtype=jnp.float32):
  """Xavier-uniform for a conv kernel [p, p, C, D] treated as a Linear (p*p*C -> D), as DiT."""
  p1, p2, c, d = shape
  return xavier_uniform(key, (p1 * p2 * c, d), dtype).reshape(shape)


class PatchEmbed(nnx.Module):
  """Non-overlapping p x p patches -> tokens, channels-last: [N, H, W, C] -> [N, H/p, W/p, D]."""

  def __init__(self, in_channels: int, hidden: int, patch: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.proj = nnx.Conv(in_channels, hidden, kernel_size=(patch, patch), strides=(patch, patch),
                         padding="VALID", kernel_init=_patch_kernel_init, bias_init=zeros,
                         dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.proj(x)


def unpatchify(x, patch: int, channels: int):
  """[N, h, w, p*p*C] tokens -> [N, h*p, w*p, C] image (patch vector ordered row, col, channel)."""
  n, h, w, _ = x.shape
  x = x.reshape(n, h, w, patch, patch, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h * patch, w * patch, channels)


def over_rows(linear, x):
  """`linear` (a function of [M, D] -> [M, F]) applied to x [..., D] as one matmul over its
  rows. The same product, but its weight gradient is then a plain 2-D matmul: XLA's CPU backend
  ran the N-D form's weight gradient (a transposed copy and a slow dot) about 3x slower (the
  demo's step -29 %); on an H100 whole training steps time the same (BENCHMARKS.md)."""
  y = linear(x.reshape(-1, x.shape[-1]))
  return y.reshape(*x.shape[:-1], y.shape[-1])


class AdaLNModulation(nnx.Module):
  """SiLU -> Linear(D, k*D), zero-initialised (adaLN-Zero); returns k chunks of [N, D]."""

  def __init__(self, hidden: int, chunks: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.chunks = chunks
    self.linear = nnx.Linear(hidden, chunks * hidden, kernel_init=zeros, bias_init=zeros,
                             dtype=dtype, rngs=rngs)

  def __call__(self, c):
    return jnp.split(self.linear(nnx.silu(c)), self.chunks, axis=-1)


class FinalLayer(nnx.Module):
  """LayerNorm -> adaLN shift/scale -> Linear(D, p*p*C_out); all zero-initialised. The norm is
  the blocks' `layer_norm_modulate` (`backend`: its kernels' choice)."""

  def __init__(self, hidden: int, patch: int, out_channels: int, *, dtype=jnp.float32,
               backend: str = "auto", interpret: bool = False, rngs: nnx.Rngs):
    self.modulation = AdaLNModulation(hidden, 2, dtype=dtype, rngs=rngs)
    self.linear = nnx.Linear(hidden, patch * patch * out_channels, kernel_init=zeros,
                             bias_init=zeros, dtype=dtype, rngs=rngs)
    self.backend, self.interpret = backend, interpret

  def __call__(self, x, c):
    shift, scale = self.modulation(c)
    normed = layer_norm_modulate(x, shift, scale, backend=self.backend, interpret=self.interpret)
    return over_rows(self.linear, normed)


def check_image_size(input_size, patch: int) -> tuple[int, int]:
  """Normalises `input_size` (int or (H, W)) and checks it is divisible by the patch size."""
  h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
  if h <= 0 or w <= 0 or h % patch or w % patch:
    raise ValueError(f"input size {h}x{w} must be positive and divisible by the patch size {patch}")
  return h, w

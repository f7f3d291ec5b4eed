"""DiT baseline (Peebles & Xie) with the same embedders; attention is jax.nn.dot_product_attention."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dig_jax.models import layers
from dig_jax.models.backbone import ConditionalImageTransformer
from kernels_pallas.adaln import layer_norm_modulate_with_input, residual_layer_norm_modulate


class SelfAttention(nnx.Module):
  """Multi-head softmax attention; `implementation=None` lets JAX use cuDNN flash attention on GPUs."""

  def __init__(self, hidden: int, num_heads: int, *, dtype=jnp.float32, implementation=None,
               rngs: nnx.Rngs):
    self.num_heads, self.implementation = num_heads, implementation
    # One fused qkv Linear, so its xavier bound uses fan_out = 3D as the reference's does.
    self.qkv = nnx.Linear(hidden, 3 * hidden, kernel_init=layers.xavier_uniform,
                          bias_init=layers.zeros, dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(hidden, hidden, kernel_init=layers.xavier_uniform,
                           bias_init=layers.zeros, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    n, t, d = x.shape
    qkv = layers.over_rows(self.qkv, x).reshape(n, t, 3, self.num_heads, d // self.num_heads)
    q, k, v = jnp.split(qkv, 3, axis=2)
    o = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0],
                                     implementation=self.implementation)
    return layers.over_rows(self.proj, o.reshape(n, t, d))


class Mlp(nnx.Module):
  def __init__(self, hidden: int, inner: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(hidden, inner, kernel_init=layers.xavier_uniform, bias_init=layers.zeros,
                          dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(inner, hidden, kernel_init=layers.xavier_uniform, bias_init=layers.zeros,
                          dtype=dtype, rngs=rngs)

  def __call__(self, x):
    mlp = lambda rows: self.fc2(jax.nn.gelu(self.fc1(rows), approximate=True))
    return layers.over_rows(mlp, x)


class DiTBlock(nnx.Module):
  def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, *, dtype=jnp.float32,
               attention_impl=None, elementwise_backend: str = "auto",
               pallas_interpret: bool = False, rngs: nnx.Rngs):
    # The adaLN norms run the same kernels as DiG's (kernels_pallas.adaln), so the two models
    # differ only in token mixing, MLP and conv.
    self.elementwise_backend, self.pallas_interpret = elementwise_backend, pallas_interpret
    self.modulation = layers.AdaLNModulation(hidden, 6, dtype=dtype, rngs=rngs)
    self.attn = SelfAttention(hidden, num_heads, dtype=dtype, implementation=attention_impl,
                              rngs=rngs)
    self.mlp = Mlp(hidden, int(hidden * mlp_ratio), dtype=dtype, rngs=rngs)

  def __call__(self, x, c):
    shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)
    # As in DiG, on GPUs x's residual-path gradient is added inside the first norm's backward
    # kernel, and the first gated residual add runs inside the second norm's kernels.
    kernels = dict(backend=self.elementwise_backend, interpret=self.pallas_interpret)
    x, normed = layer_norm_modulate_with_input(x, shift1, scale1, **kernels)
    x, normed = residual_layer_norm_modulate(x, gate1, self.attn(normed), shift2, scale2,
                                             **kernels)
    return x + gate2[:, None] * self.mlp(normed)


class DiT(ConditionalImageTransformer):
  """Class-conditional DiT with the same interface as DiG."""

  def __init__(self, *, input_size, patch_size: int, in_channels: int, hidden_size: int,
               depth: int, num_heads: int, num_classes: int, mlp_ratio: float = 4.0,
               learn_sigma: bool = True, dtype=jnp.float32, attention_impl=None,
               elementwise_backend: str = "auto", pallas_interpret: bool = False,
               remat: str = "none", rngs: nnx.Rngs):
    super().__init__(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                     hidden_size=hidden_size, num_classes=num_classes, learn_sigma=learn_sigma,
                     dtype=dtype, remat=remat, elementwise_backend=elementwise_backend,
                     pallas_interpret=pallas_interpret, rngs=rngs)
    self.blocks = nnx.List([
        DiTBlock(hidden_size, num_heads, mlp_ratio, dtype=dtype, attention_impl=attention_impl,
                 elementwise_backend=elementwise_backend, pallas_interpret=pallas_interpret,
                 rngs=rngs) for _ in range(depth)])

  def __call__(self, x, t, y):
    x, c = self.embed(x, t, y)
    n, h, w, d = x.shape
    x = self.run_blocks(x.reshape(n, h * w, d), c)
    return self.head(x.reshape(n, h, w, d), c)

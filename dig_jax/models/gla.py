"""The Gated Linear Attention token mixer of DiG (fla's GLA layer with DiG's settings)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dig_jax.models import layers
from kernels_pallas.gla.layer import gla_layer, reads_column_scan_in_place, transpose_grid

HEAD_KEY_DIM = 32  # key_dim = D/2 and value_dim = D, so every DiG size has d_k 32, d_v 64
# xavier_uniform with gain 2 ** -2.5 (variance scale = gain ** 2), as the reference initialises GLA
_gla_init = nnx.initializers.variance_scaling(2.0 ** -5, "fan_avg", "uniform")


class GatedLinearAttention(nnx.Module):
  """q, k: D -> D/2; v, output gate: D -> D; low-rank forget gate; per-head RMSNorm; o: D -> D.

  `backend`: chunk_gla's; `output_backend`: that of the output stage's one-pass backward
  (norm, gate and o_proj: `gated_norm_linear`)."""

  def __init__(self, hidden: int, num_heads: int, *, gate_low_rank: int = 16,
               gate_logit_normalizer: float = 16.0, dtype=jnp.float32, backend: str = "auto",
               output_backend: str = "auto", interpret: bool = False, rngs: nnx.Rngs):
    if hidden % (2 * num_heads):
      raise ValueError(f"GLA hidden size {hidden} must be divisible by 2 * num_heads "
                       f"({2 * num_heads})")
    self.num_heads = num_heads
    self.key_dim, self.value_dim = hidden // 2, hidden
    self.gate_logit_normalizer = gate_logit_normalizer
    self.backend, self.output_backend, self.interpret = backend, output_backend, interpret

    def linear(din, dout, bias=False):
      return nnx.Linear(din, dout, use_bias=bias, kernel_init=_gla_init,
                        bias_init=nnx.initializers.zeros_init(), dtype=dtype, rngs=rngs)

    self.q_proj = linear(hidden, self.key_dim)
    self.k_proj = linear(hidden, self.key_dim)
    self.v_proj = linear(hidden, self.value_dim)
    self.g_proj = linear(hidden, self.value_dim)
    self.gk_down = linear(hidden, gate_low_rank)
    self.gk_up = linear(gate_low_rank, self.key_dim, bias=True)
    self.o_norm_scale = nnx.Param(jnp.ones((self.value_dim // num_heads,), jnp.float32))
    self.o_proj = linear(self.value_dim, hidden)

  def __call__(self, x, *, reverse: bool = False, column_scan: tuple[int, int] | None = None):
    """x: [N, T, D] tokens in scan order, or with column_scan = (h, w) in the raster order of an
    h x w grid scanned column by column (the output in the same order); `reverse` scans from
    the last token. The GPU kernels read a column scan in place; elsewhere x and the output
    are transposed here (x is narrower than the projections)."""
    if column_scan is not None and not self._reads_in_place(x, column_scan):
      out = self(transpose_grid(x, column_scan), reverse=reverse)
      return transpose_grid(out, column_scan[::-1])
    y = self._input_projections(x)  # [q | k | v | output gate | low-rank gate input]
    # The forget gate (log(sigmoid(gk_up(.)) ** (1/16)) in float32, always <= 0), the GLA
    # kernels reading q, k and v in place from y, and o_proj(RMSNorm_per_head(o) * scale *
    # swish(output gate)), the backward keeping only y, the gate and o (`gla_layer`).
    return gla_layer(y, self.gk_up.kernel[...], self.gk_up.bias[...], self.o_norm_scale[...],
                     self.o_proj.kernel[...], heads=self.num_heads,
                     key_dim=self.key_dim // self.num_heads,
                     value_dim=self.value_dim // self.num_heads,
                     gate_normalizer=self.gate_logit_normalizer, reverse=reverse,
                     column_scan=column_scan, backend=self.backend,
                     output_backend=self.output_backend, interpret=self.interpret)

  def _projection_layers(self):
    return (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.gk_down)

  def _reads_in_place(self, x, column_scan):
    width = sum(layer.out_features for layer in self._projection_layers())
    dtype = self.q_proj.dtype or jnp.result_type(x, self.q_proj.kernel[...])
    y = jax.ShapeDtypeStruct((*x.shape[:2], width), dtype)
    return reads_column_scan_in_place(
        y, heads=self.num_heads, key_dim=self.key_dim // self.num_heads,
        value_dim=self.value_dim // self.num_heads, column_scan=column_scan,
        backend=self.backend, output_backend=self.output_backend)

  def _input_projections(self, x):
    """q, k, v (heads in order, `chunk_gla_packed`'s layout), the output gate and the
    low-rank forget-gate input, side by side: the five bias-free linears of x as one matmul
    (x is read once; the backward has one dx matmul, not five and a sum). The parameters stay
    five separate kernels, as in the reference."""
    kernel = jnp.concatenate([layer.kernel[...] for layer in self._projection_layers()], axis=1)
    dtype = self.q_proj.dtype or jnp.result_type(x, kernel)  # as nnx.Linear promotes
    return layers.over_rows(lambda rows: jnp.dot(rows, kernel.astype(dtype),
                                                 precision=self.q_proj.precision),
                            x.astype(dtype))

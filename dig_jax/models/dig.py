"""DiG: DiT with Gated Linear Attention and the Spatial Reorient & Enhancement Module."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dig_jax.models import layers
from dig_jax.models.backbone import ConditionalImageTransformer
from dig_jax.models.gla import GatedLinearAttention
from dig_jax.models.scan_order import layer_orientation, orient_conv_kernel
from kernels_pallas.adaln import layer_norm_modulate_with_input, residual_layer_norm_modulate
from kernels_pallas.conv import gated_residual_conv3x3
from kernels_pallas.swiglu import swiglu_linear


class SwiGLU(nnx.Module):
  """Bias-free gated MLP: down(swish(gate(x)) * up(x))."""

  def __init__(self, hidden: int, inner: int, *, dtype=jnp.float32, backend: str = "auto",
               interpret: bool = False, rngs: nnx.Rngs):
    def linear(din, dout):
      return nnx.Linear(din, dout, use_bias=False, kernel_init=layers.xavier_uniform,
                        dtype=dtype, rngs=rngs)
    self.gate, self.up, self.down = linear(hidden, inner), linear(hidden, inner), linear(inner, hidden)
    self.backend, self.interpret = backend, interpret

  def __call__(self, x):
    # Only [a, b] = [gate(x), up(x)] is kept for the backward, whole, as the one matmul makes it
    # (kept as two halves, XLA copied them out of it: a GPU profile); swish(a) * b is remade in
    # the backward's one elementwise pass (`swiglu_linear`): one [T, inner] activation less
    # per block.
    ab = self._gate_and_up(x)
    kernel = self.down.kernel[...]
    dtype = self.down.dtype or jnp.result_type(ab, kernel)  # as nnx.Linear promotes
    return swiglu_linear(ab.astype(dtype), kernel.astype(dtype), backend=self.backend,
                         interpret=self.interpret)

  def _gate_and_up(self, x):
    """[gate(x), up(x)] as one matmul of x with the two kernels side by side (the parameters
    stay two kernels, as in the reference)."""
    kernel = jnp.concatenate([self.gate.kernel[...], self.up.kernel[...]], axis=1)
    dtype = self.gate.dtype or jnp.result_type(x, kernel)  # as nnx.Linear promotes
    # The barrier keeps XLA from rewriting a matmul with a joined operand as two matmuls and a
    # copy of their outputs into one array (a precaution: measured only with the custom VJP).
    kernel = jax.lax.optimization_barrier(kernel.astype(dtype))
    return layers.over_rows(lambda rows: jnp.dot(rows, kernel, precision=self.gate.precision),
                            x.astype(dtype))


def _identity_depthwise(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype).at[1, 1].set(1.0)  # centre tap 1: the conv starts as identity


class DiGBlock(nnx.Module):
  """adaLN-Zero block: x += g1*GLA(mod(LN x)); x += g2*SwiGLU(mod(LN x)); x = DWConv3x3(x).

  Activations stay on the raster grid [N, h, w, D]; `layer_index` sets the scan direction
  (see scan_order.py).
  """

  def __init__(self, hidden: int, num_heads: int, mlp_hidden: int, *, layer_index: int,
               dtype=jnp.float32, gla_backend: str = "auto", conv_backend: str = "auto",
               elementwise_backend: str = "auto", pallas_interpret: bool = False,
               rngs: nnx.Rngs):
    self.layer_index = layer_index
    self.dtype = dtype
    self.conv_backend, self.pallas_interpret = conv_backend, pallas_interpret
    self.elementwise_backend = elementwise_backend
    self.modulation = layers.AdaLNModulation(hidden, 6, dtype=dtype, rngs=rngs)
    self.attn = GatedLinearAttention(hidden, num_heads, dtype=dtype, backend=gla_backend,
                                     output_backend=elementwise_backend,
                                     interpret=pallas_interpret, rngs=rngs)
    self.mlp = SwiGLU(hidden, mlp_hidden, dtype=dtype, backend=elementwise_backend,
                      interpret=pallas_interpret, rngs=rngs)
    self.conv_kernel = nnx.Param(_identity_depthwise(rngs.params(), (3, 3, 1, hidden)))
    self.conv_bias = nnx.Param(jnp.zeros((hidden,), jnp.float32))

  def _mix_tokens(self, x):
    # A transposed layer scans the grid column by column: the GLA layer reads the raster
    # tokens in that order (in place on GPUs), so no transposed copy is made here.
    transposed, reverse = layer_orientation(self.layer_index)
    n, h, w, d = x.shape
    y = self.attn(x.reshape(n, h * w, d), reverse=reverse,
                  column_scan=(h, w) if transposed else None)
    return y.reshape(n, h, w, d)

  def _input_and_norm(self, x, shift, scale):
    """(x, its adaLN norm): on GPUs x's gradient along the residual path is added inside the
    norm's backward kernel."""
    return layer_norm_modulate_with_input(x, shift, scale, backend=self.elementwise_backend,
                                          interpret=self.pallas_interpret)

  def _residual_and_norm(self, x, gate, branch, shift, scale):
    """(x + gate * branch, its adaLN norm): on GPUs the add runs inside the norm's kernels."""
    return residual_layer_norm_modulate(x, gate, branch, shift, scale,
                                        backend=self.elementwise_backend,
                                        interpret=self.pallas_interpret)

  def _residual_and_conv(self, x, gate, branch):
    """DWConv3x3(x + gate * branch): on GPUs the add's gradients come from the conv's kernel."""
    kernel = orient_conv_kernel(self.conv_kernel[...], self.layer_index)
    return gated_residual_conv3x3(x, gate, branch, kernel[:, :, 0], self.conv_bias[...],
                                  backend=self.conv_backend, interpret=self.pallas_interpret)

  def __call__(self, x, c):
    shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)
    x, normed = self._input_and_norm(x, shift1, scale1)
    mixed = self._mix_tokens(normed)
    x, normed = self._residual_and_norm(x, gate1, mixed, shift2, scale2)
    return self._residual_and_conv(x, gate2, self.mlp(normed))


class DiG(ConditionalImageTransformer):
  """Class-conditional DiG. `model(x, t, y)`: x [N, H, W, C], t [N], y [N] -> [N, H, W, C_out]."""

  def __init__(self, *, input_size, patch_size: int, in_channels: int, hidden_size: int,
               depth: int, num_heads: int, mlp_hidden: int, num_classes: int,
               learn_sigma: bool = True, dtype=jnp.float32, gla_backend: str = "auto",
               conv_backend: str = "auto", elementwise_backend: str = "auto",
               pallas_interpret: bool = False, remat: str = "none", rngs: nnx.Rngs):
    super().__init__(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                     hidden_size=hidden_size, num_classes=num_classes, learn_sigma=learn_sigma,
                     dtype=dtype, remat=remat, elementwise_backend=elementwise_backend,
                     pallas_interpret=pallas_interpret, rngs=rngs)
    self.blocks = nnx.List([
        DiGBlock(hidden_size, num_heads, mlp_hidden, layer_index=i, dtype=dtype,
                 gla_backend=gla_backend, conv_backend=conv_backend,
                 elementwise_backend=elementwise_backend,
                 pallas_interpret=pallas_interpret, rngs=rngs)
        for i in range(depth)])

  def __call__(self, x, t, y):
    x, c = self.embed(x, t, y)
    return self.head(self.run_blocks(x, c), c)

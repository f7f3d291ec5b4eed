"""What DiG and DiT share: patch + position embedding, timestep and label conditioning, the head.

Subclasses build `self.blocks` and call `embed` -> their blocks -> `head`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dig_jax.models import layers


# What a block keeps for the backward pass: everything ("none": no rematerialisation), only its
# input ("full": the rest is recomputed), or its input and matmul outputs ("dots").
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class ConditionalImageTransformer(nnx.Module):
  """`model(x, t, y)`: x [N, H, W, C] (channels last), t [N], y [N] -> [N, H, W, C_out]."""

  def __init__(self, *, input_size, patch_size: int, in_channels: int, hidden_size: int,
               num_classes: int, learn_sigma: bool, dtype, remat: str = "none",
               elementwise_backend: str = "auto", pallas_interpret: bool = False,
               rngs: nnx.Rngs):
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat={remat!r}; expected one of {tuple(REMAT_POLICIES)}")
    self.remat = remat
    self.image_size = layers.check_image_size(input_size, patch_size)
    self.grid = (self.image_size[0] // patch_size, self.image_size[1] // patch_size)
    self.patch_size, self.in_channels = patch_size, in_channels
    self.out_channels = 2 * in_channels if learn_sigma else in_channels
    self.hidden_size, self.num_classes, self.dtype = hidden_size, num_classes, dtype
    self.patch_embed = layers.PatchEmbed(in_channels, hidden_size, patch_size, dtype=dtype,
                                         rngs=rngs)
    self.t_embedder = layers.TimestepEmbedder(hidden_size, dtype=dtype, rngs=rngs)
    self.y_embedder = layers.LabelEmbedder(num_classes, hidden_size, rngs=rngs)
    self.final_layer = layers.FinalLayer(hidden_size, patch_size, self.out_channels, dtype=dtype,
                                         backend=elementwise_backend,
                                         interpret=pallas_interpret, rngs=rngs)

  def embed(self, x, t, y):
    """(tokens on the grid [N, h, w, D], conditioning [N, D]), in the compute dtype."""
    want = (*self.image_size, self.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
      raise ValueError(f"{type(self).__name__} was built for inputs [N, {want[0]}, {want[1]}, "
                       f"{want[2]}] (channels last), got {tuple(x.shape)}")
    pos = layers.sincos_pos_embed_2d(self.hidden_size, *self.grid)
    tokens = (self.patch_embed(x.astype(self.dtype)) + pos).astype(self.dtype)
    return tokens, (self.t_embedder(t) + self.y_embedder(y)).astype(self.dtype)

  def run_blocks(self, x, c):
    """x through every block in turn, rematerialised per block as `self.remat` says."""
    if self.remat == "none":
      for block in self.blocks:
        x = block(x, c)
      return x
    call = nnx.remat(lambda block, x, c: block(x, c), policy=REMAT_POLICIES[self.remat])
    for block in self.blocks:
      x = call(block, x, c)
    return x

  def head(self, tokens, c):
    """Grid tokens [N, h, w, D] -> the float32 output image."""
    out = self.final_layer(tokens, c)
    return layers.unpatchify(out, self.patch_size, self.out_channels).astype(jnp.float32)

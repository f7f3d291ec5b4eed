"""DiG's 4-direction scan order (the "spatial reorient" part of SREM), as pure functions.

The reference model flips the token sequence after every block and transposes the token grid
after every odd block, so layer 4k scans rows forward, 4k+1 rows backward, 4k+2 columns forward
and 4k+3 columns backward. This project keeps activations in raster order on an [N, h, w, D]
grid and gives each layer its orientation instead: the GLA scans backwards with `reverse=True`,
column layers scan the grid column by column (`column_scan`: the GPU kernels read the raster
tokens in that order in place; other backends transpose the layer's input and output), and
the depthwise conv kernel is rotated/transposed to act on the grid as the reference's conv
acts on its reoriented grid. The result is the reference function, tokens in raster order at
any depth, and any (h, w) grid.
"""
from __future__ import annotations

import numpy as np


def layer_orientation(layer: int) -> tuple[bool, bool]:
  """(transposed, reversed) for DiG layer `layer` (0-based): columns for 4k+2/4k+3, odd = reversed."""
  return layer % 4 >= 2, layer % 2 == 1


def token_order(layer: int, h: int, w: int) -> np.ndarray:
  """Raster indices of an h x w grid in the order layer `layer` scans them."""
  transposed, reversed_ = layer_orientation(layer)
  grid = np.arange(h * w).reshape(h, w)
  seq = (grid.T if transposed else grid).reshape(-1)
  return seq[::-1] if reversed_ else seq


def orient_conv_kernel(kernel, layer: int):
  """Depthwise kernel [3, 3, 1, D] acting on the raster grid like the reference's on its grid.

  A layer whose sequence is reversed sees the image rotated by 180 degrees and a transposed layer
  sees it transposed; conv(O(x), W) = O(conv(x, O'(W))) with O' the same rotation/transpose of W.
  """
  transposed, reversed_ = layer_orientation(layer)
  if reversed_:
    kernel = kernel[::-1, ::-1]
  if transposed:
    kernel = kernel.transpose(1, 0, 2, 3)
  return kernel

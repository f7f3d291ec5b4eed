"""3x3 depthwise convolution on a token grid (DiG's conv after every block), alone or with the
block's gated residual add before it."""
from kernels_pallas.conv.api import BACKENDS, depthwise_conv3x3, gated_residual_conv3x3

__all__ = ["BACKENDS", "depthwise_conv3x3", "gated_residual_conv3x3"]

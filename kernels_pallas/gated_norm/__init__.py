"""GLA's output stage: per-head RMSNorm, the swish output gate and the output projection, with a
one-pass backward."""
from kernels_pallas.gated_norm.api import BACKENDS, gated_norm_linear

__all__ = ["BACKENDS", "gated_norm_linear"]

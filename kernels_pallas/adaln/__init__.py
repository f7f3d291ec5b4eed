"""adaLN's normalisation: LayerNorm without affine parameters, then the per-example shift and
scale, alone, returning its input for a residual path too, or after a block's gated residual
add, with one-pass forward and backward kernels on GPUs."""
from kernels_pallas.adaln.api import (BACKENDS, layer_norm_modulate, layer_norm_modulate_with_input,
                                      residual_layer_norm_modulate)

__all__ = ["BACKENDS", "layer_norm_modulate", "layer_norm_modulate_with_input",
           "residual_layer_norm_modulate"]

"""SwiGLU's gated product and the output projection after it, with a one-pass backward."""
from kernels_pallas.swiglu.api import BACKENDS, swiglu_linear, swiglu_product_backward

__all__ = ["BACKENDS", "swiglu_linear", "swiglu_product_backward"]

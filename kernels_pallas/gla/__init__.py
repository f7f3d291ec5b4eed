"""Gated Linear Attention: `chunk_gla` (dispatching entry point) and pure-jnp references."""
from kernels_pallas.gla import reference
from kernels_pallas.gla.api import chunk_gla

__all__ = ["chunk_gla", "reference"]

"""Gated Linear Attention: `chunk_gla` (dispatching entry point; `chunk_gla_packed` for q, k, v in one array) and pure-jnp references."""
from kernels_pallas.gla import reference
from kernels_pallas.gla.api import chunk_gla, chunk_gla_packed

__all__ = ["chunk_gla", "chunk_gla_packed", "reference"]

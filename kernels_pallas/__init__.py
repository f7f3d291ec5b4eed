"""Pallas kernels used by dig-jax."""

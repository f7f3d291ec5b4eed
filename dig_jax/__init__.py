"""dig-jax: DiG diffusion models in JAX/Flax."""

"""Training: train state, step, sharding rules, checkpoints, metrics and the loop."""
from dig_jax.train.loop import NonFiniteLossError, train

__all__ = ["NonFiniteLossError", "train"]

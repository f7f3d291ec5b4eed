"""Training: train state, step, sharding rules, checkpoints, metrics and the loop."""
from dig_jax.train.loop import NonFiniteLossError, train
from dig_jax.train.validate import ConfigError

__all__ = ["ConfigError", "NonFiniteLossError", "train"]

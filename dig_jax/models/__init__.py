"""DiG and DiT models (Flax NNX, channels-last) and the name registry."""
from dig_jax.models.dig import DiG
from dig_jax.models.dit import DiT
from dig_jax.models.registry import (MODEL_NAMES, count_parameters, create_model,
                                     create_model_from_config)

__all__ = ["DiG", "DiT", "MODEL_NAMES", "count_parameters", "create_model", "create_model_from_config"]

"""Gaussian diffusion (ADM/DiT semantics) as pure JAX functions: schedules, losses, samplers."""
from dig_jax.diffusion.gaussian import (
    Schedule,
    discretized_gaussian_log_likelihood,
    linear_betas,
    make_schedule,
    normal_kl,
    p_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    training_losses,
)
from dig_jax.diffusion.guidance import cfg_model_fn
from dig_jax.diffusion.respace import create_schedule, respaced_schedule, space_timesteps
from dig_jax.diffusion.samplers import ddim_sample, ddim_step, ddpm_sample, ddpm_step

__all__ = [
    "Schedule",
    "cfg_model_fn",
    "create_schedule",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "discretized_gaussian_log_likelihood",
    "linear_betas",
    "make_schedule",
    "normal_kl",
    "p_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "respaced_schedule",
    "space_timesteps",
    "training_losses",
]

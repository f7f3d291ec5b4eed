"""Ancestral (DDPM) and DDIM sampling loops over a (respaced) schedule, as single XLA loops.

`model_fn(x, t_model) -> model_output`, with t_model = schedule.timestep_map[t] (shape [N]).
Randomness: `key` is split into (init, steps); the start noise is normal(init) unless `noise` is
given, and step t (a schedule index) draws normal(fold_in(steps, t)).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dig_jax.diffusion.gaussian import (Schedule, extract, p_mean_variance,
                                        predict_eps_from_xstart)


def ddpm_step(model_fn, schedule: Schedule, x, t, noise, *, learn_sigma=True,
              clip_denoised=False):
  """x_{t-1} ~ p(x_{t-1} | x_t) for the scalar schedule index t; no noise is added at t = 0."""
  tb = jnp.full((x.shape[0],), t, dtype=jnp.int32)
  out = p_mean_variance(schedule, model_fn(x, schedule.timestep_map[tb]), x, tb,
                        learn_sigma=learn_sigma, clip_denoised=clip_denoised)
  std = jnp.where(t > 0, jnp.exp(0.5 * out["log_variance"]), 0.0)
  return out["mean"] + std * noise


def ddim_step(model_fn, schedule: Schedule, x, t, noise, *, eta=0.0, learn_sigma=True,
              clip_denoised=False):
  """One DDIM update (Song et al. eq. 12) from schedule index t to t - 1; eta=0 is deterministic."""
  tb = jnp.full((x.shape[0],), t, dtype=jnp.int32)
  out = p_mean_variance(schedule, model_fn(x, schedule.timestep_map[tb]), x, tb,
                        learn_sigma=learn_sigma, clip_denoised=clip_denoised)
  # Re-derive eps from the (possibly clipped) x_0 prediction, as ADM does.
  eps = predict_eps_from_xstart(schedule, x, tb, out["pred_xstart"])
  alpha_bar = extract(schedule.alphas_cumprod, tb, x.ndim)
  alpha_bar_prev = extract(schedule.alphas_cumprod_prev, tb, x.ndim)
  # sigma is exactly 0 at t = 0 (alpha_bar_prev = 1), so the last step adds no noise.
  sigma = (eta * jnp.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar))
           * jnp.sqrt(1.0 - alpha_bar / alpha_bar_prev))
  mean = (out["pred_xstart"] * jnp.sqrt(alpha_bar_prev)
          + jnp.sqrt(1.0 - alpha_bar_prev - sigma ** 2) * eps)
  return mean + sigma * noise


def _sample_loop(step_fn, schedule: Schedule, shape, key, noise, progress):
  init_key, step_key = jax.random.split(key)
  x = jax.random.normal(init_key, shape, jnp.float32) if noise is None else jnp.asarray(noise)
  n = schedule.num_timesteps

  def body(i, x):
    t = n - 1 - i
    if progress is not None:
      jax.debug.callback(progress, i, n)
    return step_fn(x, t, jax.random.normal(jax.random.fold_in(step_key, t), shape, x.dtype))

  return jax.lax.fori_loop(0, n, body, x)


def ddpm_sample(model_fn, schedule: Schedule, shape, key, *, learn_sigma=True,
                clip_denoised=False, noise=None, progress=None):
  """Ancestral sampling from index T-1 down to 0; returns the final x.

  `progress(i, num_steps)`, if given, is called on the host before step i.
  """
  step = lambda x, t, z: ddpm_step(model_fn, schedule, x, t, z, learn_sigma=learn_sigma,
                                   clip_denoised=clip_denoised)
  return _sample_loop(step, schedule, shape, key, noise, progress)


def ddim_sample(model_fn, schedule: Schedule, shape, key, *, eta=0.0, learn_sigma=True,
                clip_denoised=False, noise=None, progress=None):
  """DDIM sampling from index T-1 down to 0; returns the final x."""
  step = lambda x, t, z: ddim_step(model_fn, schedule, x, t, z, eta=eta, learn_sigma=learn_sigma,
                                   clip_denoised=clip_denoised)
  return _sample_loop(step, schedule, shape, key, noise, progress)

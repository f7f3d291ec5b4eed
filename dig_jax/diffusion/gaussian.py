"""Gaussian diffusion as pure functions: ADM/DiT schedule, forward process, posterior, losses.

Conventions (as in ADM and DiT):
  * eps prediction; with `learn_sigma` the model output carries 2C channels on the last axis
    (NHWC), eps then v, where v in [-1, 1] interpolates the log-variance between the clipped
    posterior log-variance (v = -1) and log(beta_t) (v = +1) ("learned range").
  * Without `learn_sigma` the variance is fixed-large, [posterior_variance[1], betas[1:]], the
    choice DiT's `create_diffusion` makes when `learn_sigma=False` (and ADM's default).
  * `t` everywhere is an index into the (possibly respaced) schedule; the network receives
    `schedule.timestep_map[t]`, the matching step of the original 1000-step process.
  * Coefficients are computed in float64 numpy and stored as float32, as ADM does.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
  """ADM's linear schedule, scaled so that any step count spans the same noise range."""
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """Per-step coefficient arrays of length `num_timesteps` (float32), plus `timestep_map`."""
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  timestep_map: jax.Array  # int32: schedule index -> timestep fed to the network
  num_timesteps: int = dataclasses.field(metadata=dict(static=True))


def make_schedule(betas, timestep_map=None) -> Schedule:
  """All ADM coefficients for `betas`; `timestep_map` defaults to the identity."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.size < 2:
    raise ValueError(f"betas must be a 1-D array of at least 2 steps, got shape {betas.shape}")
  if not ((betas > 0) & (betas <= 1)).all():
    raise ValueError("betas must lie in (0, 1]")
  n = betas.size
  timestep_map = np.arange(n) if timestep_map is None else np.asarray(timestep_map)
  if timestep_map.shape != (n,):
    raise ValueError(f"timestep_map must have shape ({n},), got {timestep_map.shape}")

  alphas = 1.0 - betas
  ac = np.cumprod(alphas)
  ac_prev = np.append(1.0, ac[:-1])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  return Schedule(
      betas=f32(betas),
      alphas_cumprod=f32(ac),
      alphas_cumprod_prev=f32(ac_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(ac)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ac)),
      sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / ac)),
      sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / ac - 1.0)),
      posterior_variance=f32(post_var),
      # The posterior variance is 0 at t = 0; its log is clipped by reusing the t = 1 value.
      posterior_log_variance_clipped=f32(np.log(np.append(post_var[1], post_var[1:]))),
      posterior_mean_coef1=f32(betas * np.sqrt(ac_prev) / (1.0 - ac)),
      posterior_mean_coef2=f32((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)),
      timestep_map=jnp.asarray(timestep_map, dtype=jnp.int32),
      num_timesteps=n,
  )


def extract(coef: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """coef[t] shaped to broadcast against a batch of rank `ndim`."""
  return coef[t].reshape((-1,) + (1,) * (ndim - 1))


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over every axis but the batch axis."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def q_sample(schedule: Schedule, x0, t, noise):
  """Sample x_t ~ q(x_t | x_0) with the given standard-normal `noise`."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_posterior_mean_variance(schedule: Schedule, x0, xt, t):
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
  mean = (extract(schedule.posterior_mean_coef1, t, xt.ndim) * x0
          + extract(schedule.posterior_mean_coef2, t, xt.ndim) * xt)
  var = extract(schedule.posterior_variance, t, xt.ndim)
  log_var = extract(schedule.posterior_log_variance_clipped, t, xt.ndim)
  return mean, var, log_var


def predict_xstart_from_eps(schedule: Schedule, xt, t, eps):
  """x_0 implied by x_t and the noise eps."""
  return (extract(schedule.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt
          - extract(schedule.sqrt_recipm1_alphas_cumprod, t, xt.ndim) * eps)


def predict_eps_from_xstart(schedule: Schedule, xt, t, x0):
  """The noise eps implied by x_t and x_0."""
  return ((extract(schedule.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt - x0)
          / extract(schedule.sqrt_recipm1_alphas_cumprod, t, xt.ndim))


def p_mean_variance(schedule: Schedule, model_output, xt, t, *, learn_sigma=True,
                    clip_denoised=False):
  """p(x_{t-1} | x_t) from a model output: dict(mean, variance, log_variance, pred_xstart)."""
  channels = xt.shape[-1]
  if learn_sigma:
    if model_output.shape[-1] != 2 * channels:
      raise ValueError(f"learn_sigma needs {2 * channels} output channels, "
                       f"got {model_output.shape[-1]}")
    eps, v = model_output[..., :channels], model_output[..., channels:]
    min_log = extract(schedule.posterior_log_variance_clipped, t, xt.ndim)
    max_log = extract(jnp.log(schedule.betas), t, xt.ndim)
    frac = (v + 1.0) / 2.0
    log_variance = frac * max_log + (1.0 - frac) * min_log
    variance = jnp.exp(log_variance)
  else:
    eps = model_output
    # Fixed-large: beta_t, except at t = 0 where the posterior variance of t = 1 gives a
    # better decoder likelihood than beta_0.
    large = jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]])
    variance = jnp.broadcast_to(extract(large, t, xt.ndim), xt.shape)
    log_variance = jnp.log(variance)
  pred_xstart = predict_xstart_from_eps(schedule, xt, t, eps)
  if clip_denoised:
    pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
  mean, _, _ = q_posterior_mean_variance(schedule, pred_xstart, xt, t)
  return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """The tanh approximation of the standard normal CDF that ADM uses (kept for exact parity)."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """Log-probability (nats) of 8-bit data rescaled to [-1, 1] under a discretised Gaussian.

  Each value owns the bin x +- 1/255; the two extreme bins extend to -inf and +inf.
  """
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(schedule: Schedule, model_output, x0, xt, t):
  """One term of the variational bound, in bits per dimension, per example.

  KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the decoder NLL of x_0 at t = 0.
  """
  true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x0, xt, t)
  out = p_mean_variance(schedule, model_output, xt, t, learn_sigma=True, clip_denoised=False)
  kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
  nll = -mean_flat(discretized_gaussian_log_likelihood(
      x0, out["mean"], 0.5 * out["log_variance"]))
  return jnp.where(t == 0, nll, kl) / math.log(2.0)


def training_losses(schedule: Schedule, model_fn, x0, t, noise, *, learn_sigma=True):
  """DiT's training loss per example: dict(loss, mse, vb).

  `model_fn(x_t, t_model)` with t_model = timestep_map[t]. mse is the mean squared eps error;
  with `learn_sigma`, vb is the variational-bound term with the predicted eps frozen, so it
  trains only the variance ("hybrid" loss of Improved DDPM), unscaled as in DiT.
  """
  xt = q_sample(schedule, x0, t, noise)
  model_output = model_fn(xt, schedule.timestep_map[t])
  channels = x0.shape[-1]
  eps = model_output[..., :channels]
  mse = mean_flat((noise - eps) ** 2)
  if learn_sigma:
    frozen = jnp.concatenate(
        [jax.lax.stop_gradient(eps), model_output[..., channels:]], axis=-1)
    vb = vb_terms_bpd(schedule, frozen, x0, xt, t)
  else:
    vb = jnp.zeros_like(mse)
  return dict(loss=mse + vb, mse=mse, vb=vb)

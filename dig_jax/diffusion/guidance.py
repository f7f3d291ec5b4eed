"""Classifier-free guidance: wrap a class-conditional network into a sampler's `model_fn`."""
from __future__ import annotations

import jax.numpy as jnp


def cfg_model_fn(apply_fn, y, null_class: int, cfg_scale: float, *, guidance_channels=None):
  """model_fn(x, t) -> eps_u + cfg_scale * (eps_c - eps_u) on the guided channels.

  `apply_fn(x, t, y)` is the network (NHWC; 2C output channels when it learns sigma). Both
  halves run in one batched call. Guided are the first `guidance_channels` output channels,
  by default all C eps channels; DiT guides only the first 3 (`guidance_channels=3`). Every
  other channel (including the variance) comes from the conditional pass. `cfg_scale` is a
  number (a Python 1.0 skips the unconditional pass) or a traced scalar, so that one compiled
  sampler serves every scale.
  """
  if isinstance(cfg_scale, (int, float)) and cfg_scale == 1.0:
    return lambda x, t: apply_fn(x, t, y)

  y_null = jnp.full_like(y, null_class)

  def model_fn(x, t):
    out = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                   jnp.concatenate([y, y_null]))
    cond, uncond = jnp.split(out, 2)
    k = x.shape[-1] if guidance_channels is None else guidance_channels
    guided = uncond[..., :k] + cfg_scale * (cond[..., :k] - uncond[..., :k])
    return jnp.concatenate([guided, cond[..., k:]], axis=-1)

  return model_fn

"""The optimizer: AdamW with its learning-rate schedule and optional global-norm clipping.

It runs on whatever tree the train state holds (layout.py: small arrays as one vector); optax's
transforms are elementwise or reduce over every leaf, so the layout changes no update.
"""
from __future__ import annotations

import optax

LR_SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warm-up to the peak rate, then constant or cosine decay to zero at total_steps."""
  lr, warmup = train_config.learning_rate, train_config.warmup_steps
  kind = train_config.get("lr_schedule", "constant")  # runs saved before the option existed
  if kind == "cosine":
    decay_end = max(train_config.total_steps, warmup + 1)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay_end)
  if kind != "constant":
    raise ValueError(f"config.train.lr_schedule={kind!r}; expected one of {LR_SCHEDULES}")
  return optax.linear_schedule(0.0, lr, warmup) if warmup > 0 else optax.constant_schedule(lr)


def make_optimizer(train_config) -> optax.GradientTransformation:
  """AdamW with linear warm-up and the configured decay, and optional global-norm clipping."""
  tx = optax.adamw(learning_rate_schedule(train_config), b1=train_config.get("adam_b1", 0.9),
                   b2=train_config.get("adam_b2", 0.999), weight_decay=train_config.weight_decay)
  if train_config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm), tx)
  return tx

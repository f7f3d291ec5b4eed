"""One optimisation step of the diffusion objective, as a pure function to jit."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dig_jax.diffusion import training_losses
from dig_jax.train.layout import StateLayout


def drop_labels(key, labels, rate: float, null_class: int):
  """Replaces a `rate` fraction of labels with the null class (classifier-free guidance)."""
  return jnp.where(jax.random.bernoulli(key, rate, labels.shape), null_class, labels)


def make_train_step(graphdef, layout: StateLayout, tx, schedule, train_config, *,
                    null_class: int, learn_sigma: bool, base_key):
  """Returns step(state, batch) -> (state, metrics) for a state in `layout`'s running form
  (small arrays as one vector: the gradients come that way too, and Adam, the parameter update
  and the EMA run on the vector).

  Randomness (timesteps, noise, dropped labels) is a function of `base_key` and the step alone,
  so a resumed run draws exactly what an uninterrupted one would.
  """
  ema_decay = train_config.ema_decay
  label_dropout = train_config.label_dropout

  def step(state, batch):
    key = jax.random.fold_in(base_key, state["step"])
    key_t, key_noise, key_drop = jax.random.split(key, 3)
    x0, labels = batch["image"], batch["label"]
    t = jax.random.randint(key_t, (x0.shape[0],), 0, schedule.num_timesteps)
    noise = jax.random.normal(key_noise, x0.shape, x0.dtype)
    labels = drop_labels(key_drop, labels, label_dropout, null_class)

    def loss_fn(parts):
      model = nnx.merge(graphdef, layout.params(parts))
      terms = training_losses(schedule, lambda xt, tt: model(xt, tt, labels), x0, t, noise,
                              learn_sigma=learn_sigma)
      return jnp.mean(terms["loss"]), terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = optax.incremental_update(params, state["ema_params"], step_size=1.0 - ema_decay)
    grad_norm = optax.tree.norm(grads)
    metrics = {"loss": loss, "mse": jnp.mean(terms["mse"]), "vb": jnp.mean(terms["vb"]),
               "grad_norm": grad_norm,
               "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
    new_state = {"step": state["step"] + 1, "params": params, "ema_params": ema,
                 "opt_state": opt_state}
    return new_state, metrics

  return step

"""The train state's layout: small arrays (parameters, EMA, Adam's moments) in one vector update
exactly as optax's per-array AdamW, convert to and from the per-array form checkpoints hold, the
slices' gradient is their concatenation, and a run resumes across layouts."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import tiny_config
from dig_jax.train.loop import train
from dig_jax.train.metrics import read_metrics
from dig_jax.train.layout import ALL, StateLayout, flat_below
from dig_jax.train.optimizer import make_optimizer
from dig_jax.train.state import init_state
from test_train import _restore_params


def _train_config(clip=0.0):
  return ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=2, lr_schedule="cosine", total_steps=10, adam_b1=0.8,
      adam_b2=0.95, weight_decay=0.05, grad_clip_norm=clip))


def _tree(seed, scale=1.0):
  """A parameter-like tree of mixed shapes, random values."""
  keys = jax.random.split(jax.random.key(seed), 4)
  return {"blocks": [{"kernel": scale * jax.random.normal(keys[0], (6, 5)),
                      "bias": scale * jax.random.normal(keys[1], (5,))},
                     {"kernel": scale * jax.random.normal(keys[2], (3, 4, 2))}],
          "scale": scale * jax.random.normal(keys[3], (7,))}


def _optax_adamw(tc):
  """The reference: optax's AdamW written out here, not through make_optimizer."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, tc.warmup_steps,
                                                tc.total_steps)
  tx = optax.adamw(schedule, b1=tc.adam_b1, b2=tc.adam_b2, weight_decay=tc.weight_decay)
  if tc.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(tc.grad_clip_norm), tx)
  return tx


def _run(tx, params, steps=3, layout=None):
  """`steps` AdamW updates with random gradients; with a layout, on its parts."""
  to = layout.parts if layout else (lambda t: t)
  params, state = to(params), tx.init(to(params))
  for i in range(steps):
    updates, state = jax.jit(tx.update)(to(_tree(100 + i, scale=2.0)), state, params)
    params = optax.apply_updates(params, updates)
  return (layout.tree(params) if layout else params), state


def _small_concatenated(tree, below):
  """numpy's concatenation of the leaves under `below` elements, in leaf order."""
  leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
  return np.concatenate([np.ravel(x) for x in leaves if x.size < below])


# below=8: the [5] bias, [7] scale go in the vector, the [6, 5] and [3, 4, 2] kernels do not
@pytest.mark.parametrize("clip,below", [(0.0, ALL), (1.5, ALL), (0.0, 8), (1.5, 8)])
def test_flat_layout_updates_like_optax_per_leaf(clip, below):
  tc = _train_config(clip)
  params = _tree(0)
  layout = StateLayout(params, below)
  want, want_state = _run(_optax_adamw(tc), params)
  got, got_state = _run(make_optimizer(tc), params, layout=layout)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
  assert not np.allclose(np.asarray(jax.tree.leaves(want)[0]), np.asarray(params["blocks"][0]["bias"]))
  # the saved form of the flat moments is optax's per-leaf state
  saved = layout.saved({"opt_state": got_state})["opt_state"]
  assert jax.tree.structure(saved) == jax.tree.structure(want_state)
  for a, b in zip(jax.tree.leaves(want_state), jax.tree.leaves(saved)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("below", [ALL, 8, 0])
def test_saved_form_round_trip_is_exact(below):
  tc = _train_config()
  tx = make_optimizer(tc)
  params = _tree(1)
  per_array = init_state(params, tx)
  per_array["ema_params"] = _tree(3)
  _, per_array["opt_state"] = _run(tx, params, steps=2)
  layout = StateLayout(jax.eval_shape(lambda: params), below)  # shapes are enough
  running = layout.running(per_array)
  for part in (running["params"], running["ema_params"], running["opt_state"][0].mu):
    assert set(part) == {"flat", "large"}
  if below:
    np.testing.assert_array_equal(np.asarray(running["ema_params"]["flat"]),
                                  _small_concatenated(per_array["ema_params"], below))
    np.testing.assert_array_equal(np.asarray(running["opt_state"][0].nu["flat"]),
                                  _small_concatenated(per_array["opt_state"][0].nu, below))
  large = [x.shape for x in jax.tree.leaves(params) if x.size >= below]
  assert [x.shape for x in running["params"]["large"]] == large
  back = layout.saved(running)
  assert jax.tree.structure(back) == jax.tree.structure(per_array)
  for a, b in zip(jax.tree.leaves(per_array), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("below", [ALL, 8])
def test_gradient_of_the_slices_is_their_concatenation(below):
  params = _tree(4)
  weights = _tree(5)
  loss = lambda tree: sum(jnp.sum(jnp.sin(x) * w) for x, w in
                          zip(jax.tree.leaves(tree), jax.tree.leaves(weights)))
  layout = StateLayout(params, below)
  parts = layout.parts(params)
  grads = jax.grad(lambda p: loss(layout.params(p)))(parts)
  want = jax.grad(loss)(params)  # per array, as the model's own gradient
  np.testing.assert_allclose(np.asarray(grads["flat"]), _small_concatenated(want, below),
                             rtol=1e-6)
  big = [np.asarray(x) for x in jax.tree.leaves(want) if x.size >= below]
  for a, b in zip(big, grads["large"]):
    np.testing.assert_allclose(np.asarray(b), a, rtol=1e-6)
  # one concatenation, not a zero-padded vector per slice
  hlo = jax.jit(jax.grad(lambda p: loss(layout.params(p)))).lower(parts).as_text()
  assert "stablehlo.concatenate" in hlo and "stablehlo.pad" not in hlo


def test_layout_thresholds_and_errors():
  assert flat_below("auto") == 2**20  # float32 arrays under 4 MiB
  assert flat_below("auto", 4, fsdp_min_size_mb=1.0) == 2**18  # those fsdp leaves replicated
  assert flat_below("auto", 4, fsdp_min_size_mb=16.0) == 2**20
  assert flat_below("flat") == ALL and flat_below("per_leaf") == 0
  assert flat_below("flat", 4, fsdp_min_size_mb=16.0) == 2**22  # only what stays replicated
  assert flat_below("per_leaf", 4) == 0
  with pytest.raises(ValueError, match="'flatten'.*expected one of"):
    flat_below("flatten")


def test_resume_across_layouts_matches_uninterrupted(tmp_path):
  """Checkpoints hold the per-leaf form: a per-leaf run resumes flat (and back) exactly."""
  straight, switched = str(tmp_path / "straight"), str(tmp_path / "switched")
  config = lambda steps, layout: tiny_config(total_steps=steps, checkpoint_every=2, log_every=1,
                                             optimizer_layout=layout)
  train(config(6, "per_leaf"), straight)
  train(config(2, "per_leaf"), switched)
  train(config(4, "flat"), switched)
  assert train(config(6, "per_leaf"), switched) == 6
  assert [m["step"] for m in read_metrics(switched)] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([m["loss"] for m in read_metrics(switched)],
                             [m["loss"] for m in read_metrics(straight)], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(_restore_params(straight)),
                  jax.tree.leaves(_restore_params(switched))):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)

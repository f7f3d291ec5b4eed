"""Is a generated digit the digit it was asked for? Accuracy of a classifier trained on real ones.

  python -m dig_jax.evaluate.digits --npz samples.npz

A small MLP is trained (seconds on a CPU) on 4,500 of the bundled real digits; its accuracy on
the other 500 real digits is the ceiling against which the accuracy on generated digits (whose
requested labels are in the npz's arr_1) is read.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from dig_jax.data.pipeline import pad_to_size
from dig_jax.data.sources import load_mnist_5k

HELD_OUT_PER_CLASS = 50


def real_digits(size: int = 32):
  """(train_x, train_y, test_x, test_y): padded to size x size, flattened, in [-1, 1]."""
  images, labels = load_mnist_5k()
  x = np.stack([pad_to_size(im, (size, size)) for im in images]).astype(np.float32) / 127.5 - 1
  x = x.reshape(len(x), -1)
  test = np.zeros(len(labels), bool)
  for c in range(10):  # the first HELD_OUT_PER_CLASS digits of every class are held out
    test[np.flatnonzero(labels == c)[:HELD_OUT_PER_CLASS]] = True
  return x[~test], labels[~test], x[test], labels[test]


def _logits(params, x):
  h = jax.nn.relu(x @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def train_classifier(x, y, *, hidden: int = 256, epochs: int = 15, batch: int = 128, seed: int = 0):
  key1, key2 = jax.random.split(jax.random.key(seed))
  d = x.shape[1]
  params = {"w1": jax.random.normal(key1, (d, hidden)) * np.sqrt(2 / d), "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(key2, (hidden, 10)) * np.sqrt(1 / hidden), "b2": jnp.zeros(10)}
  tx = optax.adamw(1e-3, weight_decay=1e-4)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(_logits(p, xb), yb).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(x))
    for start in range(0, len(x) - batch + 1, batch):
      idx = order[start:start + batch]
      params, opt_state = step(params, opt_state, x[idx], y[idx])
  return params


def predict(params, x) -> np.ndarray:
  return np.asarray(jnp.argmax(_logits(params, jnp.asarray(x)), axis=-1))


def evaluate_samples(images_uint8: np.ndarray, labels: np.ndarray) -> dict:
  """Accuracy on held-out real digits and on generated ones, overall and per requested class."""
  if images_uint8.ndim != 4 or images_uint8.shape[-1] != 1:
    raise ValueError(f"expected grey digits [N, H, W, 1], got {images_uint8.shape}")
  size = images_uint8.shape[1]
  train_x, train_y, test_x, test_y = real_digits(size)
  params = train_classifier(train_x, train_y)
  fake = images_uint8.reshape(len(images_uint8), -1).astype(np.float32) / 127.5 - 1
  pred = predict(params, fake)
  per_class = {int(c): float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)}
  return {"real_heldout_accuracy": float(np.mean(predict(params, test_x) == test_y)),
          "generated_accuracy": float(np.mean(pred == labels)),
          "generated_per_class": per_class, "num_generated": int(len(labels))}


flags.DEFINE_string("npz", None, "Samples written by sample.py --npz (arr_0 images, arr_1 labels).")
flags.DEFINE_string("json", None, "Also write the result to this JSON file.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  if not flags.FLAGS.npz:
    sys.exit("error: --npz is required (write one with sample.py --npz FILE)")
  if not os.path.isfile(flags.FLAGS.npz):
    sys.exit(f"error: --npz={flags.FLAGS.npz}: no such file (write one with sample.py --npz)")
  with np.load(flags.FLAGS.npz) as f:
    images, labels = f["arr_0"], f["arr_1"]
  try:
    result = evaluate_samples(images, labels)
  except ValueError as e:
    sys.exit(f"error: {e}")
  print(f"classifier accuracy on held-out real digits: {result['real_heldout_accuracy']:.1%}")
  print(f"accuracy of generated digits (requested class recognised): "
        f"{result['generated_accuracy']:.1%} of {result['num_generated']}")
  print("per class: " + ", ".join(f"{c}: {a:.0%}" for c, a in result["generated_per_class"].items()))
  if flags.FLAGS.json:
    with open(flags.FLAGS.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)

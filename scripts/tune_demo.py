"""Tunes the CPU demo (configs/digits.py) by sweeping recipe variants, fast, on a GPU.

How well the demo learns depends on the step count, not on the hardware, so a GPU can answer
"how many recognisable digits after N steps?" for many variants in minutes; the CPU cost of each
variant is its step count times its CPU step time (measured separately on two cores).

  python scripts/tune_demo.py --out results.jsonl --worker 0 --num_workers 3 \\
      --variants 'base:{}' 'lr4e-3:{"train.learning_rate": 4e-3}'

Each variant trains with train.py's own loop from configs/digits.py plus its overrides, keeping
a checkpoint every --eval_every steps; every checkpoint is then sampled (DDPM, the demo's step
count) at several guidance scales and scored by the digits classifier (dig_jax.evaluate.digits).
One JSON line per (variant, step, cfg_scale) goes to --out.
"""
import functools
import json
import os
import shutil
import time

from absl import app, flags, logging

flags.DEFINE_multi_string("variants", [], "name:JSON overrides of configs/digits.py, e.g. "
                          "'fast:{\"train.learning_rate\": 4e-3}'.")
flags.DEFINE_string("variants_file", None, "A file of such variants, one per line ('#' comments).")
flags.DEFINE_string("out", "tune_demo.jsonl", "JSON lines written here.")
flags.DEFINE_string("workdir_root", "/tmp/tune_demo", "Training runs go here (deleted after).")
flags.DEFINE_integer("eval_every", 500, "Evaluate every this many steps ...")
flags.DEFINE_integer("eval_from", 2000, "... from this step on.")
flags.DEFINE_list("cfg_scales", ["2", "4", "6"], "Guidance scales evaluated.")
flags.DEFINE_integer("num_per_class", 50, "Generated digits per class per evaluation.")
flags.DEFINE_integer("worker", 0, "This process runs variants[worker::num_workers].")
flags.DEFINE_integer("num_workers", 1, "Processes sharing the variant list.")


def guided_ddpm(graphdef, schedule, params, y, key, cfg_scale):
  """The demo's sampler with a traced guidance scale: one compilation serves every scale."""
  from flax import nnx

  from dig_jax.diffusion import cfg_model_fn, ddpm_sample
  net = nnx.merge(graphdef, params)
  model_fn = cfg_model_fn(net, y, net.num_classes, cfg_scale)
  return ddpm_sample(model_fn, schedule, (y.shape[0], *net.image_size, net.in_channels), key)


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from configs import digits
  from dig_jax import sample as S
  from dig_jax.diffusion import create_schedule
  from dig_jax.evaluate.digits import predict, real_digits, train_classifier
  from dig_jax.train.loop import train

  logging.set_verbosity(logging.ERROR)  # Orbax is chatty at INFO
  f = flags.FLAGS
  train_x, train_y, test_x, test_y = real_digits(32)
  classifier = train_classifier(train_x, train_y)
  print(f"classifier: {np.mean(predict(classifier, test_x) == test_y):.1%} on held-out real digits")
  labels = np.repeat(np.arange(10, dtype=np.int32), f.num_per_class)

  variants = list(f.variants)
  if f.variants_file:
    with open(f.variants_file) as fh:
      variants += [line.strip() for line in fh if line.strip() and not line.startswith("#")]
  for spec in variants[f.worker::f.num_workers]:
    name, _, overrides = spec.partition(":")
    config = digits.get_config()
    config.update_from_flattened_dict(json.loads(overrides or "{}"))
    config.train.checkpoint_every = f.eval_every
    config.train.keep_checkpoints = 100
    workdir = os.path.join(f.workdir_root, name)
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.time()
    train(config, workdir)
    train_s = time.time() - start

    schedule = create_schedule(config.diffusion.num_timesteps, config.sample.steps)
    eval_steps = sorted({*range(f.eval_from, config.train.total_steps + 1, f.eval_every),
                         config.train.total_steps})
    sample = None
    for step in eval_steps:
      _, model, _ = S.load_run(workdir, step)
      graphdef, params = nnx.split(model)
      if sample is None:
        sample = jax.jit(functools.partial(guided_ddpm, graphdef, schedule))
      for cfg in map(float, f.cfg_scales):
        images = S.to_uint8(np.asarray(sample(params, jnp.asarray(labels), jax.random.key(1), cfg)))
        pred = predict(classifier, images.reshape(len(images), -1).astype(np.float32) / 127.5 - 1)
        row = {"variant": name, "overrides": overrides, "step": step, "cfg_scale": cfg,
               "accuracy": float(np.mean(pred == labels)),
               "worst_class": float(min(np.mean(pred[labels == c] == c) for c in range(10))),
               "train_seconds": round(train_s, 1)}
        print(json.dumps(row), flush=True)
        with open(f.out, "a") as fh:
          fh.write(json.dumps(row) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)

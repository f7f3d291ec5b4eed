"""Run by test_sample.py in a subprocess with 8 fake CPU devices: samples 8 images of a run
(argv[1]) with one image per device per batch and saves them to argv[2]; prints JSON with the
device count and how the sampled batch was laid out."""
import json
import sys

import jax
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from dig_jax.sample import generate, images_per_batch, load_run  # noqa: E402

LABELS = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 3], np.int32)

if __name__ == "__main__":
  workdir, out = sys.argv[1], sys.argv[2]
  _, model, _ = load_run(workdir)
  images = generate(model, LABELS, num_timesteps=1000, sampler="ddpm", steps=3, cfg_scale=2.0,
                    seed=5, batch_size=1)
  np.save(out, images)
  print(json.dumps({"devices": jax.device_count(),
                    "per_batch": images_per_batch(len(LABELS), 1)}))

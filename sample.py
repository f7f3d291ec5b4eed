"""Generate class-conditional images from a training run's checkpoint.

  python sample.py --workdir workdirs/digits --classes all --num_per_class 8 --out grid.png
  python sample.py --workdir RUN --step 400000 --classes 1,7,9 --cfg_scale 4 --sampler ddim \\
      --steps 50 --npz samples.npz

Defaults for --cfg_scale, --sampler and --steps come from the run's config (config.sample).
Writes a PNG grid with one row per class (at most 32 classes x 16 images) and, with --npz, all
the images as uint8 NHWC (arr_0) with their labels (arr_1), the layout the ADM evaluator and
`python -m dig_jax.evaluate.fid` read. Batches of --batch_size images per device run on every
local device at once. Runs trained on VAE latents (configs/imagenet.py) are decoded to pixels
with the VAE at --vae (default: config.vae.path).

With --npz, finished batches are also kept in the folder <npz>.partial (every --save_every_s
seconds, and when interrupted by Ctrl-C or SIGTERM); the same command run again continues from
there, and only the batches since the last save are held in memory.
For FID-50K: --classes all --num_per_class 50 --npz samples.npz. On several hosts (a TPU pod,
a GPU cluster), run the same command with --distributed on each: every batch is split over all
their devices, and process 0 writes the grid and the npz (on a filesystem all processes read).
"""
import os
import signal
import sys

from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "Training run directory (holds checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step to load; default: the latest.")
flags.DEFINE_string("classes", "all", "Class ids, comma-separated, or 'all'. Without --npz "
                    "only the classes the grid shows (the first 32) are sampled.")
flags.DEFINE_integer("num_per_class", 8, "Images per class (one grid row per class).")
flags.DEFINE_float("cfg_scale", None, "Classifier-free guidance scale (1.0 = off); "
                   "default: the run's config.sample.cfg_scale.")
flags.DEFINE_enum("sampler", None, ["ddpm", "ddim"], "Sampler; default: the run's config.")
flags.DEFINE_integer("steps", None, "Respaced sampling steps; default: the run's config.")
flags.DEFINE_float("eta", 0.0, "DDIM eta (0 = deterministic).")
flags.DEFINE_integer("guidance_channels", None, "Guide only the first N output channels "
                     "(DiT's quirk is 3); default: all channels.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("batch_size", 64, "Images generated per device batch.")
flags.DEFINE_bool("ema", True, "Use the EMA weights (--noema for the raw ones).")
flags.DEFINE_string("out", None, "PNG grid path; default: <workdir>/samples/step_<N>.png.")
flags.DEFINE_string("npz", None, "Also write the images and labels to this .npz file "
                    "(resumable: see <npz>.partial).")
flags.DEFINE_float("save_every_s", 300.0, "With --npz: seconds between saves of the finished "
                   "batches to the folder <npz>.partial.")
flags.DEFINE_string("vae", None, "Latent-space runs: the SD VAE folder (config.json + "
                    "diffusion_pytorch_model.safetensors) that decodes samples to pixels; "
                    "default: the run's config.vae.path.")
flags.DEFINE_bool("distributed", False, "Several processes (hosts) sample together: "
                  "jax.distributed.initialize() first; process 0 writes the files.")
flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port of process 0 "
                    "(default: detected, e.g. on TPU pods and SLURM).")
flags.DEFINE_integer("num_processes", None, "With --distributed: processes in all.")
flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")
flags.mark_flag_as_required("workdir")


def _interrupt_on_sigterm(signum, frame):
  raise KeyboardInterrupt(f"signal {signum}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # Orbax warns about read-only managers
  import jax
  import numpy as np
  f = flags.FLAGS
  if f.distributed:  # before any other JAX call
    cluster = dict(coordinator_address=f.coordinator_address, num_processes=f.num_processes,
                   process_id=f.process_id)
    jax.distributed.initialize(**{k: v for k, v in cluster.items() if v is not None})
  writer = jax.process_index() == 0
  from dig_jax import sample as S
  from dig_jax.evaluate.npz_array import NpzArray
  from dig_jax.partial_samples import PartialSamples
  if f.num_per_class < 1:
    sys.exit(f"error: --num_per_class={f.num_per_class}; expected >= 1")
  if f.step is not None and f.step < 0:
    sys.exit(f"error: --step={f.step}; expected a checkpoint step >= 0")
  if f.batch_size < 1:
    sys.exit(f"error: --batch_size={f.batch_size}; expected >= 1")
  store = None
  signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
  try:
    config, model, step = S.load_run(f.workdir, f.step, ema=f.ema)
    classes = S.parse_classes(f.classes, model.num_classes)
    vae = S.load_decoder(config, f.vae)  # before sampling: a bad path fails fast
    labels = np.repeat(np.asarray(classes, np.int32), f.num_per_class)
    settings = dict(
        sampler=f.sampler or config.sample.sampler, steps=f.steps or config.sample.steps,
        cfg_scale=config.sample.cfg_scale if f.cfg_scale is None else f.cfg_scale,
        eta=f.eta, seed=f.seed, guidance_channels=f.guidance_channels)
    first_batch, done = 0, []
    first = min(len(classes), S.GRID_MAX_ROWS) * f.num_per_class  # images the grid shows
    if f.npz:
      store = PartialSamples(
          f.npz, labels, S.images_per_batch(len(labels), f.batch_size),
          dict(workdir=os.path.abspath(f.workdir), step=step, ema=f.ema,
               vae=None if vae is None else os.path.abspath(f.vae or config.vae.path),
               **settings), save_every_s=f.save_every_s, writer=writer)
      first_batch = store.resume()  # on every process: --npz is on a filesystem all can read
      if first_batch and writer:
        print(f"Resuming from {store.partial_path}: {store.count} of {len(labels)} images done")
    for _, x in S.generate_batches(model, labels, num_timesteps=config.diffusion.num_timesteps,
                                   batch_size=f.batch_size, learn_sigma=config.model.learn_sigma,
                                   first_batch=first_batch, count=None if store else first,
                                   **settings):
      if vae is not None:
        x = S.decode_latents(vae, x, config.data.latent_scale, batch_size=f.batch_size,
                             progress=False)
      if writer:  # without --npz only the grid's images are sampled (count above)
        (store.add if store else done.append)(S.to_uint8(x))
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:
    if not writer:
      sys.exit("interrupted (process 0 keeps the images)")
    if store is None or not store.count:
      sys.exit("interrupted: nothing saved")
    store.save()
    sys.exit(f"interrupted: {store.count} of {len(labels)} images saved in "
             f"{store.partial_path}; run the same command again to continue")
  if not writer:
    return
  if store:
    store.finish()
    images = next(NpzArray(f.npz, "arr_0").batches(first))  # not all 50,000 of an FID run
  else:
    images = np.concatenate(done)[:first]
  out = f.out or os.path.join(f.workdir, "samples", f"step_{step}.png")
  grid, rows = S.grid_subset(images, len(classes), f.num_per_class)
  S.save_grid(grid, rows, out)
  cols = len(grid) // rows
  shown = "" if len(grid) == len(labels) else f" (the first {cols} images of {rows} classes)"
  print(f"Wrote a {rows}x{cols} grid from step {step} to {out}{shown}")
  if f.npz:
    print(f"Wrote {len(labels)} images and labels to {f.npz}")


if __name__ == "__main__":
  app.run(main)

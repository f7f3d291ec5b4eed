"""Generate class-conditional images from a training run's checkpoint.

  python sample.py --workdir workdirs/digits --classes all --num_per_class 8 --out grid.png
  python sample.py --workdir RUN --step 400000 --classes 1,7,9 --cfg_scale 4 --sampler ddim \\
      --steps 50 --npz samples.npz

Defaults for --cfg_scale, --sampler and --steps come from the run's config (config.sample).
Writes a PNG grid with one row per class and, with --npz, the images as uint8 NHWC (arr_0) with
their labels (arr_1), the layout the ADM evaluator reads. Runs trained on VAE latents
(configs/imagenet.py) are decoded to pixels with the VAE at --vae (default: config.vae.path).
"""
import os
import sys

from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "Training run directory (holds checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step to load; default: the latest.")
flags.DEFINE_string("classes", "all", "Class ids, comma-separated, or 'all'.")
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
flags.DEFINE_string("npz", None, "Also write the images and labels to this .npz file.")
flags.DEFINE_string("vae", None, "Latent-space runs: the SD VAE folder (config.json + "
                    "diffusion_pytorch_model.safetensors) that decodes samples to pixels; "
                    "default: the run's config.vae.path.")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # Orbax warns about read-only managers
  import numpy as np
  from dig_jax import sample as S
  f = flags.FLAGS
  if f.num_per_class < 1:
    sys.exit(f"error: --num_per_class={f.num_per_class}; expected >= 1")
  if f.step is not None and f.step < 0:
    sys.exit(f"error: --step={f.step}; expected a checkpoint step >= 0")
  try:
    config, model, step = S.load_run(f.workdir, f.step, ema=f.ema)
    classes = S.parse_classes(f.classes, model.num_classes)
    vae = S.load_decoder(config, f.vae)  # before sampling: a bad path fails fast
    labels = np.repeat(np.asarray(classes, np.int32), f.num_per_class)
    images = S.generate(
        model, labels, num_timesteps=config.diffusion.num_timesteps,
        sampler=f.sampler or config.sample.sampler, steps=f.steps or config.sample.steps,
        cfg_scale=config.sample.cfg_scale if f.cfg_scale is None else f.cfg_scale,
        eta=f.eta, seed=f.seed, batch_size=f.batch_size, guidance_channels=f.guidance_channels,
        learn_sigma=config.model.learn_sigma)
    if vae is not None:
      images = S.decode_latents(vae, images, config.data.latent_scale, batch_size=f.batch_size)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  images = S.to_uint8(images)
  out = f.out or os.path.join(f.workdir, "samples", f"step_{step}.png")
  S.save_grid(images, len(classes), out)
  print(f"Wrote a {len(classes)}x{f.num_per_class} grid from step {step} to {out}")
  if f.npz:
    np.savez(f.npz, arr_0=images, arr_1=labels)
    print(f"Wrote {len(images)} images and labels to {f.npz}")


if __name__ == "__main__":
  app.run(main)

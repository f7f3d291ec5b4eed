"""Class-conditional sampling from a trained run: load a checkpoint, generate, write grid / npz."""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image
from tqdm import tqdm

from dig_jax.diffusion import cfg_model_fn, create_schedule, ddim_sample, ddpm_sample
from dig_jax.train import sharding
from dig_jax.train.checkpoint import Checkpointer, abstract_like, checkpoint_dir
from dig_jax.train.optimizer import make_optimizer
from dig_jax.train.state import abstract_model, init_state
from dig_jax.vae import load_vae

SAMPLERS = ("ddpm", "ddim")


def load_run(workdir: str, step: int | None = None, *, ema: bool = True):
  """(config, model, step) of a checkpoint in `workdir`: the latest one unless `step` is given."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir!r} does not exist; pass the --workdir of a "
                            f"training run")
  if not os.path.isdir(checkpoint_dir(workdir)):
    raise FileNotFoundError(f"no checkpoints in {workdir!r} (expected {checkpoint_dir(workdir)}/"
                            f"<step>); train first: python train.py --config ... --workdir {workdir}")
  ckpt = Checkpointer(workdir, read_only=True)
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir(workdir)}")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise ValueError(f"no checkpoint at step {step} in {workdir!r}; available steps: {steps}")
  config = ml_collections.ConfigDict(ckpt.read_meta(step)["config"])
  # Shapes only: nothing is initialised just to be overwritten by the restore.
  graphdef, params = abstract_model(config)
  state = jax.eval_shape(lambda p: init_state(p, make_optimizer(config.train)), params)
  abstract = abstract_like(state, sharding.state_shardings(state, sharding.make_mesh()))
  params = ckpt.restore_params(step, abstract, ema=ema)
  ckpt.close()
  return config, nnx.merge(graphdef, params), step


def parse_classes(text: str, num_classes: int) -> list[int]:
  """"all", "3" or "1,7,9" -> class ids, each checked against [0, num_classes)."""
  if text == "all":
    return list(range(num_classes))
  try:
    classes = [int(c) for c in text.split(",") if c.strip()]
  except ValueError:
    raise ValueError(f"--classes={text!r}; expected 'all' or comma-separated integers") from None
  bad = [c for c in classes if not 0 <= c < num_classes]
  if not classes or bad:
    raise ValueError(f"--classes={text!r}: class ids must be in [0, {num_classes - 1}] "
                     f"(this model has {num_classes} classes)")
  return classes


def images_per_batch(num_images: int, batch_size: int) -> int:
  """Images per sampling batch: `batch_size` per device, over every device (of every process);
  a request smaller than one such batch is not padded up to it."""
  devices = jax.device_count()
  return min(batch_size, -(-num_images // devices)) * devices


def generate_batches(model, labels: np.ndarray, *, num_timesteps: int, sampler: str = "ddpm",
                     steps: int = 250, cfg_scale: float = 1.5, eta: float = 0.0, seed: int = 0,
                     batch_size: int = 64, guidance_channels: int | None = None,
                     learn_sigma: bool = True, first_batch: int = 0, count: int | None = None):
  """Yields (batch index, float32 NHWC samples in the model's range [-1, 1]) for `labels`, in
  batches of `batch_size` images per device, each batch split over every device of every
  process (parameters replicated; every process gets the whole batch). Batch i draws its noise
  from fold_in(key(seed), i), so a run resumed at `first_batch` continues as it would have.
  The last batch is padded to one compiled shape. `count`: stop after the batches holding the
  first `count` labels (batched as for all of them, so those images are the same)."""
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler {sampler!r}; expected one of {SAMPLERS}")
  if steps < 1 or steps > num_timesteps:
    raise ValueError(f"steps={steps}; expected 1..{num_timesteps}")
  if cfg_scale < 1.0:
    raise ValueError(f"cfg_scale={cfg_scale}; expected >= 1.0 (1.0 disables guidance)")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}; expected >= 1")
  schedule = create_schedule(num_timesteps, steps)
  shape = (*model.image_size, model.in_channels)
  mesh = sharding.make_mesh()
  per_batch = images_per_batch(len(labels), batch_size)
  graphdef, params = nnx.split(model)
  params = jax.device_put(params, sharding.replicated(mesh))

  @functools.partial(jax.jit, out_shardings=sharding.batch_sharding(mesh))
  def sample_batch(params, y, key):
    net = nnx.merge(graphdef, params)
    model_fn = cfg_model_fn(net, y, model.num_classes, cfg_scale,
                            guidance_channels=guidance_channels)
    kwargs = dict(learn_sigma=learn_sigma)
    if sampler == "ddim":
      return ddim_sample(model_fn, schedule, (y.shape[0], *shape), key, eta=eta, **kwargs)
    return ddpm_sample(model_fn, schedule, (y.shape[0], *shape), key, **kwargs)

  wanted = len(labels) if count is None else min(count, len(labels))
  batches = range(first_batch, -(-wanted // per_batch))
  for i in tqdm(batches, desc=f"sampling ({sampler}, {steps} steps, {mesh.size} device"
                f"{'s' if mesh.size > 1 else ''})", unit="batch", initial=first_batch,
                total=len(batches) + first_batch):
    y = labels[i * per_batch:(i + 1) * per_batch]
    padded = np.concatenate([y, np.zeros(per_batch - len(y), y.dtype)])
    y_sharded = jax.make_array_from_callback(padded.shape, sharding.batch_sharding(mesh),
                                             lambda index: padded[index])
    with jax.set_mesh(mesh):  # the Pallas kernels run per device shard (batch_sharding.py)
      x = sample_batch(params, y_sharded, jax.random.fold_in(jax.random.key(seed), i))
    if jax.process_count() > 1:  # every process gets the whole batch
      x = multihost_utils.process_allgather(x, tiled=True)
    yield i, np.asarray(x, np.float32)[:len(y)]


def generate(model, labels: np.ndarray, **kwargs) -> np.ndarray:
  """All of `generate_batches` at once: float32 NHWC in the model's data range ([-1, 1])."""
  return np.concatenate([x for _, x in generate_batches(model, labels, **kwargs)])


def load_decoder(config, vae_path: str | None = None):
  """For a latent-space run (its config has a `vae` section): the VAE that maps its samples to
  pixels, from `vae_path` or else config.vae.path. None for a pixel-space run."""
  if "vae" not in config:
    return None
  path = vae_path or config.vae.path
  if not path:
    raise ValueError("this run trains in latent space; pass --vae with the SD VAE folder "
                     "(config.json + diffusion_pytorch_model.safetensors) to decode its samples")
  vae, vae_config = load_vae(path, dtype=jnp.dtype(config.vae.dtype))
  if vae_config.latent_channels != config.data.channels:
    raise ValueError(f"the VAE at {path!r} has {vae_config.latent_channels} latent channels; "
                     f"the run's model makes {config.data.channels}")
  return vae


def decode_latents(vae, latents: np.ndarray, scale: float, *, batch_size: int = 16,
                   progress: bool = True) -> np.ndarray:
  """Model-space latents (VAE latents * `scale`) -> float32 NHWC pixels, about [-1, 1]."""
  graphdef, params = nnx.split(vae)
  out = []
  for start in tqdm(range(0, len(latents), batch_size), desc="decoding with the VAE",
                    unit="batch", disable=not progress):
    z = latents[start:start + batch_size]
    pad = np.zeros((batch_size - len(z), *z.shape[1:]), z.dtype)  # one compiled shape
    out.append(np.asarray(_decode(graphdef, params, np.concatenate([z, pad]), scale),
                          np.float32)[:len(z)])
  return np.concatenate(out)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decode(graphdef, params, z, scale):
  # module level: sample.py decodes every sampling batch, and compiles this once
  return nnx.merge(graphdef, params).decode(z / scale)


def to_uint8(images: np.ndarray) -> np.ndarray:
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


GRID_MAX_ROWS, GRID_MAX_COLUMNS = 32, 16  # a readable PNG, whatever the number of samples


def grid_subset(images: np.ndarray, num_classes: int, per_class: int) -> tuple[np.ndarray, int]:
  """(images, rows) of the grid: the first GRID_MAX_COLUMNS images of each of the first
  GRID_MAX_ROWS classes of a class-major sample set."""
  rows, cols = min(num_classes, GRID_MAX_ROWS), min(per_class, GRID_MAX_COLUMNS)
  grid = images[:rows * per_class].reshape(rows, per_class, *images.shape[1:])[:, :cols]
  return grid.reshape(rows * cols, *images.shape[1:]), rows


def save_grid(images_uint8: np.ndarray, rows: int, path: str, *, pad: int = 2):
  """Writes a PNG grid, `rows` rows (one per class), images in row-major order."""
  n, h, w, c = images_uint8.shape
  cols = -(-n // rows)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images_uint8):
    r, col = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)

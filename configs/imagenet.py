"""Class-conditional ImageNet-1k in the latent space of the SD VAE (sd-vae-ft-ema): the paper's setup.

    # 1. once: encode ImageNet (TFDS imagenet2012 prepared as ArrayRecord, or images=imagefolder)
    python -m dig_jax.tools.cache_latents --config configs/imagenet.py:res=256 --out /data/in256 \\
        --config.data.images.path=/data/tensorflow_datasets --config.vae.path=/models/sd-vae-ft-ema
    # 2. train on the cached latents
    python train.py --config configs/imagenet.py:model=DiG-XL/2,res=256 --workdir runs/dig_xl2_256 \\
        --config.data.path=/data/in256 --config.vae.path=/models/sd-vae-ft-ema
    # a CPU smoke run of the same code path on a tiny cache (64 px, 2 layers, 4 steps)
    python train.py --config configs/imagenet.py:model=DiG-S/2,runlocal --workdir /tmp/smoke \\
        --config.data.path=CACHE --config.data.num_classes=N

Arguments: model= DiG-{S,B,L,XL}/{2,4,8} or DiT-..., res= pixel size (256 and 512 as in the paper;
1024-2048 for the high-resolution setting), images= tfds | imagefolder (what cache_latents
reads), runlocal (shrinks everything).

The recipe is the paper's (DiT/ADM, see configs/common.py): AdamW 1e-4, batch 256, EMA 0.9999,
400K steps, 1000-step linear schedule, learned sigma, latents scaled by 0.18215, 250-step DDPM
and guidance 1.5 for FID. No high-resolution recipe was published: at res >= 1024 this config
computes in bfloat16 with batch 64 (activation memory grows with the token count, (res/16)^2).
"""
from ml_collections import config_dict

from configs import common

HIGH_RES = 1024


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  args = common.parse_arg(arg, model="DiG-XL/2", res=256, images="tfds", runlocal=False)
  if args.res % 8:
    raise ValueError(f"res={args.res}: the SD VAE needs a multiple of 8 pixels")
  if args.images not in ("tfds", "imagefolder"):
    raise ValueError(f"images={args.images!r}; expected 'tfds' or 'imagefolder'")
  config = common.base_config()
  config.model.name = args.model

  # What the trainer reads: the latent cache (dig_jax/data/latents.py).
  config.data.name = "latents"
  config.data.path = config_dict.placeholder(str)     # the cache directory (--out of cache_latents)
  config.data.pixel_size = args.res                   # images are ADM-center-cropped to this
  config.data.image_size = args.res // 8              # what the model sees: 8x downsampled latents
  config.data.channels = 4
  config.data.num_classes = 1000
  config.data.latent_scale = 0.18215                  # latent = VAE posterior sample * scale
  # What cache_latents encodes: a TFDS dataset (path = TFDS data_dir, None for its default) or a
  # folder with one sub-folder per class (path = the folder, e.g. ILSVRC2012's train/).
  config.data.images = config_dict.ConfigDict()
  config.data.images.name = args.images
  config.data.images.path = config_dict.placeholder(str)
  config.data.images.tfds_name = "imagenet2012"
  config.data.images.split = "train"

  # The SD VAE: a diffusers folder with config.json + diffusion_pytorch_model.safetensors, used by
  # cache_latents to encode and by sample.py to decode.
  config.vae = config_dict.ConfigDict()
  config.vae.path = config_dict.placeholder(str)
  config.vae.dtype = "float32"

  if args.res >= HIGH_RES:
    config.model.dtype = "bfloat16"
    config.train.global_batch_size = 64

  if args.runlocal:  # a smoke run on a tiny cache: 64 px (8x8 latents), a 2-layer model, 4 steps
    config.data.pixel_size = 64
    config.data.image_size = 8
    common.shrink_for_runlocal(config)
  return config

"""configs/imagenet.py: every model and resolution validates, the paper's recipe is the default."""
import pytest

import configs.imagenet
from dig_jax.models.registry import SIZES
from dig_jax.train.validate import ConfigError, check_config


@pytest.mark.parametrize("model,res", [("DiG-S/2", 256), ("DiG-B/4", 256), ("DiG-L/2", 512),
                                       ("DiG-XL/2", 512), ("DiT-XL/2", 256), ("DiT-S/8", 512),
                                       ("DiG-XL/2", 1024), ("DiG-S/2", 2048), ("DiT-B/2", 1536)])
def test_models_and_resolutions_validate(model, res):
  config = configs.imagenet.get_config(f"model={model},res={res}")
  check_config(config)  # builds the model abstractly: name, sizes, patch divisibility
  assert config.model.name == model and config.data.pixel_size == res
  assert config.data.image_size == res // 8 and config.data.channels == 4
  assert (config.model.dtype, config.train.global_batch_size) == (
      ("bfloat16", 64) if res >= 1024 else ("float32", 256))


def test_paper_recipe_is_the_default():
  c = configs.imagenet.get_config()
  assert c.model.name == "DiG-XL/2" and c.model.depth is None  # the named size, not shrunk
  assert (c.data.name, c.data.pixel_size, c.data.image_size, c.data.num_classes) == (
      "latents", 256, 32, 1000)
  assert c.data.latent_scale == 0.18215
  assert (c.data.images.name, c.data.images.tfds_name, c.data.images.split) == (
      "tfds", "imagenet2012", "train")
  t = c.train
  assert (t.learning_rate, t.weight_decay, t.warmup_steps, t.grad_clip_norm) == (1e-4, 0, 0, 0)
  assert (t.global_batch_size, t.ema_decay, t.total_steps, t.label_dropout) == (
      256, 0.9999, 400_000, 0.1)
  assert c.diffusion.num_timesteps == 1000 and c.model.learn_sigma
  assert (c.sample.sampler, c.sample.steps, c.sample.cfg_scale) == ("ddpm", 250, 1.5)


def test_runlocal_shrinks_everything():
  c = configs.imagenet.get_config("model=DiT-B/2,runlocal,images=imagefolder")
  check_config(c)
  assert (c.data.pixel_size, c.data.image_size) == (64, 8)
  assert (c.model.depth, c.model.hidden_size) == (2, 64) and c.model.depth < SIZES["B"][0]
  assert (c.train.global_batch_size, c.train.total_steps, c.sample.steps) == (8, 4, 4)
  assert c.data.images.name == "imagefolder"


@pytest.mark.parametrize("arg,error,message", [
    ("res=260", ValueError, "res=260: the SD VAE needs a multiple of 8"),
    ("images=lmdb", ValueError, "images='lmdb'; expected 'tfds' or 'imagefolder'"),
    ("size=3", ValueError, "unknown config argument 'size'"),
    ("model=DiG-Q/2", ConfigError, "unknown model name 'DiG-Q/2'"),
    ("model=DiG-S/8,res=264", ConfigError, "config.model / config.data"),
])
def test_bad_arguments_are_named(arg, error, message):
  with pytest.raises(error, match=message):
    check_config(configs.imagenet.get_config(arg))

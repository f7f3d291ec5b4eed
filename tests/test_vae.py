"""Tests of the NNX AutoencoderKL and its diffusers weights loader, on tiny configs (CPU).

The numerical tests run the model against an independent float64 numpy implementation written in
diffusers' own terms (NCHW images, PyTorch weight layouts, diffusers tensor names), so they check the
architecture and the name/layout mapping together.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from dig_jax.vae import (AutoencoderKL, VAEConfig, from_diffusers_state_dict, load_vae, sample_latent,
                         save_diffusers, to_diffusers_state_dict)
from dig_jax.vae.load_diffusers import CONFIG_NAME, WEIGHTS_NAME

TINY = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)

# config.json of stabilityai/sd-vae-ft-ema as released (no scaling_factor: diffusers' default applies).
SD_VAE_FT_EMA_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.4.2", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 256, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


@pytest.fixture(scope="module")
def tiny_weights():
  """A diffusers-layout state dict of TINY with every tensor perturbed: no GroupNorm at (1, 0), no zero bias."""
  rng = np.random.default_rng(0)
  state = to_diffusers_state_dict(AutoencoderKL(TINY, rngs=nnx.Rngs(0)))
  return {k: (v + 0.2 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in state.items()}


@pytest.fixture(scope="module")
def tiny_model(tiny_weights):
  return from_diffusers_state_dict(TINY, tiny_weights)


def _image(shape, seed=1):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


# ---------------------------------------------------------------- independent numpy reference (NCHW)

def np_conv(sd, name, x, stride=1, pad=None):
  """PyTorch Conv2d with weight [O, I, kh, kw]; pad = (top, bottom, left, right), default 'same'."""
  w, b = sd[f"{name}.weight"].astype(np.float64), sd[f"{name}.bias"].astype(np.float64)
  p = w.shape[-1] // 2
  top, bottom, left, right = pad if pad is not None else (p, p, p, p)
  x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
  win = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))[:, :, ::stride, ::stride]
  return np.einsum("nchwij,ocij->nohw", win, w) + b[None, :, None, None]


def np_group_norm(sd, name, x, groups):
  n, c, h, w = x.shape
  g = x.reshape(n, groups, -1)
  g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-6)
  return (g.reshape(n, c, h, w) * sd[f"{name}.weight"][None, :, None, None]
          + sd[f"{name}.bias"][None, :, None, None])


def np_silu(x):
  return x / (1 + np.exp(-x))


def np_resnet(sd, name, x, groups):
  h = np_conv(sd, f"{name}.conv1", np_silu(np_group_norm(sd, f"{name}.norm1", x, groups)))
  h = np_conv(sd, f"{name}.conv2", np_silu(np_group_norm(sd, f"{name}.norm2", h, groups)))
  if f"{name}.conv_shortcut.weight" in sd:
    x = np_conv(sd, f"{name}.conv_shortcut", x)
  return x + h


def np_attention(sd, name, x, groups):
  n, c, h, w = x.shape
  t = np_group_norm(sd, f"{name}.group_norm", x, groups).reshape(n, c, h * w).transpose(0, 2, 1)
  lin = lambda key, v: v @ sd[f"{name}.{key}.weight"].T + sd[f"{name}.{key}.bias"]
  q, k, v = lin("to_q", t), lin("to_k", t), lin("to_v", t)
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(c)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  out = lin("to_out.0", (p / p.sum(-1, keepdims=True)) @ v)
  return x + out.transpose(0, 2, 1).reshape(n, c, h, w)


def np_mid_block(sd, name, x, groups):
  x = np_resnet(sd, f"{name}.resnets.0", x, groups)
  x = np_attention(sd, f"{name}.attentions.0", x, groups)
  return np_resnet(sd, f"{name}.resnets.1", x, groups)


def np_encode(sd, cfg, x):
  g, n = cfg.norm_num_groups, len(cfg.block_out_channels)
  h = np_conv(sd, "encoder.conv_in", x)
  for i in range(n):
    for j in range(cfg.layers_per_block):
      h = np_resnet(sd, f"encoder.down_blocks.{i}.resnets.{j}", h, g)
    if i < n - 1:
      h = np_conv(sd, f"encoder.down_blocks.{i}.downsamplers.0.conv", h, stride=2, pad=(0, 1, 0, 1))
  h = np_mid_block(sd, "encoder.mid_block", h, g)
  h = np_conv(sd, "encoder.conv_out", np_silu(np_group_norm(sd, "encoder.conv_norm_out", h, g)))
  h = np_conv(sd, "quant_conv", h)
  return h[:, :cfg.latent_channels], np.clip(h[:, cfg.latent_channels:], -30, 20)


def np_decode(sd, cfg, z):
  g, n = cfg.norm_num_groups, len(cfg.block_out_channels)
  h = np_conv(sd, "decoder.conv_in", np_conv(sd, "post_quant_conv", z))
  h = np_mid_block(sd, "decoder.mid_block", h, g)
  for i in range(n):
    for j in range(cfg.layers_per_block + 1):
      h = np_resnet(sd, f"decoder.up_blocks.{i}.resnets.{j}", h, g)
    if i < n - 1:
      h = np_conv(sd, f"decoder.up_blocks.{i}.upsamplers.0.conv", h.repeat(2, axis=2).repeat(2, axis=3))
  return np_conv(sd, "decoder.conv_out", np_silu(np_group_norm(sd, "decoder.conv_norm_out", h, g)))


def nchw(x):
  return np.asarray(x, np.float64).transpose(0, 3, 1, 2)


def assert_close(got_nhwc, want_nchw, tol=1e-4):
  got = nchw(got_nhwc)
  assert got.shape == want_nchw.shape
  np.testing.assert_allclose(got, want_nchw, rtol=0, atol=tol * np.abs(want_nchw).max())


# ---------------------------------------------------------------- architecture against numpy

# Inputs of scale 1e-3 have group variances near GroupNorm's eps (1e-6), which the check then pins down.
@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_resnet_block_with_shortcut_matches_numpy(tiny_model, tiny_weights, scale):
  block = tiny_model.encoder.down_blocks[1].resnets[0]  # 32 -> 64 channels: has conv_shortcut
  assert block.conv_shortcut is not None
  x = scale * _image((2, 8, 8, 32))
  want = np_resnet(tiny_weights, "encoder.down_blocks.1.resnets.0", nchw(x), TINY.norm_num_groups)
  assert_close(block(x), want)


def test_group_norm_is_accurate_for_inputs_far_from_zero(tiny_model, tiny_weights):
  x = 30.0 + 0.05 * _image((2, 4, 4, 64))  # group means large against their spreads
  want = np_group_norm(tiny_weights, "encoder.conv_norm_out", nchw(x), TINY.norm_num_groups)
  assert_close(tiny_model.encoder.conv_norm_out(x), want, tol=1e-3)


def test_mid_block_attention_matches_numpy(tiny_model, tiny_weights):
  x = _image((2, 4, 4, 64))
  want = np_attention(tiny_weights, "decoder.mid_block.attentions.0", nchw(x), TINY.norm_num_groups)
  assert_close(tiny_model.decoder.mid_block.attention(x), want)


def test_downsample_pads_bottom_right_only(tiny_model, tiny_weights):
  x = _image((1, 16, 16, 32))
  want = np_conv(tiny_weights, "encoder.down_blocks.0.downsamplers.0.conv", nchw(x), stride=2,
                 pad=(0, 1, 0, 1))
  assert_close(tiny_model.encoder.down_blocks[0].downsample(x), want)


def test_encode_decode_match_numpy(tiny_model, tiny_weights):
  x = _image((2, 16, 16, 3))
  want_mean, want_logvar = np_encode(tiny_weights, TINY, nchw(x))
  mean, logvar = tiny_model.encode(x)
  assert_close(mean, want_mean)
  assert_close(logvar, want_logvar)
  z = _image((2, 8, 8, 4), seed=2)
  assert_close(tiny_model.decode(z), np_decode(tiny_weights, TINY, nchw(z)))


def test_sample_latent_draws_from_the_posterior(tiny_model):
  mean, logvar = tiny_model.encode(_image((4, 16, 16, 3)))
  a, b = (sample_latent(jax.random.key(s), mean, logvar) for s in (0, 1))
  assert a.shape == mean.shape and not np.allclose(a, b)
  standardised = (np.asarray(a) - np.asarray(mean)) / np.exp(0.5 * np.asarray(logvar))
  assert abs(standardised.mean()) < 0.15 and abs(standardised.std() - 1) < 0.15


# ---------------------------------------------------------------- full-size architecture, no allocation

def test_full_size_parameter_count():
  model = nnx.eval_shape(lambda: AutoencoderKL(VAEConfig(), rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert len(leaves) == 248
  assert sum(x.size for x in leaves) == 83_653_863


def test_full_size_encode_decode_shapes():
  graphdef, state = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(VAEConfig(), rngs=nnx.Rngs(0))))

  def roundtrip(state, x):
    model = nnx.merge(graphdef, state)
    mean, logvar = model.encode(x)
    return mean, logvar, model.decode(mean)

  mean, logvar, image = jax.eval_shape(roundtrip, state, jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32))
  assert mean.shape == logvar.shape == (2, 32, 32, 4)
  assert image.shape == (2, 256, 256, 3) and image.dtype == jnp.float32


def test_config_reads_the_released_config_json():
  config = VAEConfig.from_diffusers_dict(SD_VAE_FT_EMA_CONFIG)
  assert config == VAEConfig()
  assert config.scaling_factor == 0.18215 and config.downsample_factor == 8
  with pytest.raises(ValueError, match="act_fn"):
    VAEConfig.from_diffusers_dict({**SD_VAE_FT_EMA_CONFIG, "act_fn": "relu"})


# ---------------------------------------------------------------- diffusers file format

@pytest.mark.parametrize("legacy", [False, True], ids=["to_q-names", "query-names"])
def test_saved_files_load_back_bit_exactly(tiny_model, tmp_path, legacy):
  save_diffusers(tiny_model, tmp_path, legacy_attention_names=legacy)
  keys = set(safetensors.numpy.load_file(tmp_path / WEIGHTS_NAME))
  assert ("decoder.mid_block.attentions.0.query.weight" in keys) == legacy
  assert ("decoder.mid_block.attentions.0.to_out.0.weight" in keys) != legacy

  loaded, config = load_vae(tmp_path)
  assert config == TINY
  want = nnx.to_flat_state(nnx.state(tiny_model, nnx.Param))
  got = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
  assert len(got) == len(want)
  for path, v in want:
    np.testing.assert_array_equal(np.asarray(got[path][...]), np.asarray(v[...]), err_msg=str(path))


def test_attention_weights_stored_as_1x1_convs_load(tiny_model, tiny_weights, tmp_path):
  state = to_diffusers_state_dict(tiny_model, legacy_attention_names=True)
  for name in ("query", "key", "value", "proj_attn"):
    for side in ("encoder", "decoder"):
      key = f"{side}.mid_block.attentions.0.{name}.weight"
      state[key] = state[key][:, :, None, None]
  (tmp_path / CONFIG_NAME).write_text(json.dumps(TINY.to_diffusers_dict()))
  safetensors.numpy.save_file(state, tmp_path / WEIGHTS_NAME)
  loaded, _ = load_vae(tmp_path)
  np.testing.assert_array_equal(np.asarray(loaded.decoder.mid_block.attention.to_out.kernel[...]),
                                tiny_weights["decoder.mid_block.attentions.0.to_out.0.weight"].T)


def test_bfloat16_load(tiny_model, tmp_path):
  save_diffusers(tiny_model, tmp_path)
  model, _ = load_vae(tmp_path, dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
  x = _image((1, 16, 16, 3))
  mean, _ = model.encode(jnp.asarray(x, jnp.bfloat16))
  want, _ = tiny_model.encode(x)
  assert mean.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(mean, np.float32), want, atol=0.05 * np.abs(want).max())


def test_missing_key_is_named(tiny_weights):
  state = dict(tiny_weights)
  del state["decoder.up_blocks.1.resnets.0.norm2.bias"]
  with pytest.raises(ValueError, match=r"missing \(1\):\n\s+decoder\.up_blocks\.1\.resnets\.0\.norm2\.bias"):
    from_diffusers_state_dict(TINY, state)


def test_misshaped_key_is_named(tiny_weights):
  state = dict(tiny_weights)
  key = "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"  # [64, 32, 1, 1]
  state[key] = state[key].transpose(1, 0, 2, 3)
  with pytest.raises(ValueError, match=r"misshaped \(1\):\n\s+" + key.replace(".", r"\.")
                     + r": expected \(64, 32, 1, 1\), file has \(32, 64, 1, 1\)"):
    from_diffusers_state_dict(TINY, state)


def test_unexpected_key_is_named(tiny_weights):
  state = {**tiny_weights, "encoder.mid_block.attentions.0.query.weight":
           tiny_weights["encoder.mid_block.attentions.0.to_q.weight"]}  # both namings at once
  with pytest.raises(ValueError, match=r"unexpected \(1\):\n\s+encoder\.mid_block\.attentions\.0\.query\.weight"):
    from_diffusers_state_dict(TINY, state)


def test_missing_directory_says_what_is_expected(tmp_path):
  with pytest.raises(FileNotFoundError, match="sd-vae-ft-ema") as info:
    load_vae(tmp_path / "nowhere")
  assert str(tmp_path / "nowhere") in str(info.value) and WEIGHTS_NAME in str(info.value)
  (tmp_path / CONFIG_NAME).write_text(json.dumps(TINY.to_diffusers_dict()))
  with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
    load_vae(tmp_path)

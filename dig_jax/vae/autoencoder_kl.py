"""The Stable Diffusion VAE (AutoencoderKL, as in stabilityai/sd-vae-ft-ema) in Flax NNX, channels last.

Module and attribute names follow diffusers' parameter names so that `load_diffusers` can map every
tensor with a short, explicit rename table. Numerics follow diffusers: GroupNorm eps 1e-6, SiLU,
asymmetric (0, 1) padding before the stride-2 downsampling conv, nearest x2 upsampling, a single-head
mid-block attention with a float32 softmax, and a log-variance clipped to [-30, 20].
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of an AutoencoderKL; the defaults are sd-vae-ft-ema's."""
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"VAEConfig: block_out_channels {self.block_out_channels} must all be "
                         f"divisible by norm_num_groups={self.norm_num_groups}")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers_dict(cls, d: dict[str, Any]) -> VAEConfig:
    """Reads diffusers' AutoencoderKL `config.json` contents; rejects variants this port lacks."""
    n = len(d.get("block_out_channels", cls.block_out_channels))
    supported = {
        "_class_name": ("AutoencoderKL",),
        "act_fn": ("silu",),
        "down_block_types": (["DownEncoderBlock2D"] * n,),
        "up_block_types": (["UpDecoderBlock2D"] * n,),
        "use_quant_conv": (True,),
        "use_post_quant_conv": (True,),
        "mid_block_add_attention": (True,),
        "shift_factor": (None,),
    }
    for key, allowed in supported.items():
      if key in d and d[key] not in allowed:
        raise ValueError(f"VAE config.json: {key}={d[key]!r} is not supported "
                         f"(this AutoencoderKL port handles {allowed[0]!r})")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in fields and v is not None})

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> VAEConfig:
    with open(path) as f:
      return cls.from_diffusers_dict(json.load(f))

  def to_diffusers_dict(self) -> dict[str, Any]:
    """The `config.json` contents diffusers' `AutoencoderKL.from_pretrained` expects."""
    n = len(self.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": list(self.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "in_channels": self.in_channels,
        "out_channels": self.out_channels,
        "latent_channels": self.latent_channels,
        "layers_per_block": self.layers_per_block,
        "norm_num_groups": self.norm_num_groups,
        "scaling_factor": self.scaling_factor,
    }


@dataclasses.dataclass(frozen=True)
class _Dtypes:
  """Computation and parameter dtypes handed to every layer."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def conv(self, cin, cout, kernel, *, rngs, strides=1, padding=None):
    pad = padding if padding is not None else ((kernel // 2,) * 2,) * 2
    return nnx.Conv(cin, cout, (kernel, kernel), strides=strides, padding=pad, dtype=self.dtype,
                    param_dtype=self.param_dtype, rngs=rngs)

  def norm(self, channels, groups, *, rngs):
    # Two-pass variance, as PyTorch computes it: E[x^2] - E[x]^2 cancels badly when a group's mean is
    # large against its spread.
    return nnx.GroupNorm(channels, groups, epsilon=_EPS, use_fast_variance=False, dtype=self.dtype,
                         param_dtype=self.param_dtype, rngs=rngs)

  def linear(self, cin, cout, *, rngs):
    return nnx.Linear(cin, cout, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)


class ResnetBlock(nnx.Module):
  """GroupNorm-SiLU-conv twice, plus a 1x1 conv shortcut when the channel count changes."""

  def __init__(self, cin: int, cout: int, groups: int, dt: _Dtypes, *, rngs: nnx.Rngs):
    self.norm1 = dt.norm(cin, groups, rngs=rngs)
    self.conv1 = dt.conv(cin, cout, 3, rngs=rngs)
    self.norm2 = dt.norm(cout, groups, rngs=rngs)
    self.conv2 = dt.conv(cout, cout, 3, rngs=rngs)
    self.conv_shortcut = dt.conv(cin, cout, 1, rngs=rngs) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class Attention(nnx.Module):
  """Single-head self-attention over all pixels, with a GroupNorm in front and a residual."""

  def __init__(self, channels: int, groups: int, dt: _Dtypes, *, rngs: nnx.Rngs):
    self.group_norm = dt.norm(channels, groups, rngs=rngs)
    self.to_q = dt.linear(channels, channels, rngs=rngs)
    self.to_k = dt.linear(channels, channels, rngs=rngs)
    self.to_v = dt.linear(channels, channels, rngs=rngs)
    self.to_out = dt.linear(channels, channels, rngs=rngs)

  def __call__(self, x):
    n, h, w, c = x.shape
    t = self.group_norm(x).reshape(n, h * w, c)
    q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
    logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) * c ** -0.5
    # diffusers upcasts the softmax for this block; keep it in float32 for any compute dtype.
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = self.to_out(jnp.einsum("nqk,nkc->nqc", probs, v))
    return x + out.reshape(n, h, w, c)


class Downsample(nnx.Module):
  """Stride-2 3x3 conv after zero-padding one row/column at the bottom/right only (diffusers' padding=0)."""

  def __init__(self, channels: int, dt: _Dtypes, *, rngs: nnx.Rngs):
    self.conv = dt.conv(channels, channels, 3, strides=2, padding=((0, 1), (0, 1)), rngs=rngs)

  def __call__(self, x):
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour x2 then a 3x3 conv."""

  def __init__(self, channels: int, dt: _Dtypes, *, rngs: nnx.Rngs):
    self.conv = dt.conv(channels, channels, 3, rngs=rngs)

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownBlock(nnx.Module):
  """diffusers' DownEncoderBlock2D: resnets, then an optional downsample."""

  def __init__(self, cin, cout, num_layers, groups, add_downsample, dt, *, rngs):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, dt, rngs=rngs)
                             for i in range(num_layers)])
    self.downsample = Downsample(cout, dt, rngs=rngs) if add_downsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return x if self.downsample is None else self.downsample(x)


class UpBlock(nnx.Module):
  """diffusers' UpDecoderBlock2D: resnets, then an optional upsample."""

  def __init__(self, cin, cout, num_layers, groups, add_upsample, dt, *, rngs):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, dt, rngs=rngs)
                             for i in range(num_layers)])
    self.upsample = Upsample(cout, dt, rngs=rngs) if add_upsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return x if self.upsample is None else self.upsample(x)


class MidBlock(nnx.Module):
  """resnet -> attention -> resnet at the lowest resolution."""

  def __init__(self, channels, groups, dt, *, rngs):
    self.resnets = nnx.List([ResnetBlock(channels, channels, groups, dt, rngs=rngs) for _ in range(2)])
    self.attention = Attention(channels, groups, dt, rngs=rngs)

  def __call__(self, x):
    return self.resnets[1](self.attention(self.resnets[0](x)))


class Encoder(nnx.Module):
  """Image [N, H, W, C] -> posterior moments [N, H/f, W/f, 2 * latent_channels]."""

  def __init__(self, cfg: VAEConfig, dt: _Dtypes, *, rngs: nnx.Rngs):
    chans, groups = cfg.block_out_channels, cfg.norm_num_groups
    self.conv_in = dt.conv(cfg.in_channels, chans[0], 3, rngs=rngs)
    self.down_blocks = nnx.List([
        DownBlock(chans[max(i - 1, 0)], c, cfg.layers_per_block, groups, i < len(chans) - 1, dt,
                  rngs=rngs) for i, c in enumerate(chans)])
    self.mid_block = MidBlock(chans[-1], groups, dt, rngs=rngs)
    self.conv_norm_out = dt.norm(chans[-1], groups, rngs=rngs)
    self.conv_out = dt.conv(chans[-1], 2 * cfg.latent_channels, 3, rngs=rngs)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latent [N, h, w, latent_channels] -> image [N, h*f, w*f, out_channels]."""

  def __init__(self, cfg: VAEConfig, dt: _Dtypes, *, rngs: nnx.Rngs):
    chans, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
    self.conv_in = dt.conv(cfg.latent_channels, chans[0], 3, rngs=rngs)
    self.mid_block = MidBlock(chans[0], groups, dt, rngs=rngs)
    # The decoder has one more resnet per block than the encoder, as in diffusers.
    self.up_blocks = nnx.List([
        UpBlock(chans[max(i - 1, 0)], c, cfg.layers_per_block + 1, groups, i < len(chans) - 1, dt,
                rngs=rngs) for i, c in enumerate(chans)])
    self.conv_norm_out = dt.norm(chans[-1], groups, rngs=rngs)
    self.conv_out = dt.conv(chans[-1], cfg.out_channels, 3, rngs=rngs)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """The KL-regularised VAE of latent diffusion; images and latents are channels last (NHWC).

  Latents fed to a diffusion model are conventionally `sample_latent(...) * config.scaling_factor`,
  and divided by it again before `decode`.
  """

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.config = config
    dt = _Dtypes(dtype, param_dtype)
    self.encoder = Encoder(config, dt, rngs=rngs)
    self.decoder = Decoder(config, dt, rngs=rngs)
    self.quant_conv = dt.conv(2 * config.latent_channels, 2 * config.latent_channels, 1, rngs=rngs)
    self.post_quant_conv = dt.conv(config.latent_channels, config.latent_channels, 1, rngs=rngs)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Image [N, H, W, in_channels] in [-1, 1] -> posterior (mean, logvar), each [N, H/f, W/f, latent].

    f is `config.downsample_factor` (8 for sd-vae-ft-ema); H and W must be multiples of f.
    """
    moments = self.quant_conv(self.encoder(x))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jax.Array) -> jax.Array:
    """Latent [N, h, w, latent_channels] (unscaled) -> image [N, f*h, f*w, out_channels], about [-1, 1]."""
    return self.decoder(self.post_quant_conv(z))


def sample_latent(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """One draw from the diagonal Gaussian posterior returned by `AutoencoderKL.encode`."""
  noise = jax.random.normal(key, mean.shape, jnp.float32).astype(mean.dtype)
  return mean + jnp.exp(0.5 * logvar) * noise

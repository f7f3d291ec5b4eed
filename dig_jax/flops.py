"""Analytic FLOP count of DiG and DiT, per image (2 FLOPs per multiply-add).

Every matmul of every layer is counted: the patch embedding (a p x p stride-p conv, i.e. a
Linear over p*p*C), the timestep MLP, the adaLN modulation Linears (per image, not per token),
all projections of the token mixer, the full MLP (SwiGLU's gate, up *and* down projections for
DiG; fc1 and fc2 for DiT) and the final Linear. The token mixers add:

- softmax attention (DiT): QK^T and PV over all T keys, 4 * T * D per token (the T^2 terms);
- GLA (DiG), per token and head with key dim K, value dim V and chunk C:
  intra-chunk scores and their product with V over the causal half of the chunk, C * (K + V);
  inter-chunk q @ S and the state update k^T v, 2 * K * V each, so 4 * K * V in all.
  Training (3x forward) then gives perf.md's floor `T * [12 K V + 3 C (K + V)]` (r = 0).

DiG's 3x3 depthwise conv (9 multiply-adds per channel per token) is counted as `dwconv`;
elementwise work (norms, activations, gating, the loss) is not counted. Training = 3x forward
(forward, then the backward's two matmuls per forward matmul), the usual MFU convention.

`forward_flops(name, px)` takes the image size in pixels (latent = px / 8, as with the SD VAE).
"""
from __future__ import annotations

import dataclasses

from dig_jax.models.registry import PATCHES, SIZES, parse_model_name, swiglu_hidden

VAE_DOWNSAMPLE = 8
DEFAULT_GLA_CHUNK = 16  # the chunk of kernels_pallas.gla.pallas_gpu
GLA_GATE_RANK = 16      # DiG's low-rank forget gate: D -> 16 -> D/2
FREQ_DIM = 256          # timestep sinusoid width


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """What the FLOP count needs of a model: registry sizes plus any overrides."""
  family: str
  depth: int
  hidden: int
  heads: int
  patch: int
  in_channels: int = 4
  out_channels: int = 8
  mlp_hidden: int = 0   # DiG: SwiGLU width; DiT: MLP width (int(D * mlp_ratio))


def model_shape(name: str, *, in_channels: int = 4, learn_sigma: bool = True,
                depth: int | None = None, hidden_size: int | None = None,
                num_heads: int | None = None, mlp_hidden: int | None = None,
                mlp_ratio: float = 4.0) -> ModelShape:
  """The shape `create_model(name, **overrides)` builds (same defaults as the registry)."""
  family, size, patch = parse_model_name(name)
  d_depth, d_hidden, dit_heads = SIZES[size]
  hidden = hidden_size or d_hidden
  if family == "DiG":
    heads = num_heads or max(1, hidden // 64)
    inner = mlp_hidden or swiglu_hidden(hidden)
  else:
    heads = num_heads or dit_heads
    inner = int(hidden * mlp_ratio)
  return ModelShape(family=family, depth=depth or d_depth, hidden=hidden, heads=heads,
                    patch=patch, in_channels=in_channels,
                    out_channels=2 * in_channels if learn_sigma else in_channels,
                    mlp_hidden=inner)


def gla_core_flops(tokens: int, heads: int, key_dim: int, value_dim: int,
                   chunk: int = DEFAULT_GLA_CHUNK) -> int:
  """Forward FLOPs of the GLA kernel for one sequence: intra-chunk C*(K+V) plus 4*K*V per
  token and head (the chunk is capped at the sequence length)."""
  c = min(chunk, tokens)
  return tokens * heads * (c * (key_dim + value_dim) + 4 * key_dim * value_dim)


def forward_flops_shape(shape: ModelShape, latent_hw: tuple[int, int], *,
                        gla_chunk: int = DEFAULT_GLA_CHUNK) -> dict[str, int]:
  """Forward FLOPs per image by component, plus 'total' (their sum)."""
  h, w = latent_hw
  p, d, depth = shape.patch, shape.hidden, shape.depth
  if h % p or w % p:
    raise ValueError(f"latent {h}x{w} is not divisible by the patch size {p}")
  t = (h // p) * (w // p)
  out = {
      "patch_embed": 2 * t * (p * p * shape.in_channels) * d,
      "t_embed": 2 * (FREQ_DIM * d + d * d),
      "adaln": depth * 2 * d * 6 * d + 2 * d * 2 * d,   # blocks + final layer, per image
      "final_linear": 2 * t * d * (p * p * shape.out_channels),
  }
  if shape.family == "DiG":
    kd, vd = d // 2, d
    out["mixer_proj"] = depth * 2 * t * d * (kd + kd + vd + vd + vd)   # q, k, v, g_proj, o
    out["gla_gate"] = depth * 2 * t * (d * GLA_GATE_RANK + GLA_GATE_RANK * kd)
    out["mlp"] = depth * 2 * t * 3 * d * shape.mlp_hidden           # gate, up, down
    out["mixer_core"] = depth * gla_core_flops(t, shape.heads, kd // shape.heads,
                                               vd // shape.heads, gla_chunk)
    out["dwconv"] = depth * 2 * 9 * t * d
  else:
    out["mixer_proj"] = depth * 2 * t * d * (3 * d + d)              # qkv, proj
    out["mlp"] = depth * 2 * t * 2 * d * shape.mlp_hidden            # fc1, fc2
    out["mixer_core"] = depth * 4 * t * t * d                        # QK^T, PV
  out["total"] = sum(out.values())
  return out


def latent_size(px: int) -> int:
  if px <= 0 or px % VAE_DOWNSAMPLE:
    raise ValueError(f"image size {px} px must be a positive multiple of {VAE_DOWNSAMPLE}")
  return px // VAE_DOWNSAMPLE


def forward_flops(name: str, px: int, *, gla_chunk: int = DEFAULT_GLA_CHUNK,
                  **overrides) -> int:
  """Forward FLOPs per image of model `name` at `px` x `px` pixels (latent px / 8)."""
  lat = latent_size(px)
  return forward_flops_shape(model_shape(name, **overrides), (lat, lat),
                             gla_chunk=gla_chunk)["total"]


def train_flops(name: str, px: int, *, gla_chunk: int = DEFAULT_GLA_CHUNK, **overrides) -> int:
  """Training-step FLOPs per image: 3x forward."""
  return 3 * forward_flops(name, px, gla_chunk=gla_chunk, **overrides)


def _table():
  """FLOPs per image of the released sizes at 256 px (GFLOPs), for a quick look."""
  for size in SIZES:
    for family in ("DiG", "DiT"):
      name = f"{family}-{size}/{PATCHES[0]}"
      print(f"{name:10s} fwd {forward_flops(name, 256) / 1e9:8.2f} GFLOPs/img at 256 px")


if __name__ == "__main__":
  _table()


__all__ = ["ModelShape", "model_shape", "forward_flops_shape", "forward_flops", "train_flops",
           "gla_core_flops", "latent_size", "DEFAULT_GLA_CHUNK"]

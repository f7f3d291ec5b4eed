"""Inception-v3 as FID uses it: the 2048-d pool features of pytorch-fid's network, channels last.

The network is the TF "2015-12-05" Inception graph as pytorch-fid rebuilt it (torchvision's
Inception3 with its FID blocks: average pools that do not count padding, and a max pool in the
last block), so its weights file (`pt_inception-2015-12-05-6726825d.pth`, which users download
themselves) loads name by name: `load_pytorch_fid(path)`. Inputs are images in [0, 1], resized
to 299 x 299 (bilinear, half-pixel centres, no antialiasing) and scaled to [-1, 1], as
pytorch-fid does. `scripts/check_inception_against_torch.py` compares the features with
pytorch-fid's on the same weights.

Every convolution is conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU; the
BatchNorm is folded into the convolution when the weights are loaded.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INPUT_SIZE = 299
FEATURES = 2048
BN_EPS = 1e-3


class ConvBN(nnx.Module):
  """Conv with its BatchNorm folded in (kernel [kh, kw, in, out], bias), then ReLU."""

  def __init__(self, cin, cout, kernel, stride=1, padding=0):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    self.kernel = nnx.Variable(jnp.zeros((kh, kw, cin, cout), jnp.float32))
    self.bias = nnx.Variable(jnp.zeros((cout,), jnp.float32))
    self.stride = stride
    self.padding = ((ph, ph), (pw, pw))

  def __call__(self, x, precision):
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...], (self.stride, self.stride), self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    return jax.nn.relu(y + self.bias[...])


def max_pool(x, stride, padding=0):
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                               pad)


def avg_pool_valid_only(x):
  """3x3 average, stride 1, padding 1, dividing by the number of real (unpadded) inputs."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  window = ((1, 3, 3, 1), (1, 1, 1, 1), pad)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, *window)
  count = jax.lax.reduce_window(jnp.ones(x.shape[1:3], x.dtype)[None, :, :, None], 0.0,
                                jax.lax.add, *window)
  return total / count


class BlockA(nnx.Module):  # Mixed_5b/c/d
  def __init__(self, cin, pool_features):
    self.branch1x1 = ConvBN(cin, 64, 1)
    self.branch5x5_1 = ConvBN(cin, 48, 1)
    self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
    self.branch_pool = ConvBN(cin, pool_features, 1)

  def __call__(self, x, p):
    b5 = self.branch5x5_2(self.branch5x5_1(x, p), p)
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x, p), p), p)
    return jnp.concatenate(
        [self.branch1x1(x, p), b5, b3, self.branch_pool(avg_pool_valid_only(x), p)], axis=-1)


class BlockB(nnx.Module):  # Mixed_6a: grid 35 -> 17
  def __init__(self, cin):
    self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

  def __call__(self, x, p):
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x, p), p), p)
    return jnp.concatenate([self.branch3x3(x, p), b3, max_pool(x, 2)], axis=-1)


class BlockC(nnx.Module):  # Mixed_6b/c/d/e: factorised 7x7
  def __init__(self, cin, c7):
    self.branch1x1 = ConvBN(cin, 192, 1)
    self.branch7x7_1 = ConvBN(cin, c7, 1)
    self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
    self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = ConvBN(cin, 192, 1)

  def __call__(self, x, p):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x, p), p), p)
    bd = x
    for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                 self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = conv(bd, p)
    return jnp.concatenate(
        [self.branch1x1(x, p), b7, bd, self.branch_pool(avg_pool_valid_only(x), p)], axis=-1)


class BlockD(nnx.Module):  # Mixed_7a: grid 17 -> 8
  def __init__(self, cin):
    self.branch3x3_1 = ConvBN(cin, 192, 1)
    self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
    self.branch7x7x3_1 = ConvBN(cin, 192, 1)
    self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

  def __call__(self, x, p):
    b3 = self.branch3x3_2(self.branch3x3_1(x, p), p)
    b7 = x
    for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                 self.branch7x7x3_4):
      b7 = conv(b7, p)
    return jnp.concatenate([b3, b7, max_pool(x, 2)], axis=-1)


class BlockE(nnx.Module):  # Mixed_7b (average pool) and Mixed_7c (max pool)
  def __init__(self, cin, max_pooled):
    self.branch1x1 = ConvBN(cin, 320, 1)
    self.branch3x3_1 = ConvBN(cin, 384, 1)
    self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
    self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = ConvBN(cin, 192, 1)
    self.max_pooled = max_pooled

  def __call__(self, x, p):
    b3 = self.branch3x3_1(x, p)
    b3 = jnp.concatenate([self.branch3x3_2a(b3, p), self.branch3x3_2b(b3, p)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x, p), p)
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd, p), self.branch3x3dbl_3b(bd, p)], axis=-1)
    pooled = max_pool(x, 1, padding=1) if self.max_pooled else avg_pool_valid_only(x)
    return jnp.concatenate([self.branch1x1(x, p), b3, bd, self.branch_pool(pooled, p)], axis=-1)


class InceptionV3(nnx.Module):
  """`model(images)`: images [N, H, W, 3] in [0, 1] (any size) -> pool features [N, 2048]."""

  def __init__(self, precision=jax.lax.Precision.HIGHEST):
    self.precision = precision
    self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
    self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
    self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
    self.Mixed_5b = BlockA(192, 32)
    self.Mixed_5c = BlockA(256, 64)
    self.Mixed_5d = BlockA(288, 64)
    self.Mixed_6a = BlockB(288)
    self.Mixed_6b = BlockC(768, 128)
    self.Mixed_6c = BlockC(768, 160)
    self.Mixed_6d = BlockC(768, 160)
    self.Mixed_6e = BlockC(768, 192)
    self.Mixed_7a = BlockD(768)
    self.Mixed_7b = BlockE(1280, max_pooled=False)
    self.Mixed_7c = BlockE(2048, max_pooled=True)

  def __call__(self, images):
    p = self.precision
    n = images.shape[0]
    x = jax.image.resize(images.astype(jnp.float32), (n, INPUT_SIZE, INPUT_SIZE, 3),
                         method="bilinear", antialias=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x, p), p), p)
    x = max_pool(x, 2)
    x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x, p), p), 2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x, p)
    return jnp.mean(x, axis=(1, 2))


def conv_paths(model: InceptionV3) -> dict[str, ConvBN]:
  """torch module path (e.g. 'Mixed_5b.branch1x1') -> the ConvBN holding its folded weights."""
  return {".".join(map(str, path)): module for path, module in nnx.iter_graph(model)
          if isinstance(module, ConvBN)}


def fold_batch_norm(weight, gamma, beta, mean, var):
  """torch conv weight [out, in, kh, kw] + BatchNorm -> (kernel [kh, kw, in, out], bias)."""
  scale = gamma / np.sqrt(var + BN_EPS)
  kernel = np.transpose(weight, (2, 3, 1, 0)) * scale
  return kernel.astype(np.float32), (beta - mean * scale).astype(np.float32)


def load_state_dict(model: InceptionV3, tensors: dict[str, np.ndarray]) -> InceptionV3:
  """Sets every conv of `model` from pytorch-fid's tensor names; the classifier (`fc.*`) and
  BatchNorm's `num_batches_tracked` are not used. Missing, unknown or mis-shaped tensors are
  errors that name them."""
  convs = conv_paths(model)
  used = set()
  for name, conv in convs.items():
    keys = [f"{name}.conv.weight"] + [f"{name}.bn.{k}" for k in
                                      ("weight", "bias", "running_mean", "running_var")]
    missing = [k for k in keys if k not in tensors]
    if missing:
      raise ValueError(f"Inception weights: missing {missing[:4]} (is this pytorch-fid's "
                       "pt_inception-2015-12-05 file?)")
    weight = np.asarray(tensors[keys[0]], np.float64)
    kh, kw, cin, cout = conv.kernel.shape
    if weight.shape != (cout, cin, kh, kw):
      raise ValueError(f"Inception weights: {keys[0]} has shape {weight.shape}, expected "
                       f"{(cout, cin, kh, kw)}")
    bn = [np.asarray(tensors[k], np.float64) for k in keys[1:]]
    for k, t in zip(keys[1:], bn):
      if t.shape != (cout,):
        raise ValueError(f"Inception weights: {k} has shape {t.shape}, expected {(cout,)}")
    kernel, bias = fold_batch_norm(weight, *bn)
    conv.kernel[...] = jnp.asarray(kernel)
    conv.bias[...] = jnp.asarray(bias)
    used.update(keys)
  unknown = sorted(k for k in tensors if k not in used and not k.startswith("fc.")
                   and not k.endswith(".num_batches_tracked"))
  if unknown:
    raise ValueError(f"Inception weights: unexpected tensors {unknown[:4]} (is this pytorch-fid's "
                     "pt_inception-2015-12-05 file?)")
  return model


def load_pytorch_fid(path: str, precision=jax.lax.Precision.HIGHEST) -> InceptionV3:
  """The FID network with the weights of pytorch-fid's .pth file at `path` (read without torch)."""
  from dig_jax.evaluate.torch_checkpoint import read_state_dict
  return load_state_dict(InceptionV3(precision), read_state_dict(path))

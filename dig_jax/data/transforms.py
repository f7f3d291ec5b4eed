"""Per-example grain transforms: decoded pixels or cached latents -> what the model trains on.

Every transform returns {"image": float32 [H, W, C], "label": int32} for the train step, except
`DecodeCenterCrop`, which yields uint8 pixels (for the latent cache) or None for a file that
cannot be used; grain's iterators skip None elements, so one bad JPEG costs one example, not a run.
"""
from __future__ import annotations

import collections
import io
import logging

import grain
import numpy as np
from PIL import Image

# Images smaller than this, or longer than wide (or wide than long) by more than MAX_ASPECT, are
# skipped: the ADM crop would upscale a sliver into mush (or a huge array).
MIN_SIDE = 8
MAX_ASPECT = 16

_log = logging.getLogger(__name__)


def pad_to_size(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Centre-pads an HWC image with zeros (black) to `size`; refuses images larger than it."""
  h, w = image.shape[:2]
  th, tw = size
  if h > th or w > tw:
    raise ValueError(f"image of size {h}x{w} is larger than the training size {th}x{tw}")
  top, left = (th - h) // 2, (tw - w) // 2
  return np.pad(image, ((top, th - h - top), (left, tw - w - left), (0, 0)))


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return image.astype(np.float32) / 127.5 - 1.0


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
  """ADM's center crop (guided-diffusion, used by DiT and DiG): halve with a box filter while the
  short side is at least 2x `size`, resize the short side to `size` (bicubic), crop the centre."""
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
  arr = np.asarray(image)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top:top + size, left:left + size]


class BadFileLog:
  """Counts converted and skipped files in this process and logs them without flooding the log:
  every skip, and conversions at the 1st, 2nd, 4th, 8th, ... occurrence."""

  def __init__(self):
    self.counts = collections.Counter()

  def skipped(self, name: str, reason: str):
    self.counts["skipped"] += 1
    _log.warning("skipping %s: %s (%d unusable files skipped so far in this process)",
                    name, reason, self.counts["skipped"])

  def converted(self, name: str, mode: str):
    self.counts[mode] += 1
    n = self.counts[mode]
    if n & (n - 1) == 0:
      _log.warning("converted %s from mode %s to RGB (%d %s images so far in this process)",
                      name, mode, n, mode)


BAD_FILES = BadFileLog()


def decode_rgb(data: bytes, name: str = "?") -> Image.Image | None:
  """Encoded image bytes -> a fully decoded RGB PIL image, or None (logged) if it is unusable.

  Grayscale, CMYK, palette and alpha images are converted; truncated or corrupt files and
  degenerate sizes are skipped.
  """
  try:
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes now, so a truncated file fails here and not later
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    BAD_FILES.skipped(name, f"cannot decode ({type(e).__name__}: {e})")
    return None
  w, h = image.size
  if min(w, h) < MIN_SIDE or max(w, h) > MAX_ASPECT * min(w, h):
    BAD_FILES.skipped(name, f"unusable size {w}x{h}")
    return None
  if image.mode != "RGB":
    BAD_FILES.converted(name, image.mode)
    image = image.convert("RGB")
  return image


class DecodeCenterCrop(grain.transforms.Map):
  """{"image": encoded bytes, "label", "name", ...} -> {"image": uint8 [size, size, 3], "label",
  ...} (other keys kept, "name" dropped), or None for an unusable file."""

  def __init__(self, size: int):
    self.size = size

  def map(self, element: dict):
    element = dict(element)
    image = decode_rgb(element.pop("image"), element.pop("name", "?"))
    if image is None:
      return None
    return {**element, "image": center_crop_arr(image, self.size),
            "label": np.int32(element["label"])}


class RandomFlipToFloat(grain.transforms.RandomMap):
  """uint8 image -> horizontally flipped with probability 1/2 -> float32 in [-1, 1]."""

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    image = element["image"]
    if rng.random() < 0.5:
      image = image[:, ::-1]
    return {"image": to_float(image), "label": np.int32(element["label"])}


def encoded_image_transforms(image_size: tuple[int, int]) -> list:
  """For sources of encoded files (image folder, TFDS): decode, ADM crop, random flip, [-1, 1]."""
  if image_size[0] != image_size[1]:
    raise ValueError(f"the ADM center crop makes square images; got image size {image_size}")
  return [DecodeCenterCrop(image_size[0]), RandomFlipToFloat()]


class ToModelInput(grain.transforms.Map):
  """uint8 HWC image -> float32 in [-1, 1], centre-padded to the training size (the digits)."""

  def __init__(self, image_size: tuple[int, int]):
    self.image_size = tuple(image_size)

  def map(self, element: dict) -> dict:
    image = pad_to_size(np.asarray(element["image"]), self.image_size)
    return {"image": to_float(image), "label": np.int32(element["label"])}


class SampleLatent(grain.transforms.RandomMap):
  """Cached posterior moments [2 (unflipped, flipped), 2 (mean, std), h, w, c] -> one latent.

  Picks the image or its mirror with probability 1/2 (the flip was done in pixel space before
  encoding), draws z = mean + std * eps as DiT does every step, and scales it (0.18215 for SD).
  """

  def __init__(self, scale: float):
    self.scale = scale

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    mean, std = element["moments"][rng.integers(2)].astype(np.float32)
    latent = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
    return {"image": self.scale * latent, "label": np.int32(element["label"])}

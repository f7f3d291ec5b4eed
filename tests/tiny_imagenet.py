"""Tiny ImageNet look-alikes written by the tests, in the real on-disk formats.

- `write_image_folder`: root/<synset>/<file>.JPEG as in ILSVRC2012's train/, with the oddities the
  real data has (grayscale, CMYK, a PNG named .JPEG, palette/alpha PNGs, a small image) and files
  that cannot be used (a truncated JPEG, a 4x4 image, an HTML page named .JPEG).
- `write_tfds`: the same files as a TFDS dataset with imagenet2012's features (encoded JPEG bytes,
  ClassLabel, file_name), prepared in ArrayRecord by TFDS itself (no TensorFlow needed).
- `write_tiny_vae`: a randomly initialised AutoencoderKL with the SD VAE's 8x downsampling, saved
  in diffusers format.
"""
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from flax import nnx
from PIL import Image

from dig_jax.vae import AutoencoderKL, VAEConfig, save_diffusers

SYNSETS = ("n01440764", "n01443537", "n01484850")
TINY_VAE = VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)


def _photo(rng, h, w):
  """A smooth random RGB image (JPEG keeps it recognisable)."""
  small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
  noise = rng.integers(0, 40, (h, w, 3))
  base = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), np.int64)
  return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _encode(image: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt)
  return buf.getvalue()


def tiny_files(seed: int = 0) -> list[tuple[str, int, bytes, bool]]:
  """(relative path, label, file bytes, usable) for 12 files, 4 per class, 3 unusable."""
  rng = np.random.default_rng(seed)
  p = lambda h, w: _photo(rng, h, w)  # noqa: E731
  jpeg_60 = _encode(p(60, 60), "JPEG")
  per_class = [
      [("rgb", _encode(p(70, 90), "JPEG"), True),
       ("gray", _encode(p(48, 40).convert("L"), "JPEG"), True),
       ("cmyk", _encode(p(40, 56).convert("CMYK"), "JPEG"), True),
       ("truncated", jpeg_60[:len(jpeg_60) // 2], False)],
      [("small_png", _encode(p(33, 33), "PNG"), True),
       ("palette", _encode(p(50, 36).convert("P"), "PNG"), True),
       ("rgba", _encode(p(44, 64).convert("RGBA"), "PNG"), True),
       ("tiny", _encode(p(4, 4), "JPEG"), False)],
      [("big", _encode(p(130, 100), "JPEG"), True),
       ("portrait", _encode(p(80, 40), "JPEG"), True),
       ("png_named_jpeg", _encode(p(64, 48), "PNG"), True),
       ("html", b"<html><body>503 Service Unavailable</body></html>", False)],
  ]
  return [(f"{SYNSETS[label]}/{SYNSETS[label]}_{kind}.JPEG", label, data, ok)
          for label, files in enumerate(per_class) for kind, data, ok in files]


def write_image_folder(root, seed: int = 0) -> list[tuple[str, int, bytes, bool]]:
  files = tiny_files(seed)
  for rel, _, data, _ in files:
    os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
    with open(os.path.join(root, rel), "wb") as f:
      f.write(data)
  return files


class TinyImagenet2012(tfds.core.GeneratorBasedBuilder):
  """imagenet2012's features and layout, generated from an image folder given as manual_dir."""

  VERSION = tfds.core.Version("5.1.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "manual_dir: an image folder with one sub-folder per synset"

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=SYNSETS),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(dl_manager.manual_dir)}

  def _generate_examples(self, folder):
    for synset in SYNSETS:
      for name in sorted(os.listdir(os.path.join(folder, synset))):
        with open(os.path.join(folder, synset, name), "rb") as f:
          yield name, {"image": io.BytesIO(f.read()), "label": synset, "file_name": name}


def write_tfds(data_dir, image_folder) -> str:
  """Prepares `tiny_imagenet2012` in `data_dir` (ArrayRecord) from `image_folder`; its name."""
  builder = TinyImagenet2012(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(image_folder)))
  return builder.name


def write_tiny_vae(directory, seed: int = 0) -> AutoencoderKL:
  model = AutoencoderKL(TINY_VAE, rngs=nnx.Rngs(seed))
  save_diffusers(model, directory)
  return model

"""A folder with one sub-folder of images per class (ImageNet's train/ layout), read as encoded bytes.

    root/n01440764/n01440764_10026.JPEG
    root/n01443537/...

Labels are the sub-folders in sorted order (for ImageNet: the same ids as TFDS imagenet2012 and
torchvision's ImageFolder). Files are decoded later, by the pipeline's transforms, so decoding
runs in grain's reader threads or worker processes.
"""
from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from dig_jax.data.transforms import encoded_image_transforms

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


class ImageFolderSource:
  """Random access to root/<class>/<image>: [i] -> {"image": bytes, "label": int, "name": str}."""

  image_shape = (None, None, 3)

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"image folder {root!r} does not exist; expected a directory with "
                              f"one sub-folder of images per class (ImageNet's train/ layout)")
    self.root = root
    self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    files, labels = [], []
    for label, name in enumerate(tqdm(self.classes, desc=f"listing {root}", unit="class",
                                      leave=False)):
      found = sorted(e.name for e in os.scandir(os.path.join(root, name))
                     if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
      files += [f"{name}/{f}" for f in found]
      labels += [label] * len(found)
    if not files:
      raise FileNotFoundError(f"no images in {root!r}; expected sub-folders (one per class) "
                              f"holding {', '.join(IMAGE_EXTENSIONS)} files")
    # Compact arrays rather than lists: the source is pickled into every grain worker.
    self.files = np.array([f.encode() for f in files])
    self.labels = np.array(labels, np.int32)
    self.num_classes = len(self.classes)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    name = self.files[index].decode()
    with open(os.path.join(self.root, name), "rb") as f:
      return {"image": f.read(), "label": self.labels[index], "name": name}

  def transforms(self, image_size: tuple[int, int]) -> list:
    return encoded_image_transforms(image_size)

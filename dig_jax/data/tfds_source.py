"""A TFDS image-classification dataset prepared in ArrayRecord format, read with random access.

Works without TensorFlow: images come out as the encoded bytes TFDS stored (decoding is skipped)
and are decoded with PIL by the pipeline's transforms, like the image folder's files.
"""
from __future__ import annotations

from dig_jax.data.transforms import encoded_image_transforms


def _how_to_prepare(name: str, data_dir: str | None) -> str:
  where = f"--data_dir={data_dir}" if data_dir else "(default data_dir ~/tensorflow_datasets)"
  manual = ("put ILSVRC2012_img_train.tar (and ILSVRC2012_img_val.tar) from image-net.org in "
            "MANUAL_DIR, then " if name.startswith("imagenet2012") else "")
  return (f"To prepare it (once, in an environment with TensorFlow installed): {manual}"
          f"tfds build {name} --manual_dir=MANUAL_DIR {where} --file_format=array_record. "
          f"Or point the trainer at a folder of images instead (config.data.name='imagefolder').")


class TfdsSource:
  """[i] -> {"image": encoded bytes, "label": int, "name": str} from `tfds.data_source`.

  `name` may carry a config and version ("imagenet2012:5.1.0"); `split` takes TFDS slicing
  ("train[:10%]"); `data_dir` None means TFDS's default.
  """

  image_shape = (None, None, 3)

  def __init__(self, name: str, data_dir: str | None = None, split: str = "train"):
    import tensorflow_datasets as tfds  # slow to import; only runs that read TFDS pay for it
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise FileNotFoundError(f"TFDS dataset {name!r} is neither registered nor prepared in "
                              f"{data_dir or '~/tensorflow_datasets'}. "
                              f"{_how_to_prepare(name, data_dir)}") from None
    if not builder.is_prepared():
      raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. "
                              f"{_how_to_prepare(name, data_dir)}")
    info = builder.info
    if info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise ValueError(
          f"TFDS dataset {name!r} in {builder.data_dir} is stored as {info.file_format.value}; "
          f"random access needs ArrayRecord. Convert it once: tfds convert_format "
          f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record")
    if info.supervised_keys is None:
      raise ValueError(f"TFDS dataset {name!r} has no supervised (image, label) keys; expected "
                       f"an image-classification dataset")
    self.image_key, self.label_key = info.supervised_keys[:2]
    if not isinstance(info.features[self.image_key], tfds.features.Image):
      raise ValueError(f"TFDS dataset {name!r}: feature {self.image_key!r} is not an Image")
    self.name_key = "file_name" if "file_name" in info.features else None
    self.num_classes = info.features[self.label_key].num_classes
    self.description = f"{name} {split} ({builder.data_dir})"
    self._records = builder.as_data_source(
        split, decoders={self.image_key: tfds.decode.SkipDecoding()})

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    record = self._records[index]
    name = record[self.name_key] if self.name_key else f"{self.description}[{index}]"
    return {"image": record[self.image_key], "label": record[self.label_key],
            "name": name.decode() if isinstance(name, bytes) else name}

  def transforms(self, image_size: tuple[int, int]) -> list:
    return encoded_image_transforms(image_size)

"""ImageNet-style sources: ADM crop, decoding of odd files, image folder and TFDS through the pipeline."""
import io
import itertools
import logging

import numpy as np
import pytest
from ml_collections import config_dict
from PIL import Image

from dig_jax.data import (ImageFolderSource, TfdsSource, create_source, ordered_batches,
                          train_dataset)
from dig_jax.data.transforms import (BAD_FILES, DecodeCenterCrop, center_crop_arr, decode_rgb,
                                     encoded_image_transforms, to_float)
from dig_jax.tools.cache_latents import DecodeOrMark
from tiny_imagenet import SYNSETS, tiny_files, write_image_folder, write_tfds

SIZE = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagenet_folder")
  return str(root), write_image_folder(root)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory, folder):
  data_dir = tmp_path_factory.mktemp("tfds")
  return str(data_dir), write_tfds(data_dir, folder[0])


def _rgb_image(rng, h, w):
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("w,h,halvings", [(90, 70, 1), (300, 260, 3), (40, 20, 0), (32, 50, 0),
                                          (64, 64, 1), (63, 100, 0)])
def test_center_crop_matches_direct_pil(rng, w, h, halvings):
  image = _rgb_image(rng, h, w)
  want = image
  for _ in range(halvings):  # ADM: box-filter halvings while the short side >= 2 * size
    want = want.resize((want.width // 2, want.height // 2), Image.BOX)
  s = SIZE / min(want.size)
  want = want.resize((round(want.width * s), round(want.height * s)), Image.BICUBIC)
  left, top = (want.width - SIZE) // 2, (want.height - SIZE) // 2
  want = np.asarray(want.crop((left, top, left + SIZE, top + SIZE)))
  got = center_crop_arr(image, SIZE)
  assert got.shape == (SIZE, SIZE, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"),
                                      ("RGBA", "PNG"), ("LA", "PNG"), ("RGB", "PNG")])
def test_decode_converts_to_rgb_like_pil(rng, mode, fmt):
  buf = io.BytesIO()
  _rgb_image(rng, 20, 30).convert(mode).save(buf, fmt)
  got = decode_rgb(buf.getvalue(), "x")
  want = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
  assert got.mode == "RGB" and got.size == (30, 20)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_unusable_files_are_skipped_with_a_count(rng, caplog):
  jpeg = io.BytesIO()
  _rgb_image(rng, 60, 60).save(jpeg, "JPEG")
  sliver = io.BytesIO()
  _rgb_image(rng, 10, 200).save(sliver, "PNG")  # aspect 20:1
  before = BAD_FILES.counts["skipped"]
  bad = {"truncated": jpeg.getvalue()[:500], "empty": b"", "html": b"<html></html>",
         "sliver": sliver.getvalue()}
  with caplog.at_level(logging.WARNING):
    for name, data in bad.items():
      assert decode_rgb(data, name) is None
      assert DecodeCenterCrop(SIZE).map({"image": data, "label": 1, "name": name}) is None
  assert BAD_FILES.counts["skipped"] == before + 2 * len(bad)
  assert f"({before + 2 * len(bad)} unusable files skipped so far" in caplog.text
  assert "skipping truncated: cannot decode" in caplog.text
  assert "skipping sliver: unusable size 200x10" in caplog.text


def _expected(files):
  """uint8 crop of each usable file, keyed by its bytes (both mirrors)."""
  out = {}
  for rel, label, data, ok in files:
    if ok:
      crop = center_crop_arr(decode_rgb(data), SIZE)
      out[crop.tobytes()] = (rel, label, False)
      out[crop[:, ::-1].tobytes()] = (rel, label, True)
  return out


def _identify(batches, files):
  """(file, label, flipped) of every example; fails on any image that is not a usable file."""
  expected, seen = _expected(files), []
  for b in batches:
    assert b["image"].shape == (len(b["label"]), SIZE, SIZE, 3)
    assert b["image"].dtype == np.float32 and b["label"].dtype == np.int32
    for image, label in zip(b["image"], b["label"]):
      pixels = np.round((image + 1.0) * 127.5).astype(np.uint8)
      np.testing.assert_allclose(image, to_float(pixels), atol=1e-6)
      rel, want_label, flipped = expected[pixels.tobytes()]
      assert label == want_label, rel
      seen.append((rel, flipped))
  return seen


def _check_epochs(source, files):
  ds = train_dataset(source, global_batch_size=3, image_size=SIZE, seed=0, process_index=0,
                     process_count=1)
  seen = _identify(itertools.islice(iter(ds), 12), files)  # 36 examples: 4 epochs of 9
  usable = {rel for rel, _, _, ok in files if ok}
  assert {rel for rel, _ in seen} == usable and len(usable) == 9
  assert {flipped for _, flipped in seen} == {False, True}
  assert len(set(seen[:9])) > 1 and [r for r, _ in seen[:9]] != [r for r, _ in seen[9:18]]
  return ds


def test_image_folder_through_the_pipeline(folder):
  root, files = folder
  source = ImageFolderSource(root)
  assert len(source) == 12 and source.num_classes == 3 and source.classes == list(SYNSETS)
  for i, (rel, label, data, _) in enumerate(sorted(files)):  # sorted classes, sorted files
    assert (source[i]["name"], source[i]["label"], source[i]["image"]) == (rel, label, data)
  ds = _check_epochs(source, files)
  it = iter(ds)  # resume: the same batches, crops and flips
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  resumed = iter(ds)
  resumed.set_state(state)
  for a, b in zip(want, [next(resumed) for _ in range(2)]):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_tfds_arrayrecord_through_the_pipeline(folder, tfds_dir):
  data_dir, name = tfds_dir
  source = create_source(config_dict.ConfigDict(
      {"name": "tfds", "tfds_name": name, "path": data_dir, "split": "train"}))
  assert isinstance(source, TfdsSource)
  assert len(source) == 12 and source.num_classes == 3
  by_name = {rel.split("/")[1]: (label, data) for rel, label, data, _ in folder[1]}
  for i in range(len(source)):  # TFDS shuffles on write: labels and bytes follow the file name
    record = source[i]
    assert (record["label"], record["image"]) == by_name[record["name"]]
  _check_epochs(source, folder[1])
  half = TfdsSource(name, data_dir=data_dir, split="train[:50%]")
  assert len(half) == 6


def test_decoding_in_grain_worker_processes(folder):
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  source = ImageFolderSource(folder[0])
  run = lambda workers: list(ordered_batches(  # noqa: E731
      source, np.arange(1, 12), [DecodeOrMark(SIZE)], 4, num_workers=workers))
  threads, workers = run(0), run(2)
  files = sorted(folder[1])
  assert [b["index"].tolist() for b in threads] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
  for b in threads:
    assert b["usable"].tolist() == [files[i][3] for i in b["index"]]
    assert b["label"].tolist() == [files[i][1] if files[i][3] else -1 for i in b["index"]]
  assert len(workers) == len(threads)
  for a, b in zip(threads, workers):  # the same stream, in the same order
    for key in ("image", "label", "index", "usable"):
      np.testing.assert_array_equal(a[key], b[key])


def test_missing_tfds_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    TfdsSource("imagenet2012", data_dir=str(tmp_path))
  message = str(e.value)
  assert f"not prepared in {tmp_path}/imagenet2012/5.1.0" in message
  assert "ILSVRC2012_img_train.tar" in message
  assert f"tfds build imagenet2012 --manual_dir=MANUAL_DIR --data_dir={tmp_path} " \
         "--file_format=array_record" in message
  with pytest.raises(FileNotFoundError, match="'no_such_dataset' is neither registered nor "
                                              "prepared"):
    TfdsSource("no_such_dataset", data_dir=str(tmp_path))


def test_missing_image_folder_and_settings(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist; expected a directory with one "
                                              "sub-folder of images per class"):
    ImageFolderSource(str(tmp_path / "nope"))
  (tmp_path / "n0").mkdir()
  (tmp_path / "n0" / "notes.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match="no images in"):
    ImageFolderSource(str(tmp_path))
  with pytest.raises(ValueError, match=r"config.data.path is not set; data source 'imagefolder' "
                                       r"needs the folder"):
    create_source(config_dict.ConfigDict({"name": "imagefolder"}))
  with pytest.raises(ValueError, match="ADM center crop makes square images"):
    encoded_image_transforms((32, 48))


def test_tiny_files_are_what_they_claim():
  modes = {rel.split("_", 1)[1]: Image.open(io.BytesIO(data)).mode
           for rel, _, data, ok in tiny_files() if ok}
  assert modes["gray.JPEG"] == "L" and modes["cmyk.JPEG"] == "CMYK" and modes["palette.JPEG"] == "P"
  assert modes["rgba.JPEG"] == "RGBA"

"""Bundled digits and the grain pipeline: contents, padding, shuffling, process slices, resume."""
import itertools

import numpy as np
import pytest

from dig_jax.data import DigitsSource, ToModelInput, create_source, train_dataset
from dig_jax.data.pipeline import pad_to_size


def test_bundled_digits_are_real_mnist_5k():
  src = DigitsSource()
  assert len(src) == 5000 and src.num_classes == 10
  assert np.array_equal(np.bincount(src.labels), [500] * 10)
  item = src[1234]
  assert item["image"].shape == (28, 28, 1) and item["image"].dtype == np.uint8
  # Real handwriting: dark background, some bright strokes, different digits differ.
  assert item["image"].max() > 200 and np.median(item["image"]) == 0
  assert not np.array_equal(src[0]["image"], src[1]["image"])


def test_to_model_input_pads_centre_and_rescales(rng):
  image = rng.integers(0, 256, size=(28, 28, 1), dtype=np.uint8)
  out = ToModelInput((32, 32)).map({"image": image, "label": 7})
  assert out["image"].shape == (32, 32, 1) and out["label"] == 7
  np.testing.assert_allclose(out["image"][2:30, 2:30], image / 127.5 - 1.0, atol=1e-6)
  assert np.all(out["image"][:2] == -1.0) and np.all(out["image"][:, 30:] == -1.0)
  with pytest.raises(ValueError, match="image of size 28x28 is larger than the training size 16x16"):
    pad_to_size(image, (16, 16))


def _key(batch):
  """Identifies each example of a batch by its label and pixel sum."""
  return [(int(l), round(float(im.sum()), 3)) for im, l in zip(batch["image"], batch["label"])]


def test_pipeline_batches_shuffle_and_epochs():
  src = create_source("digits")
  ds = train_dataset(src, global_batch_size=50, image_size=32, seed=3, process_index=0,
                     process_count=1)
  batches = list(itertools.islice(iter(ds), 201))  # one epoch is 100 batches
  b = batches[0]
  assert b["image"].shape == (50, 32, 32, 1) and b["label"].shape == (50,)
  assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
  epoch0 = sum((_key(x) for x in batches[:100]), [])
  epoch1 = sum((_key(x) for x in batches[100:200]), [])
  assert len(set(epoch0)) > 4900                       # an epoch covers the data once
  assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # reshuffled per epoch
  assert len(set(b["label"].tolist())) > 5             # shuffled, not sorted by class
  again = next(iter(train_dataset(src, global_batch_size=50, image_size=32, seed=3,
                                  process_index=0, process_count=1)))
  other = next(iter(train_dataset(src, global_batch_size=50, image_size=32, seed=4,
                                  process_index=0, process_count=1)))
  assert _key(again) == _key(b) and _key(other) != _key(b)


def test_process_slices_partition_the_global_order():
  src = create_source("digits")
  full = list(itertools.islice(iter(train_dataset(
      src, global_batch_size=8, image_size=32, seed=0, process_index=0, process_count=1)), 3))
  parts = [list(itertools.islice(iter(train_dataset(
      src, global_batch_size=8, image_size=32, seed=0, process_index=i, process_count=2)), 3))
      for i in range(2)]
  for step in range(3):  # process-major, the shares are the single process's batch, row for row
    assert all(p[step]["image"].shape[0] == 4 for p in parts)
    assert _key(parts[0][step]) + _key(parts[1][step]) == _key(full[step])
  with pytest.raises(ValueError, match="global batch size 7 must be divisible by the number of "
                                       "processes 2"):
    train_dataset(src, global_batch_size=7, image_size=32, seed=0, process_index=0,
                  process_count=2)


def test_iterator_state_resumes_exactly():
  ds = train_dataset(create_source("digits"), global_batch_size=16, image_size=32, seed=1,
                     process_index=0, process_count=1)
  it = iter(ds)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [_key(next(it)) for _ in range(3)]
  resumed = iter(ds)
  resumed.set_state(state)
  assert [_key(next(resumed)) for _ in range(3)] == expected


def test_unknown_source_is_refused():
  with pytest.raises(ValueError, match="unknown data source 'imagenet9'; expected one of"):
    create_source("imagenet9")

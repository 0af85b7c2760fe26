"""Deterministic stratified splits, embedded, mocked and real (tiny, offline) TFDS data,
on-device augmentation."""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tiny_tfds import TINY

from resmem_jax import data


def _rows(split):
  return {bytes(row) for row in split.images.reshape(len(split), -1)}


def test_mnist5k_splits():
  s = data.load_splits("mnist5k")
  assert (len(s.train), len(s.validation), len(s.test)) == (3500, 500, 1000)
  assert s.num_classes == 10 and s.image_shape == (28, 28, 1)
  for split, per_class in ((s.train, 350), (s.validation, 50), (s.test, 100)):
    assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(split.labels), [per_class] * 10)
  train, val, test = _rows(s.train), _rows(s.validation), _rows(s.test)
  assert not (train & val) and not (train & test) and not (val & test)
  # Real digits: ink on a blank background, not uniform noise.
  assert 20 < s.mean[0] < 60 and s.train.images.max() == 255


def _pixel_stats(*images):
  x = np.concatenate([i.reshape(-1, i.shape[-1]) for i in images]).astype(np.float64)
  return x.mean(0), x.std(0)


def test_normalisation_stats_come_from_the_train_split_only():
  s = data.load_splits("mnist5k")
  mean, std = _pixel_stats(s.train.images)
  np.testing.assert_allclose(s.mean, mean, rtol=1e-9)
  np.testing.assert_allclose(s.std, std, rtol=1e-9)
  # The tolerance can tell the train-only statistics from leaked (whole pool) ones.
  pool_mean, pool_std = _pixel_stats(s.train.images, s.validation.images, s.test.images)
  assert abs(pool_mean[0] - mean[0]) > 1e-6 * mean[0]
  assert abs(pool_std[0] - std[0]) > 1e-6 * std[0]


def test_channel_stats_in_chunks_match_the_direct_float64_stats():
  images = np.random.default_rng(0).integers(0, 256, (50, 7, 9, 3), dtype=np.uint8)
  mean, std = _pixel_stats(images)
  for chunk in (1, 100, 1 << 18):
    got_mean, got_std = data._channel_stats(images, chunk=chunk)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(got_std, std, rtol=1e-12)
  # Constant channels get the 1e-3 floor, not a zero std.
  assert data._channel_stats(np.full((2, 2, 2, 1), 7, np.uint8)) == ((7.0,), (1e-3,))


def test_mnist5k_default_split_is_pinned():
  # The quotas of the default split are plain proportions (350 / 50 / 100 per class), so
  # it selects the same digits as every earlier version: results stay comparable.
  _, labels = data._mnist5k()
  parts = data.stratified_split(labels, (3500, 500, 1000), seed=0)
  digests = [hashlib.sha256(p.astype("<i8").tobytes()).hexdigest()[:16] for p in parts]
  assert digests == ["952d8a51b317e470", "f3d77d42d3f5613b", "6f558d497099defe"]
  assert [p[:4].tolist() for p in parts] == [[0, 1, 2, 4], [5, 7, 15, 19], [3, 6, 8, 9]]


def test_splits_are_deterministic_and_seeded():
  a, b = data.load_splits("mnist5k"), data.load_splits("mnist5k")
  np.testing.assert_array_equal(a.test.images, b.test.images)
  np.testing.assert_array_equal(a.train.labels, b.train.labels)
  c = data.load_splits("mnist5k", split_seed=1)
  assert _rows(a.test) != _rows(c.test)


def test_digits_and_max_train():
  s = data.load_splits("digits", max_train=200)
  assert s.image_shape == (8, 8, 1)
  assert len(s.train) == 200 and len(s.test) == 1797 // 5
  assert np.bincount(s.train.labels).min() >= 19


def test_stratified_split():
  labels = np.repeat(np.arange(3), [50, 30, 20])
  parts = data.stratified_split(labels, (50, 10, 20), seed=0)
  assert [len(p) for p in parts] == [50, 10, 20]
  assert len(np.unique(np.concatenate(parts))) == 80
  np.testing.assert_array_equal(np.bincount(labels[parts[0]]), [25, 15, 10])
  with pytest.raises(ValueError, match="sizes"):
    data.stratified_split(labels, (90, 20), seed=0)
  with pytest.raises(ValueError, match="sizes"):
    data.stratified_split(labels, (10, -1), seed=0)
  with pytest.raises(TypeError, match="sizes"):
    data.stratified_split(labels, (10, 2.5), seed=0)
  # NaN labels formed a class with no members to give: a part came back short.
  with pytest.raises(TypeError, match="labels must have an integer dtype"):
    data.stratified_split(np.array([0.0, 1.0, np.nan, np.nan]), (4,), seed=0)
  with pytest.raises(ValueError, match="labels must be"):
    data.stratified_split(labels.reshape(10, 10), (5,), seed=0)
  with pytest.raises(ValueError, match="dataset"):
    data.load_splits("svhn")


def test_stratified_split_sizes_are_exact_and_shares_proportional():
  rng = np.random.default_rng(0)
  for case in range(300):
    counts = rng.integers(1, 40, rng.integers(1, 9))
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    n, k = len(labels), int(rng.integers(1, 6))
    sizes = [int(x) for x in rng.multinomial(rng.integers(0, n + 1),
                                             rng.dirichlet(np.ones(k)))]
    parts = data.stratified_split(labels, sizes, seed=case)
    assert [len(p) for p in parts] == sizes, (counts, sizes)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined) and (joined < n).all()
    left = counts.astype(float)
    for size, part in zip(sizes, parts):
      got = np.bincount(labels[part], minlength=len(counts))
      # The documented guarantee: within 1 of the part's share of what was left.
      share = size * left / left.sum() if left.sum() else np.zeros_like(left)
      assert np.abs(got - share).max() < 1 and (got <= left).all(), (counts, sizes)
      assert np.abs(got - size * counts / n).max() < 2.5, (counts, sizes)
      left -= got
    first = np.bincount(labels[parts[0]], minlength=len(counts))
    assert np.abs(first - sizes[0] * counts / n).max() < 1


def test_stratified_split_tiny_classes_never_give_a_short_part():
  for counts, sizes in (([1, 4, 4], (6, 1, 1, 1)), ([1, 8, 27, 27, 27], (75, 2, 1, 10, 2))):
    labels = np.repeat(np.arange(len(counts)), counts)
    for seed in range(5):
      parts = data.stratified_split(labels, sizes, seed=seed)
      assert tuple(len(p) for p in parts) == sizes


def test_stratified_split_ties_are_broken_by_the_seed():
  labels = np.repeat(np.arange(10), 10)
  mixes = set()
  for seed in range(8):
    train, val, test = data.stratified_split(labels, (90, 5, 5), seed=seed)
    np.testing.assert_array_equal(np.bincount(labels[train], minlength=10), [9] * 10)
    val_classes = labels[val]
    assert len(set(val_classes.tolist())) == 5  # one each of five classes
    assert set(val_classes.tolist()).isdisjoint(labels[test].tolist())
    mixes.add(tuple(sorted(val_classes.tolist())))
  assert len(mixes) > 1, mixes  # not always the lowest class indices
  # Real data: 25 validation digits of 10 balanced classes, 2 or 3 each, varying mix.
  mixes = {tuple(np.bincount(data.load_splits("mnist5k", val_size=25, test_size=25,
                                              split_seed=seed).validation.labels))
           for seed in range(3)}
  assert len(mixes) > 1 and all(sorted(set(m)) == [2, 3] for m in mixes)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"val_size": 499.9}, TypeError, "val_size"),
    ({"val_size": "500"}, TypeError, "val_size"),
    ({"val_size": True}, TypeError, "val_size"),
    ({"val_size": 0}, ValueError, "val_size"),
    ({"test_size": 0}, ValueError, "test_size"),
    ({"test_size": 2.0}, TypeError, "test_size"),
    ({"max_train": 0}, ValueError, "max_train"),
    ({"max_train": -5}, ValueError, "max_train"),
    ({"max_train": 10.5}, TypeError, "max_train"),
    ({"split_seed": -1}, ValueError, "split_seed"),
    ({"split_seed": 0.5}, TypeError, "split_seed"),
    ({"val_size": 1500, "test_size": 297}, ValueError, "train split"),
])
def test_load_splits_rejects_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    data.load_splits("digits", **kwargs)


def test_load_splits_accepts_numpy_ints():
  s = data.load_splits("digits", val_size=np.int64(100), test_size=np.int32(200),
                       max_train=np.int64(300), split_seed=np.uint8(3))
  assert (len(s.train), len(s.validation), len(s.test)) == (300, 100, 200)


def test_mock_cifar100_through_data_source():
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    s = data.load_splits("cifar100", val_size=4)
  assert s.num_classes == 100 and s.image_shape == (32, 32, 3)
  assert (len(s.train), len(s.validation), len(s.test)) == (16, 4, 20)
  assert s.train.labels.max() < 100


def test_mock_cifar10_with_max_train_and_test_size():
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    s = data.load_splits("cifar10", val_size=4, test_size=6, max_train=10)
    full = data.load_splits("cifar10", val_size=4)
    with pytest.raises(ValueError, match="test_size"):
      data.load_splits("cifar10", val_size=4, test_size=0)
    with pytest.raises(ValueError, match="train split"):
      data.load_splits("cifar10", val_size=20)
  assert s.num_classes == 10 and s.image_shape == (32, 32, 3)
  assert (len(s.train), len(s.validation), len(s.test)) == (10, 4, 6)
  train, val, test = _rows(s.train), _rows(s.validation), _rows(s.test)
  assert len(train) == 10 and len(val) == 4 and len(test) == 6  # distinct mock images
  assert train.isdisjoint(val)
  assert train <= _rows(full.train) and test <= _rows(full.test)
  # max_train does not move the validation split.
  np.testing.assert_array_equal(s.validation.images, full.validation.images)
  mean, std = _pixel_stats(s.train.images)
  np.testing.assert_allclose(s.mean, mean, rtol=1e-9)
  np.testing.assert_allclose(s.std, std, rtol=1e-9)


def test_augment_is_a_crop_of_the_padded_image_or_its_flip():
  images = jax.random.normal(jax.random.key(0), (16, 6, 6, 2))
  out = np.asarray(data.augment_crop_flip(jax.random.key(1), images, padding=2))
  padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
  n_flipped = n_moved = 0
  for b in range(16):
    found = None
    for dy in range(5):
      for dx in range(5):
        crop = padded[b, dy:dy + 6, dx:dx + 6]
        for flip in (False, True):
          if np.array_equal(out[b], crop[:, ::-1] if flip else crop):
            found = (dy, dx, flip)
    assert found is not None, b
    n_flipped += found[2]
    n_moved += found[:2] != (2, 2)
  assert 0 < n_flipped < 16 and n_moved > 8
  again = data.augment_crop_flip(jax.random.key(1), images, padding=2)
  np.testing.assert_array_equal(out, again)


def test_normalize():
  x = np.full((1, 2, 2, 3), 10, np.uint8)
  out = data.normalize(x, (10.0, 0.0, 5.0), (1.0, 2.0, 5.0))
  np.testing.assert_allclose(out[0, 0, 0], [0.0, 5.0, 1.0])
  assert out.dtype == jnp.float32
  # Statistics of another channel count would broadcast: grey images came back RGB.
  with pytest.raises(ValueError, match="one entry per channel"):
    data.normalize(np.zeros((1, 2, 2, 1), np.uint8), (1.0, 2.0, 3.0), (1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match="one entry per channel"):
    data.normalize(x, (5.0,), (2.0,))
  with pytest.raises(ValueError, match="std must be finite and > 0"):
    data.normalize(x, (1.0, 2.0, 3.0), (1.0, 0.0, 1.0))


def test_mock_imagenet_is_decoded_lazily_to_square_crops():
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    s = data.load_splits("imagenet2012", val_size=4, test_size=5, image_size=32,
                         manual_dir="/nonexistent/ILSVRC2012")
    assert (len(s.train), len(s.validation), len(s.test)) == (8, 4, 5)
    assert s.num_classes == 1000 and s.image_shape == (32, 32, 3)
    images, labels = s.train.take(np.array([0, 3, 5]))
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, s.train.labels[[0, 3, 5]])
    assert set(s.train.indices.tolist()).isdisjoint(s.validation.indices.tolist())


def test_resize_centre_crop():
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, 30:50] = 255  # a bright centre band survives the centre crop
  out = data._resize_centre_crop(image, 20, 16)
  assert out.shape == (16, 16, 3)
  assert out[8, 8, 0] == 255 and out[8, 0, 0] == 0


def _ids(images):
  return images[:, 0, 0, 0].astype(np.int64)


def test_a_real_tfds_dataset_is_prepared_as_array_record_and_split_without_tensorflow(
    tiny_tfds):
  """TFDS prepares TFRecord by default: without TensorFlow the preparation failed, and
  a TFRecord dataset has no random access for `tfds.data_source` anyway."""
  s = data.load_splits(TINY, val_size=6, test_size=9, data_dir=tiny_tfds)
  assert "tensorflow" not in sys.modules
  written = sorted(p.name for p in pathlib.Path(tiny_tfds).rglob(f"{TINY}-*"))
  assert written == [f"{TINY}-test.array_record-00000-of-00001",
                     f"{TINY}-train.array_record-00000-of-00001"]
  assert s.num_classes == 3 and s.image_shape == (8, 8, 3)
  assert (len(s.train), len(s.validation), len(s.test)) == (54, 6, 9)
  for split, per_class in ((s.train, 18), (s.validation, 2), (s.test, 3)):
    assert isinstance(split, data.ArraySplit)
    assert split.images.shape == (len(split), 8, 8, 3)
    assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
    np.testing.assert_array_equal(split.labels, _ids(split.images) % 3)
    assert (split.images[..., 1] == 50 * split.labels[:, None, None]).all()
    np.testing.assert_array_equal(np.bincount(split.labels), [per_class] * 3)
  train, val, test = _ids(s.train.images), _ids(s.validation.images), _ids(s.test.images)
  np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(60))
  assert len(set(test.tolist())) == 9 and set(test.tolist()) <= set(range(100, 124))
  mean, std = _pixel_stats(s.train.images)
  np.testing.assert_allclose(s.mean, mean, rtol=1e-9)
  np.testing.assert_allclose(s.std, std, rtol=1e-9)
  # Prepared once: the second call reads it again, to the same splits.
  again = data.load_splits(TINY, val_size=6, test_size=9, data_dir=tiny_tfds)
  for a, b in zip(again[:3], s[:3]):
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_a_tfds_dataset_prepared_as_tfrecord_is_refused_with_the_rebuild_command(
    tiny_tfds, tmp_path):
  data.load_splits(TINY, val_size=6, data_dir=tiny_tfds)  # prepared as ArrayRecord
  # No TFRecord can be written without TensorFlow: the prepared dataset is relabelled
  # as one (TFDS refuses the format as soon as it reads dataset_info.json).
  other = tmp_path / "tfrecord"
  shutil.copytree(tiny_tfds, other)
  (version,) = (other / TINY).iterdir()
  for path in version.glob(f"{TINY}-*"):
    path.rename(path.with_name(path.name.replace("array_record", "tfrecord")))
  info = json.loads((version / "dataset_info.json").read_text())
  info["fileFormat"] = "tfrecord"
  (version / "dataset_info.json").write_text(json.dumps(info))
  with pytest.raises(ValueError, match=f"prepared in another file format.*"
                     f"tfds build {TINY} --file_format=array_record --data_dir={other}"):
    data.load_splits(TINY, val_size=6, data_dir=str(other))


def test_lazy_tfds_splits_are_stratified_on_labels_read_without_decoding_an_image(
    tiny_tfds, monkeypatch):
  """The ImageNet path (`SourceSplit`) on real records: its labels used to decode every
  image of the split, so its validation split was a uniform draw instead."""
  monkeypatch.setattr(data, "_LAZY_TFDS", (TINY,))
  decoded = []
  decode = tfds.features.Image.decode_example_np

  def counted(self, *args, **kwargs):
    decoded.append(1)
    return decode(self, *args, **kwargs)

  monkeypatch.setattr(tfds.features.Image, "decode_example_np", counted)
  s = data.load_splits(TINY, val_size=6, test_size=9, image_size=8, data_dir=tiny_tfds)
  assert "tensorflow" not in sys.modules
  assert s.image_shape == (8, 8, 3) and s.num_classes == 3
  assert all(isinstance(split, data.SourceSplit) for split in s[:3])
  labels = [split.labels for split in s[:3]]
  assert not decoded  # every label read, no image decoded
  for split_labels, per_class in zip(labels, (18, 2, 3)):
    assert split_labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(split_labels), [per_class] * 3)
  assert set(s.train.indices.tolist()).isdisjoint(s.validation.indices.tolist())
  assert len(s.train.indices) + len(s.validation.indices) == 60
  images, labels = s.validation.take(np.arange(6))
  assert len(decoded) == 6
  assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, s.validation.labels)
  np.testing.assert_array_equal(labels, _ids(images) % 3)
  assert (images[..., 1] == 50 * labels[:, None, None]).all()
  again = data.load_splits(TINY, val_size=6, test_size=9, image_size=8, data_dir=tiny_tfds)
  for a, b in zip(again[:3], s[:3]):
    np.testing.assert_array_equal(a.indices, b.indices)
  # Decoded in threads, returned in the order asked (repeats included), as one by one.
  rows = np.array([7, 0, 3, 7, 12])
  images, labels = s.train.take(rows)
  one_by_one = [data._resize_centre_crop(np.asarray(s.train.source[int(r)]["image"]), 9, 8)
                for r in s.train.indices[rows]]
  np.testing.assert_array_equal(images, np.stack(one_by_one))
  np.testing.assert_array_equal(labels, s.train.labels[rows])
  images, labels = s.train.take(np.zeros(0, np.int64))
  assert images.shape == (0, 8, 8, 3) and images.dtype == np.uint8 and labels.shape == (0,)


def _box_resized(image, box, size):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box))


def test_random_resized_crop_flip_draws_a_box_of_the_asked_area_and_ratio():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
  a = data.random_resized_crop_flip(image, 12, np.random.default_rng(7))
  assert a.shape == (12, 12, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, data.random_resized_crop_flip(image, 12,
                                                                 np.random.default_rng(7)))
  outs = [data.random_resized_crop_flip(image, 12, np.random.default_rng(s)) for s in range(40)]
  assert len({o.tobytes() for o in outs}) == 40
  # The whole area at ratio 1 of a square image: the resized image, flipped or not.
  square = image[:, :30]
  whole = _box_resized(square, (0, 0, 30, 30), 12)
  flips = 0
  for seed in range(200):
    out = data.random_resized_crop_flip(square, 12, np.random.default_rng(seed),
                                        scale=(1.0, 1.0), ratio=(1.0, 1.0))
    flipped = np.array_equal(out, whole[:, ::-1])
    assert flipped or np.array_equal(out, whole)
    flips += flipped
  assert 70 < flips < 130  # probability 1/2
  # No box of the whole area fits a 4:1 image at ratio <= 4/3: the centre crop clipped
  # to ratio 4/3 after the attempts.
  wide = rng.integers(0, 256, (10, 40, 3), dtype=np.uint8)
  out = data.random_resized_crop_flip(wide, 6, np.random.default_rng(1), scale=(1.0, 1.0))
  centre = _box_resized(wide, (13, 0, 26, 10), 6)  # w = round(10 * 4/3) = 13, centred
  assert np.array_equal(out, centre) or np.array_equal(out, centre[:, ::-1])
  grey = data.random_resized_crop_flip(image[..., :1], 12, np.random.default_rng(7))
  assert grey.shape == (12, 12, 3) and (grey[..., 0] == grey[..., 2]).all()


def test_lazy_split_augments_by_seed_and_keeps_the_labels(tiny_tfds, monkeypatch):
  """Image b of a batch taken with augment_seed is the crop and flip drawn from
  default_rng((*augment_seed, b)): a resumed run replays its batches exactly."""
  monkeypatch.setattr(data, "_LAZY_TFDS", (TINY,))
  s = data.load_splits(TINY, val_size=6, image_size=8, data_dir=tiny_tfds)
  rows = np.arange(12)
  plain, labels = s.train.take(rows)
  a, a_labels = s.train.take(rows, augment_seed=(0, 5))
  np.testing.assert_array_equal(a, s.train.take(rows, augment_seed=(0, 5))[0])
  np.testing.assert_array_equal(a_labels, labels)
  assert a.shape == plain.shape == (12, 8, 8, 3) and a.dtype == np.uint8
  for b, row in enumerate(s.train.indices[rows]):
    decoded = np.asarray(s.train.source[int(row)]["image"])
    want = data.random_resized_crop_flip(decoded, 8, np.random.default_rng((0, 5, b)))
    np.testing.assert_array_equal(a[b], want)
  # The first two channels are constant: any crop keeps the example's id and label.
  np.testing.assert_array_equal(a[..., :2], plain[..., :2])
  c, _ = s.train.take(rows, augment_seed=(0, 6))
  assert not np.array_equal(a[..., 2], c[..., 2])
  assert not np.array_equal(a[..., 2], plain[..., 2])


def test_random_resized_crop_of_a_tall_image_falls_back_to_its_centre():
  """The fallback's other branch: no box of the whole area fits a 1:4 image at ratio >=
  3/4, so the centre crop of its full width clipped to ratio 3/4 is taken."""
  tall = np.random.default_rng(0).integers(0, 256, (40, 10, 3), dtype=np.uint8)
  out = data.random_resized_crop_flip(tall, 6, np.random.default_rng(1), scale=(1.0, 1.0))
  h = round(10 / (3 / 4))  # 13 rows, centred
  top = (40 - h) // 2
  centre = _box_resized(tall, (0, top, 10, top + h), 6)
  assert np.array_equal(out, centre) or np.array_equal(out, centre[:, ::-1])


def test_augment_draws_every_crop_offset_on_both_axes():
  """Offsets 0..2 * padding inclusive: the image shifted the whole padding to either
  side is one of the crops (a half-open bound never shifts it fully up or left)."""
  images = 1.0 + jnp.arange(64 * 3 * 3, dtype=jnp.float32).reshape(64, 3, 3, 1)
  out = np.asarray(data.augment_crop_flip(jax.random.key(0), images, padding=1))
  padded = np.pad(np.asarray(images), ((0, 0), (1, 1), (1, 1), (0, 0)))
  offsets = set()
  for b in range(64):
    for dy in range(3):
      for dx in range(3):
        crop = padded[b, dy:dy + 3, dx:dx + 3]
        if np.array_equal(out[b], crop) or np.array_equal(out[b], crop[:, ::-1]):
          offsets.add((dy, dx))
  assert {dy for dy, _ in offsets} == {dx for _, dx in offsets} == {0, 1, 2}


def test_max_train_keeps_a_stratified_subset_of_the_train_split():
  """max_train subsamples the train split stratified (mnist5k's pool is sorted by class:
  its first examples would be zeros and ones), and leaves validation alone."""
  full, s = data.load_splits("mnist5k"), data.load_splits("mnist5k", max_train=1000)
  np.testing.assert_array_equal(np.bincount(s.train.labels), [1000 // 10] * 10)
  assert _rows(s.train) <= _rows(full.train)
  np.testing.assert_array_equal(s.validation.images, full.validation.images)


def test_tfds_max_train_beyond_the_training_pool_keeps_all_of_it():
  """max_train is "at most": past the examples left after validation it keeps them all
  (it was capped at the whole training split and then overfilled it)."""
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    s = data.load_splits("cifar10", val_size=4, max_train=100)
  assert (len(s.train), len(s.validation)) == (16, 4)
  assert _rows(s.train).isdisjoint(_rows(s.validation))

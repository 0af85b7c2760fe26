r"""ImageNet (ILSVRC 2012) with ResNet-18 or ResNet-50, then ResMem.

TFDS `imagenet2012` through `tfds.data_source`; TFDS needs the two ILSVRC2012 tar
files in `manual_dir` to prepare it once, as ArrayRecord (`tfds build imagenet2012
--file_format=array_record --manual_dir=...`, with TensorFlow installed; a TFRecord
build cannot be read). Validation: 10000 training images, stratified (each class in
proportion to its training images, seed 0; the labels are read without decoding the
images); test: the official 50000-image validation split. Training images are
random-resized crops (8-100% of the area, aspect 3/4 to 4/3) flipped at random, as in
He et al. (2016); evaluation and the memory see centre crops (shorter side resized to
256, centre 224 crop). The JPEGs are decoded per batch by a pool of threads. No colour
or lighting augmentation.

Command (arg: "model=resnet18" or "model=resnet50"):
  python experiments/vision.py --workdir runs/imagenet_r18 \
    --config experiments/configs/imagenet.py:model=resnet18 \
    --config.manual_dir=/path/to/ILSVRC2012_tars --config.data_dir=/path/to/tfds

Expected result: not measured (needs accelerators and the ImageNet download). For
reference, the ResMem paper (Yang et al., 2023, Table 2) reports ResNet-50 DeepNet vs
ResMem top-1 on ImageNet at their scale.
"""

from __future__ import annotations

import ml_collections

from resmem_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, quick=False, model="resnet50")
  c = common.base_config()
  c.dataset = "imagenet2012"
  c.val_size = 10000
  c.image_size = 224
  c.model = args.model
  c.model_kwargs = ml_collections.ConfigDict({"width": 1.0})
  c.num_epochs = 90
  c.batch_size = 256
  c.learning_rate = 0.1
  c.weight_decay = 1e-4
  c.warmup_epochs = 5.0
  # Random-resized crop and flip, on the host as the images are decoded (`SourceSplit`).
  c.augment = True
  c.eval_batch_size = 250
  c.resmem.ks = (10, 50, 100, 200)
  c.resmem.sigmas = (0.3, 1.0, 3.0)
  c.resmem.temperatures = (0.5, 1.0, 2.0)
  if args.quick:
    c.num_epochs = 1
    c.image_size = 64
    c.max_train = 64
    c.val_size = 16
    c.test_size = 16
    c.batch_size = 8
    c.eval_batch_size = 8
    c.resmem.ks = (1, 5)
    c.resmem.sigmas = (1.0,)
    c.resmem.temperatures = (1.0,)
  return c

r"""CIFAR-10 with a CIFAR ResNet (depth 6n + 2, width multiplier), then ResMem.

TFDS `cifar10` through `tfds.data_source` (reading needs no TensorFlow). The dataset
must be prepared in `data_dir` as ArrayRecord (`tfds build cifar10
--file_format=array_record`; building needs TensorFlow, which encodes the images).
Validation: 5000 training images (stratified, seed 0); test: the 10000 official test
images. Recipe: that of He et al. (2016) for the architecture, batch 128, lr 0.1 and
the augmentation (random crop with 4-pixel padding, the padding being the mean pixel,
and horizontal flip, on device), except that the shortcuts are projections (their
option B) where they use option A on CIFAR. They use plain momentum 0.9, weight decay
1e-4 and step decays, where this config uses Nesterov momentum 0.9, weight decay 5e-4,
1 warmup epoch and cosine decay (a common modern CIFAR recipe).

Command (arg: "depth=20,width=1.0", plus "quick" for a CPU smoke run):
  python experiments/vision.py --workdir runs/cifar10_r20 --config experiments/configs/cifar10.py:depth=20
  python experiments/vision.py --workdir runs/cifar10_quick --config experiments/configs/cifar10.py:quick

Expected result: not measured on this project's hardware (a GPU run; the CPU machine
used for the README has no CIFAR download). For reference, He et al. (2016) report
91.25% test accuracy for ResNet-20 on CIFAR-10 with 164 epochs; the ResMem paper
(Yang et al., 2023, Fig. 3) reports ResMem above DeepNet, most for the smallest ResNets.
"""

from __future__ import annotations

import ml_collections

from resmem_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, quick=False, depth=20, width=1.0, dataset="cifar10")
  c = common.base_config()
  c.dataset = args.dataset
  c.val_size = 5000
  c.model = f"resnet{args.depth}"
  c.model_kwargs = ml_collections.ConfigDict({"width": float(args.width)})
  c.num_epochs = 160
  c.batch_size = 128
  c.learning_rate = 0.1
  c.weight_decay = 5e-4
  c.warmup_epochs = 1.0
  c.augment = True
  c.eval_batch_size = 1000
  if args.quick:
    c.model = "resnet8"
    c.model_kwargs.width = 0.5
    c.num_epochs = 1
    c.max_train = 2000
    c.val_size = 500
    c.resmem.ks = (1, 10)
    c.resmem.sigmas = (1.0,)
    c.resmem.temperatures = (1.0,)
  return c

r"""CIFAR-100 with a CIFAR ResNet, then ResMem: `cifar10.py` with 100 classes.

Command:
  python experiments/vision.py --workdir runs/cifar100_r20 --config experiments/configs/cifar100.py:depth=20
  python experiments/vision.py --workdir runs/cifar100_quick --config experiments/configs/cifar100.py:quick

Expected result: not measured on this project's hardware (needs a GPU and the TFDS
download). The ResMem paper (Yang et al., 2023, Fig. 3) reports the largest gains on
CIFAR-100 for the smallest ResNets.
"""

from __future__ import annotations

import ml_collections

from resmem_jax.configs import cifar10


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = "dataset=cifar100" + (f",{arg}" if arg else "")
  return cifar10.get_config(arg)

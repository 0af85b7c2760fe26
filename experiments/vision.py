r"""ResMem on a vision task: train a base network, add ResMem on its embedding, compare.

Intentionally kept short: all the logic is `resmem_jax.train.train_and_evaluate`
(or `run_size_sweep` for a config with a `sweep` field); this file parses flags,
runs it and prints the table.

  python experiments/vision.py --workdir runs/mnist
  python experiments/vision.py --workdir runs/mnist_quick --config experiments/configs/mnist.py:quick
  python experiments/vision.py --workdir runs/mnist_sweep --config experiments/configs/mnist_sweep.py
  python experiments/vision.py --workdir runs/cifar10 --config experiments/configs/cifar10.py:depth=20 \
      --config.data_dir=/path/to/tfds

Results land in the workdir: results.json, metrics.jsonl, analysis.json,
neighbours.png, checkpoints/ (an interrupted run resumes from its last checkpoint).
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from resmem_jax import analysis
from resmem_jax import train

_HERE = os.path.dirname(os.path.abspath(__file__))

_WORKDIR = flags.DEFINE_string("workdir", "runs/mnist", "Directory for checkpoints and results.")
config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "mnist.py"),
    "Config file (path[:arg]), e.g. experiments/configs/cifar10.py:quick.", lock_config=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  config = flags.FLAGS.config
  start = time.time()
  if "sweep" in config:
    rows = train.run_size_sweep(config, _WORKDIR.value)
    print(analysis.format_size_sweep_table(rows))
    print(f"wrote {os.path.join(_WORKDIR.value, 'size_sweep.json')} and size_sweep.png")
  else:
    results = train.train_and_evaluate(config, _WORKDIR.value)
    print(analysis.format_results_table(results))
    print(f"wrote {os.path.join(_WORKDIR.value, 'results.json')}")
  print(f"wall time {time.time() - start:.1f}s")


if __name__ == "__main__":
  app.run(main)

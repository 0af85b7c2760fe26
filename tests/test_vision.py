"""The command line: experiments/vision.py end to end, and the size sweep, on tiny runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from resmem_jax import analysis
from resmem_jax import configs
from resmem_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_vision_main_prints_the_table_and_writes_results(tmp_path):
  workdir = str(tmp_path / "mnist")
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "vision.py"),
         f"--workdir={workdir}",
         f"--config={os.path.join(ROOT, 'experiments', 'configs', 'mnist.py')}:quick",
         "--config.num_epochs=1", "--config.max_train=300", "--config.progress=False",
         "--config.analysis.num_examples=2"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "DeepNet" in out.stdout and "ResMem (k=" in out.stdout
  results = json.load(open(os.path.join(workdir, "results.json")))
  for key in ("deepnet_test_accuracy", "resmem_test_accuracy", "best", "n_train", "n_val",
              "n_test", "baselines"):
    assert key in results
  assert (results["n_train"], results["n_val"], results["n_test"]) == (300, 500, 1000)
  assert f"{100 * results['resmem_test_accuracy']:.2f}%" in out.stdout
  assert os.path.exists(os.path.join(workdir, "neighbours.png"))


def test_every_config_loads_with_its_quick_variant():
  for name in configs.NAMES:
    full, quick = configs.get_config(name), configs.get_config(name, "quick")
    assert full.num_epochs >= quick.num_epochs
    assert "dataset" in full and "resmem" in full
  assert configs.get_config("cifar10", "depth=32,width=2.0").model == "resnet32"
  with pytest.raises(ValueError, match="name"):
    configs.get_config("svhn")


def test_size_sweep_on_a_tiny_grid(tmp_path):
  config = configs.get_config("mnist_sweep", "quick")
  config.sweep.sizes = ((1, 2), (2, 4))
  config.sweep.seeds = (3,)
  config.max_train = 200
  config.steps_per_epoch = 2
  rows = train.run_size_sweep(config, str(tmp_path))
  assert [(r["width"], r["embed_dim"], r["seed"]) for r in rows] == [(1, 2, 3), (2, 4, 3)]
  assert rows[0]["params"] < rows[1]["params"]
  table = analysis.format_size_sweep_table(rows)
  assert "width=1,embed=2" in table and "width=2,embed=4" in table
  assert os.path.getsize(os.path.join(tmp_path, "size_sweep.png")) > 1000
  saved = json.load(open(os.path.join(tmp_path, "size_sweep.json")))
  assert len(saved["rows"]) == 2 and len(saved["summary"]) == 2


def test_size_sweep_summary_over_seeds():
  row = lambda size, params, seed, base, res: {
      "size": size, "params": params, "seed": seed, "deepnet_test_accuracy": base,
      "resmem_test_accuracy": res, "baselines": {"knn": res - 0.01, "knn_lm": base}}
  rows = [row("big", 100, 0, 0.9, 0.9), row("small", 10, 0, 0.5, 0.6),
          row("small", 10, 1, 0.7, 0.7), row("big", 100, 1, 0.8, 0.9)]
  small, big = analysis.summarize_size_sweep(rows)  # sorted by parameter count
  assert (small["size"], small["seeds"], big["size"]) == ("small", 2, "big")
  assert small["deepnet_mean"] == pytest.approx(0.6)
  assert small["deepnet_std"] == pytest.approx(0.1)
  assert small["gain_mean"] == pytest.approx(0.05)
  assert big["resmem_std"] == pytest.approx(0.0)
  assert big["knn_mean"] == pytest.approx(0.89)

"""Sharded kNN and memory on 8 simulated CPU devices equal one device exactly.

The device count is fixed when JAX initializes, so the checks run in a fresh
process (tests/sharded_check.py) with XLA_FLAGS set before JAX starts.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import resmem_jax as rm
from resmem_jax.kernels import sharded

SCRIPT = pathlib.Path(__file__).with_name("sharded_check.py")


def test_sharded_equals_single_device_on_8_cpu_devices(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=300,
                        cwd=SCRIPT.parent.parent)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert "SHARDED OK" in proc.stdout


def test_one_device_mesh_runs_the_sharded_path_with_the_same_result():
  mesh = jax.make_mesh((1,), ("data",))
  rng = np.random.default_rng(0)
  keys, queries = rng.normal(size=(2, 40, 4)).astype(np.float32)
  placed = jax.device_put(keys, NamedSharding(mesh, P("data", None)))
  assert sharded.row_axes(placed) == ("data",)
  assert sharded.row_axes(keys) is None
  assert sharded.row_axes(jax.device_put(keys, NamedSharding(mesh, P()))) is None
  got, want = rm.knn(queries, placed, 5), rm.knn(queries, keys, 5)
  np.testing.assert_array_equal(got.indices, want.indices)
  np.testing.assert_array_equal(got.distances, want.distances)

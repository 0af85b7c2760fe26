"""Sharded kNN and memory on 8 simulated CPU devices equal one device exactly.

The device count is fixed when JAX initializes, so the checks run in a fresh
process (tests/sharded_check.py) with XLA_FLAGS set before JAX starts.
"""

from __future__ import annotations

import hashlib
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


def test_fingerprint_tells_apart_arrays_that_differ_in_one_bit():
  """The multi-process check compares these fingerprints: equal arrays agree, and one
  flipped bit anywhere or a swap of two entries changes them, for every dtype the
  memory takes (shapes and dtypes are compared beside them)."""
  rng = np.random.default_rng(0)
  base = rng.normal(size=(37, 16)).astype(np.float32)
  arrays = [base, base.astype(jax.numpy.bfloat16), rng.integers(0, 5, 37).astype(np.int32),
            rng.integers(0, 5, 37).astype(np.int8), base > 0]
  for x in arrays:
    want = np.asarray(sharded._fingerprint(x))  # pylint: disable=protected-access
    assert want.shape == (2,) and want.dtype == np.uint32
    np.testing.assert_array_equal(sharded._fingerprint(np.copy(x)), want)  # pylint: disable=protected-access
    flat = np.copy(x).reshape(-1)
    swapped = flat.copy()
    j = int(np.argmax(flat != flat[0]))  # an entry unlike the first
    swapped[[0, j]] = swapped[[j, 0]]
    changed = [swapped]
    if x.dtype == np.bool_:
      changed.append(~flat)
    else:
      for i in (0, flat.size // 2, flat.size - 1):
        bits = flat.copy().view(f"u{flat.dtype.itemsize}")
        bits[i] ^= 1
        changed.append(bits.view(flat.dtype))
    if x.dtype.kind in "fi" and x.dtype.itemsize == 4:
      # A weighted sum of the bits let these cancel: 2^31 times two odd weights.
      top = flat.copy().view(np.uint32)
      top[[1, 7]] ^= np.uint32(1 << 31)
      changed.append(top.view(flat.dtype))
      if x.dtype.kind == "f":
        changed.append(-flat)
      high = flat.copy().view(np.uint32)
      high[[0, 2, 4, 6]] ^= np.uint32(1 << 30)
      changed.append(high.view(flat.dtype))
    for y in changed:
      got = np.asarray(sharded._fingerprint(y.reshape(x.shape)))  # pylint: disable=protected-access
      assert not np.array_equal(got, want), (x.dtype, got, want)


def test_fingerprint_sums_are_two_independent_hashes():
  """The fingerprint's two 32-bit sums mix the positions with different salts, so
  together they carry 64 bits (the multi-process check's 2^-64 collision rate); with
  one salt twice they are one 32-bit hash written twice, equal word for word."""
  rng = np.random.default_rng(1)
  for x in (rng.normal(size=(37, 16)).astype(np.float32), np.arange(5, dtype=np.int32),
            np.zeros(3, np.float32)):
    got = np.asarray(sharded._fingerprint(x))  # pylint: disable=protected-access
    assert got[0] != got[1], (x.dtype, got)


def _digest(leaf) -> bytes:
  digest = hashlib.blake2b(digest_size=8)
  sharded._hash_leaf(digest, leaf)  # pylint: disable=protected-access
  return digest.digest()


def test_hash_leaf_tells_apart_values_shapes_and_dtypes():
  """`check_same_on_every_process` compares these digests between processes (it returns
  at once in one process, so its pieces are checked here). Equal inputs hash alike; other
  values, or the same bits in another shape (transposed queries, say) or dtype, hash
  otherwise, on a device (by fingerprint) and in NumPy (by bytes)."""
  x = np.random.default_rng(2).normal(size=(6, 4)).astype(np.float32)
  for wrap in (np.asarray, jax.numpy.asarray):
    base = _digest(wrap(x))
    assert _digest(wrap(x.copy())) == base
    for other in (-x, x.reshape(4, 6), x.reshape(-1), x.view(np.int32)):
      assert _digest(wrap(other)) != base, (wrap, other.shape, other.dtype)
  assert _digest(3) == _digest(3) and _digest(3) != _digest(4)

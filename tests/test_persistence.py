"""save_memory / load_memory round trips and their checks (sharded loading: test_sharded)."""

from __future__ import annotations

import numpy as np
import pytest

import resmem_jax as rm


def _memory(task="classification", fingerprint="fp-1"):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 5)).astype(np.float32)
  if task == "classification":
    y, z = rng.integers(0, 3, 64), rng.normal(size=(64, 3)).astype(np.float32)
  else:
    y, z = rng.normal(size=(2, 64, 2)).astype(np.float32)
  return rm.build_memory(x, y, z, task=task, temperature=2.0, fingerprint=fingerprint)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_round_trip(tmp_path, task):
  mem = _memory(task)
  path = rm.save_memory(tmp_path / "mem", mem)
  loaded = rm.load_memory(path, task=task, dim=5, fingerprint="fp-1")
  assert loaded.meta == mem.meta
  for name in ("keys", "residuals", "outputs", "targets"):
    got, want = getattr(loaded, name), getattr(mem, name)
    assert got.dtype == want.dtype and got.shape == want.shape, name
    np.testing.assert_array_equal(got, want, err_msg=name)
  q = np.asarray(mem.keys[:7]) + 0.01
  out = np.asarray(mem.outputs[:7]).reshape((7,) + mem.meta.output_shape)
  np.testing.assert_array_equal(rm.predict(loaded, q, out, k=3, sigma=0.5),
                                rm.predict(mem, q, out, k=3, sigma=0.5))


def test_load_checks_expectations(tmp_path):
  path = rm.save_memory(tmp_path / "mem", _memory())
  with pytest.raises(ValueError, match="task='classification', got task='regression'"):
    rm.load_memory(path, task="regression")
  with pytest.raises(ValueError, match="dim=5, got dim=6"):
    rm.load_memory(path, dim=6)
  with pytest.raises(ValueError, match="n_outputs=3, got n_outputs=10"):
    rm.load_memory(path, n_outputs=10)
  with pytest.raises(ValueError, match="fingerprint='fp-1', got fingerprint='fp-2'"):
    rm.load_memory(path, fingerprint="fp-2")
  loaded = rm.load_memory(path)
  with pytest.raises(ValueError, match="fingerprint='fp-2'"):
    rm.predict(loaded, np.zeros((1, 5), np.float32), np.zeros((1, 3), np.float32), k=1,
               sigma=1.0, fingerprint="fp-2")
  with pytest.raises(ValueError, match="dimension D=5"):
    rm.predict(loaded, np.zeros((1, 4), np.float32), np.zeros((1, 3), np.float32), k=1,
               sigma=1.0)


def test_save_refuses_to_overwrite_and_load_refuses_foreign_dirs(tmp_path):
  mem = _memory()
  path = rm.save_memory(tmp_path / "mem", mem)
  with pytest.raises(ValueError, match="already exists"):
    rm.save_memory(path, mem)
  rm.save_memory(path, _memory(fingerprint="fp-new"), overwrite=True)
  assert rm.load_memory(path).meta.fingerprint == "fp-new"
  with pytest.raises(ValueError, match="directory written by rm.save_memory"):
    rm.load_memory(tmp_path / "missing")
  (tmp_path / "foreign").mkdir()
  with pytest.raises(ValueError, match="does not hold a saved rm.Memory"):
    rm.load_memory(tmp_path / "foreign")
  with pytest.raises(TypeError, match="mem must be a rm.Memory"):
    rm.save_memory(tmp_path / "x", {"keys": 1})
  with pytest.raises(ValueError, match="splits rows"):
    rm.load_memory(path, sharding="data")

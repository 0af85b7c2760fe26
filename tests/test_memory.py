"""Memory construction: residuals against float64 NumPy, metadata, pytree behaviour, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resmem_jax as rm


def _softmax64(z, t):
  z = np.asarray(z, np.float64) / t
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _data(n=40, d=6, c=4, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, c, n),
          (3 * rng.normal(size=(n, c))).astype(np.float32))


@pytest.mark.parametrize("temperature", [0.25, 1.0, 4.0])
def test_classification_residuals_match_numpy(temperature):
  _, y, z = _data()
  got = np.asarray(rm.residuals(y, z, task="classification", temperature=temperature))
  want = np.eye(z.shape[1])[y] - _softmax64(z, temperature)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(got.sum(axis=1), 0.0, atol=1e-6)  # rows of onehot - softmax


def test_regression_residuals_match_numpy():
  rng = np.random.default_rng(1)
  y, f = rng.normal(size=(2, 30, 3)).astype(np.float32)
  got = np.asarray(rm.residuals(y, f, task="regression"))
  np.testing.assert_allclose(got, y.astype(np.float64) - f, atol=1e-6)


def test_build_memory_classification_fields():
  x, y, z = _data()
  mem = rm.build_memory(x, y, z, task="classification", temperature=2.0, fingerprint="abc")
  assert mem.meta == rm.MemoryMeta(task="classification", temperature=2.0, dim=6, n_outputs=4,
                                   output_shape=(4,), dtype="float32", fingerprint="abc")
  assert mem.size == 40
  np.testing.assert_array_equal(mem.keys, x)
  np.testing.assert_array_equal(mem.targets, y)
  assert mem.targets.dtype == jnp.int32
  np.testing.assert_array_equal(mem.outputs, z)
  np.testing.assert_allclose(mem.residuals, np.eye(4)[y] - _softmax64(z, 2.0), atol=1e-6)


@pytest.mark.parametrize("shape", [(25,), (25, 3)])
def test_build_memory_regression_stores_rows(shape):
  rng = np.random.default_rng(2)
  x = rng.normal(size=(25, 5)).astype(np.float32)
  y, f = rng.normal(size=(2,) + shape).astype(np.float32)
  mem = rm.build_memory(x, y, f, task="regression")
  assert mem.meta.output_shape == shape[1:]
  assert mem.meta.n_outputs == (shape[1] if len(shape) == 2 else 1)
  assert mem.residuals.shape == (25, mem.meta.n_outputs)
  np.testing.assert_allclose(mem.residuals.reshape(shape), y.astype(np.float64) - f, atol=1e-6)


def test_memory_is_a_pytree_with_static_meta():
  x, y, z = _data()
  mem = rm.build_memory(x, y, z, task="classification", temperature=1.0)
  leaves = jax.tree_util.tree_leaves(mem)
  assert len(leaves) == 4  # keys, residuals, outputs, targets; meta is static
  traces = []

  @jax.jit
  def total(m):
    traces.append(m.meta)
    return jnp.sum(m.residuals) * m.meta.temperature

  total(mem)
  total(mem._replace(residuals=mem.residuals + 1.0))  # new values: no retrace
  assert len(traces) == 1
  total(rm.build_memory(x, y, z, task="classification", temperature=3.0))  # new meta: retrace
  assert len(traces) == 2
  mapped = jax.tree_util.tree_map(lambda a: a[:5], mem)
  assert mapped.meta == mem.meta and mapped.keys.shape == (5, 6)


def test_model_fingerprint_tracks_values_and_structure():
  params = {"dense": {"kernel": np.ones((3, 2), np.float32), "bias": np.zeros(2, np.float32)}}
  fp = rm.model_fingerprint(params)
  assert fp == rm.model_fingerprint(jax.tree_util.tree_map(jnp.asarray, params))
  changed = {"dense": {"kernel": params["dense"]["kernel"] * 2, "bias": params["dense"]["bias"]}}
  assert rm.model_fingerprint(changed) != fp
  assert rm.model_fingerprint({"other": params["dense"]}) != fp


def _bad_build_cases():
  x, y, z = _data(n=10, d=3, c=4)
  xn = x.copy()
  xn[2, 1] = np.nan
  zi = z.copy()
  zi[3, 0] = np.inf
  yr, fr = np.zeros((2, 10), np.float32)
  return [
      # (kwargs, exception, fragment of the message)
      (dict(embeddings=x.astype(np.int32)), TypeError, "embeddings.dtype"),
      (dict(embeddings=x[0]), ValueError, "embeddings.shape=(3,)"),
      (dict(embeddings=x[:0], targets=y[:0], base_outputs=z[:0]), ValueError, "empty"),
      (dict(embeddings=xn), ValueError, "embeddings[2, 1]=nan"),
      (dict(base_outputs=zi), ValueError, "base_outputs[3, 0]=inf"),
      # float64 input JAX computes in float32: 1e39 would become inf there.
      (dict(base_outputs=np.where(np.arange(4) == 2, 1e39, z.astype(np.float64))),
       ValueError, "base_outputs must be finite in float32"),
      (dict(embeddings=np.where(np.arange(3) == 1, -1e39, x.astype(np.float64))),
       ValueError, "embeddings[0, 1]=-1e+39"),
      (dict(targets=y.astype(np.float32)), TypeError, "targets.dtype=float32"),
      (dict(targets=np.where(np.arange(10) == 7, 4, y)), ValueError, "targets[7]=4"),
      (dict(targets=np.where(np.arange(10) == 1, -1, y)), ValueError, "targets[1]=-1"),
      (dict(targets=y[:9]), ValueError, "targets.shape=(9,)"),
      (dict(base_outputs=z[:, :, None]), ValueError, "base_outputs.shape=(10, 4, 1)"),
      (dict(base_outputs=z[:, :0]), ValueError, "C >= 1"),
      (dict(temperature=0.0), ValueError, "temperature=0.0"),
      (dict(temperature=-1.0), ValueError, "temperature=-1.0"),
      (dict(temperature=float("nan")), ValueError, "temperature=nan"),
      (dict(task="ranking"), ValueError, "task='ranking'"),
      (dict(fingerprint=123), TypeError, "fingerprint=123"),
      (dict(task="regression", targets=yr, base_outputs=fr[:, None]), ValueError,
       "base_outputs.shape=(10, 1)"),
      (dict(task="regression", targets=y, base_outputs=fr), TypeError, "targets.dtype"),
      (dict(task="regression", targets=np.where(np.arange(10) == 4, np.nan, yr),
            base_outputs=fr), ValueError, "targets[4]=nan"),
  ], (x, y, z)


@pytest.mark.parametrize("case", range(len(_bad_build_cases()[0])))
def test_build_memory_rejects_bad_input(case):
  cases, (x, y, z) = _bad_build_cases()
  overrides, exc, fragment = cases[case]
  kwargs = dict(embeddings=x, targets=y, base_outputs=z, task="classification", temperature=1.0)
  kwargs.update(overrides)
  with pytest.raises(exc, match=None) as info:
    rm.build_memory(kwargs.pop("embeddings"), kwargs.pop("targets"),
                    kwargs.pop("base_outputs"), **kwargs)
  assert fragment in str(info.value), str(info.value)


def test_residuals_rejects_bad_input():
  _, y, z = _data(n=10, c=4)
  with pytest.raises(ValueError, match=r"targets\[0\]=9"):
    rm.residuals(np.where(np.arange(10) == 0, 9, y), z)
  with pytest.raises(ValueError, match="temperature=0"):
    rm.residuals(y, z, temperature=0)

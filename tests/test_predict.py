"""`predict` against a float64 NumPy ResMem, and its invariants and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resmem_jax as rm
from resmem_jax.kernels import api as knn_api
from resmem_jax.predict import AGGREGATE_BATCH, AGGREGATE_BUDGET, _combine, aggregate_batch


def _softmax64(z, t):
  z = np.asarray(z, np.float64) / t
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def resmem_numpy(keys, res, queries, base, k, sigma, exclude=None):
  """float64 brute force: (distance, index) order, excluded points removed."""
  keys, queries = np.asarray(keys, np.float64), np.asarray(queries, np.float64)
  d = np.sqrt(((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1))
  if exclude is not None:
    d[np.arange(len(queries)), exclude] = np.inf
  idx = np.stack([np.lexsort((np.arange(len(keys)), row))[:k] for row in d])
  dk = np.take_along_axis(d, idx, axis=1)
  w = np.exp(-(dk - dk[:, :1]) / sigma)
  w /= w.sum(axis=1, keepdims=True)
  return base + np.einsum("qk,qkc->qc", w, np.asarray(res, np.float64)[idx]), idx, w


def _classification(n=300, q=50, d=8, c=6, t=1.5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = rng.integers(0, c, n)
  z = (2 * rng.normal(size=(n, c))).astype(np.float32)
  xq = rng.normal(size=(q, d)).astype(np.float32)
  zq = (2 * rng.normal(size=(q, c))).astype(np.float32)
  return rm.build_memory(x, y, z, task="classification", temperature=t), x, y, z, xq, zq


@pytest.mark.parametrize("k,sigma", [(1, 1.0), (7, 0.3), (20, 5.0)])
def test_classification_matches_numpy(k, sigma):
  mem, x, y, z, xq, zq = _classification()
  res64 = np.eye(6)[y] - _softmax64(z, 1.5)
  want, _, _ = resmem_numpy(x, res64, xq, _softmax64(zq, 1.5), k, sigma)
  got = rm.predict(mem, xq, zq, k=k, sigma=sigma)
  assert got.shape == (50, 6)
  np.testing.assert_allclose(got, want, atol=2e-6)
  np.testing.assert_allclose(np.asarray(got).sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("shape", [(), (3,)])
def test_regression_matches_numpy(shape):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(200, 5)).astype(np.float32)
  y, f = rng.normal(size=(2, 200) + shape).astype(np.float32)
  xq = rng.normal(size=(33, 5)).astype(np.float32)
  fq = rng.normal(size=(33,) + shape).astype(np.float32)
  mem = rm.build_memory(x, y, f, task="regression")
  res = (y.astype(np.float64) - f).reshape(200, -1)
  want, _, _ = resmem_numpy(x, res, xq, fq.reshape(33, -1), 9, 0.7)
  got = rm.predict(mem, xq, fq, k=9, sigma=0.7)
  assert got.shape == fq.shape
  np.testing.assert_allclose(np.asarray(got).reshape(33, -1), want, atol=2e-6)


def test_weights_are_a_stable_distribution():
  rng = np.random.default_rng(4)
  d = np.sort(rng.uniform(0, 1e6, size=(20, 10)), axis=1).astype(np.float32)
  for sigma in (1e-6, 1e-2, 1.0, 1e8):
    w = np.asarray(rm.neighbour_weights(d, sigma=sigma))
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
  # sigma -> 0: all weight on the nearest; huge distances do not underflow the row.
  w = np.asarray(rm.neighbour_weights(np.array([[1e30, 2e30, 3e30]], np.float32), sigma=1e-3))
  np.testing.assert_array_equal(w, [[1.0, 0.0, 0.0]])
  d64 = d[:3].astype(np.float64)
  want = np.exp(-(d64 - d64[:, :1]) / 3e5)
  np.testing.assert_allclose(rm.neighbour_weights(d[:3], sigma=3e5),
                             want / want.sum(1, keepdims=True), rtol=1e-5)


def test_weights_at_the_edges_of_float32():
  # sigma below the smallest normal float32 (flushed to 0 on CPU) is the sigma -> 0
  # limit, not 0 / 0; exact ties share the weight.
  for sigma in (1e-38, 1e-40, 1e-45, 1e-300):
    w = np.asarray(rm.neighbour_weights(np.array([[0.5, 0.5, 1.0], [0.0, 1.0, 2.0]],
                                                 np.float32), sigma=sigma))
    np.testing.assert_array_equal(w, [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
  # Distances that overflowed float32 (data near its range) tie: no inf - inf.
  w = np.asarray(rm.neighbour_weights(np.array([[3e38, np.inf, np.inf]], np.float32),
                                      sigma=1.0))
  np.testing.assert_array_equal(w, [[1.0, 0.0, 0.0]])
  w = np.asarray(rm.neighbour_weights(np.full((1, 4), np.inf, np.float32), sigma=1.0))
  np.testing.assert_array_equal(w, np.full((1, 4), 0.25))


@pytest.mark.parametrize("t", [1e-12, 1e-40, 1e-300])  # 1e-40: subnormal; 1e-300: 0 in f32
def test_tiny_temperature_gives_the_argmax_not_nan(t):
  mem, _, _, _, xq, zq = _classification(t=t)
  zq = 1e3 * zq
  for task_scores in (rm.predict(mem, xq, zq, k=5, sigma=0.5),
                      jax.jit(lambda m, e, z: rm.predict(m, e, z, k=5, sigma=0.5))(mem, xq, zq)):
    assert np.all(np.isfinite(np.asarray(task_scores)))
  base = np.asarray(jax.jit(rm.base_prediction, static_argnames="task")(
      zq, task="classification", temperature=t))
  np.testing.assert_array_equal(base, np.eye(zq.shape[1])[zq.argmax(axis=1)])
  assert np.all(np.isfinite(np.asarray(mem.residuals)))


def test_huge_sigma_acts_as_the_largest_safe_bandwidth():
  """Beyond 2^126, 1 / sigma would flush to 0 (uniform weights, inf * 0 = NaN)."""
  d = np.array([[1e38, 2e38, np.inf]], np.float32)
  for sigma in (3e38, 1e300):
    w = np.asarray(rm.neighbour_weights(d, sigma=sigma))
    np.testing.assert_allclose(w, np.asarray(rm.neighbour_weights(d, sigma=2.0 ** 126)))
    assert np.all(np.isfinite(w)) and w[0, 2] == 0.0 and w[0, 0] > w[0, 1]


@pytest.mark.filterwarnings("error")  # no float32 overflow of sigma or T on its way
def test_huge_sigma_in_predict_and_sweep_acts_as_the_largest_safe_bandwidth():
  """predict cast a host sigma of 1e300 to float32 inf before clamping it, and the
  jitted combination then read inf as a bad traced sigma: every prediction was NaN."""
  mem, x, y, z, xq, zq = _classification()
  want = np.asarray(rm.predict(mem, xq, zq, k=7, sigma=2.0 ** 126))
  assert np.all(np.isfinite(want))
  for sigma in (3e38, 1e300, np.float64(1e300)):
    np.testing.assert_array_equal(rm.predict(mem, xq, zq, k=7, sigma=sigma), want)
  yq = y[:len(xq)]
  res = rm.sweep(mem, xq, zq, yq, ks=(7,), sigmas=(1e300,), temperatures=(1e300, 1.5))
  want = rm.sweep(mem, xq, zq, yq, ks=(7,), sigmas=(2.0 ** 126,),
                  temperatures=(2.0 ** 126, 1.5))
  assert [r["accuracy"] for r in res.table] == [r["accuracy"] for r in want.table]
  assert all(np.isfinite(r["log_loss"]) for r in res.table)


def test_predict_under_jit_with_a_closed_over_memory():
  """The usual research pattern: a global memory inside a jitted eval step."""
  mem, _, _, _, xq, zq = _classification()
  want = np.asarray(rm.predict(mem, xq, zq, k=7, sigma=0.5))
  got = jax.jit(lambda e, z: rm.predict(mem, e, z, k=7, sigma=0.5))(xq, zq)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)
  device_logits = jnp.asarray(zq)
  got = jax.jit(lambda m, e: rm.predict(m, e, device_logits, k=7, sigma=0.5))(mem, xq)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)
  # A closed-over array is concrete, so its values are still checked.
  bad = jnp.asarray(zq).at[3, 1].set(jnp.nan)
  with pytest.raises(ValueError, match=r"base_outputs must be finite, got base_outputs\[3, 1\]"):
    jax.jit(lambda e: rm.predict(mem, e, bad, k=7, sigma=0.5))(xq)


def test_non_finite_input_under_jit_gives_nan_not_a_plausible_answer():
  """Traced values cannot be checked; an inf used to come out as a finite prediction
  (its neighbour index N clamped to the last row, or an inf key dropped)."""
  mem, _, _, _, xq, zq = _classification()
  want = np.asarray(rm.predict(mem, xq, zq, k=7, sigma=0.5))
  step = jax.jit(lambda m, e: rm.predict(m, e, zq, k=7, sigma=0.5))
  got = np.asarray(step(mem, jnp.asarray(xq).at[3, 0].set(jnp.inf)))
  assert np.all(np.isnan(got[3]))
  np.testing.assert_allclose(np.delete(got, 3, axis=0), np.delete(want, 3, axis=0),
                             rtol=0, atol=1e-6)
  bad_key = mem._replace(keys=mem.keys.at[0, 0].set(-jnp.inf))
  assert np.all(np.isnan(np.asarray(step(bad_key, xq))))


def test_out_of_range_labels_under_jit_give_nan_residuals():
  _, x, y, z, _, _ = _classification()
  y = np.asarray(y).copy()
  y[2] = z.shape[1]  # one past the last class
  y[5] = -1  # the usual "no label" marker: its one-hot is zeros, a plausible residual
  mem = jax.jit(lambda yy: rm.build_memory(x, yy, z, task="classification",
                                           temperature=1.0))(y)
  res = np.asarray(mem.residuals)
  assert np.all(np.isnan(res[[2, 5]]))
  assert np.all(np.isfinite(np.delete(res, [2, 5], axis=0)))
  with pytest.raises(ValueError, match=r"targets must be labels in \[0, C=\d+\)"):
    rm.build_memory(x, y, z, task="classification", temperature=1.0)


@pytest.mark.parametrize("bad,low,high", [(-2, -2, None), (99, 0, 99)])
def test_out_of_range_labels_name_the_range_and_the_first(bad, low, high):
  """The range is reduced on the devices; the first bad label is then named."""
  _, x, y, z, _, _ = _classification()
  y = np.asarray(y).copy()
  y[[3, 5]] = bad
  high = int(np.max(y)) if high is None else high
  with pytest.raises(ValueError, match=rf"targets must be labels in \[0, C={z.shape[1]}\), "
                                       rf"got labels from {low} to {high}; first "
                                       rf"targets\[3\]={bad}$"):
    rm.build_memory(x, y, z, task="classification", temperature=1.0)


def test_sigma_as_an_array_or_traced():
  mem, _, _, _, xq, zq = _classification()
  want = np.asarray(rm.predict(mem, xq, zq, k=7, sigma=0.5))
  for sigma in (np.float32(0.5), np.array(0.5), jnp.asarray(0.5)):
    np.testing.assert_array_equal(rm.predict(mem, xq, zq, k=7, sigma=sigma), want)
  got = jax.jit(lambda s: rm.predict(mem, xq, zq, k=7, sigma=s))(0.5)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)
  # Differentiable in sigma: the analytic derivative of the weights, by finite differences.
  loss = lambda s: rm.predict(mem, xq, zq, k=7, sigma=s)[:, 0].sum()  # noqa: E731
  step = 1e-2
  numeric = (float(loss(0.5 + step)) - float(loss(0.5 - step))) / (2 * step)
  assert float(jax.grad(loss)(0.5)) == pytest.approx(numeric, rel=1e-2, abs=1e-4)
  with pytest.raises(TypeError, match=r"sigma.shape=\(2,\)"):
    rm.predict(mem, xq, zq, k=7, sigma=np.array([0.5, 1.0]))


def test_differentiable_in_the_query_embeddings_also_on_a_key():
  """d/dq of the prediction against float64 central differences of the brute force, with
  the neighbour sets fixed; a query lying on a key (d = 0, where ||q - x|| has no
  derivative) gets the subgradient 0 for that term, which central differences also give,
  rather than a NaN gradient for the whole batch."""
  mem, x, _, _, xq, zq = _classification()
  xq = xq[:6].copy()
  xq[0] = x[17]
  base = _softmax64(zq[:6], 1.5)
  project = np.random.default_rng(3).normal(size=base.shape[1])
  got = np.asarray(jax.jacrev(lambda e: rm.predict(mem, e, zq[:6], k=7, sigma=0.5)
                              @ jnp.asarray(project, jnp.float32))(jnp.asarray(xq)))
  got = np.einsum("qqd->qd", got)  # each row depends on its own query only
  assert np.isfinite(got).all()
  _, idx, _ = resmem_numpy(x, mem.residuals, xq, base, 7, 0.5)
  keys = np.asarray(x, np.float64)[idx]  # (Q, k, D), fixed neighbours
  res = np.asarray(mem.residuals, np.float64)[idx] @ project  # (Q, k)

  def f(q):  # (Q, D) -> (Q,), the residual term (the base does not depend on q)
    d = np.sqrt(((q[:, None, :] - keys) ** 2).sum(-1))
    w = np.exp(-(d - d.min(axis=1, keepdims=True)) / 0.5)
    return (w * res).sum(1) / w.sum(1)

  step, want = 1e-6, np.zeros_like(got, np.float64)
  for j in range(xq.shape[1]):
    shift = np.zeros(xq.shape[1])
    shift[j] = step
    want[:, j] = (f(xq + shift) - f(xq - shift)) / (2 * step)
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_k_may_equal_the_memory_size():
  """1 <= k <= N: k = N weighs the whole memory, in predict and in sweep."""
  mem, x, y, z, xq, zq = _classification(n=20, q=7)
  res = np.eye(z.shape[1])[y] - _softmax64(z, 1.5)
  want, _, _ = resmem_numpy(x, res, xq, _softmax64(zq, 1.5), 20, 0.7)
  np.testing.assert_allclose(rm.predict(mem, xq, zq, k=20, sigma=0.7), want, atol=2e-6)
  yq = np.arange(7) % z.shape[1]
  row = rm.sweep(mem, xq, zq, yq, ks=(20,), sigmas=(0.7,)).best["resmem"]
  log_loss = -np.log(np.clip(want[np.arange(7), yq], 1e-7, 1.0)).mean()
  assert row["k"] == 20 and row["log_loss"] == pytest.approx(log_loss, rel=1e-5)


@pytest.mark.parametrize("n_q", [1, 37, 5000])
def test_residual_gather_batch_is_the_largest_power_of_two_within_the_budget(n_q):
  """(batch, k, C) stays within AGGREGATE_BUDGET floats, with the largest such power
  of two (at most AGGREGATE_BATCH and the query count; 1 if even one row is over)."""
  for k in (1, 3, 10, 100, 1000, 5000):
    for c in (1, 7, 100, 1000, 10000):
      b = aggregate_batch(n_q, k, c)
      fits = [2 ** e for e in range(10) if 2 ** e * k * c <= AGGREGATE_BUDGET]
      assert b == min(AGGREGATE_BATCH, n_q, max(fits, default=1)), (n_q, k, c, b)


def test_residual_gather_stays_within_its_budget_at_large_k_and_c():
  """A fixed batch of 512 queries gathered (512, k, C) rows: 1957 MiB of compiled
  scratch at k = C = 1000 (measured with the old batch); the batch now shrinks."""
  sds = jax.ShapeDtypeStruct
  for k, c in ((10, 1000), (1000, 1000)):
    compiled = jax.jit(rm.aggregate_residuals).lower(
        sds((4000, c), jnp.float32), sds((1024, k), jnp.int32),
        sds((1024, k), jnp.float32)).compile()
    scratch = compiled.memory_analysis().temp_size_in_bytes
    assert scratch < 2 * AGGREGATE_BUDGET * 4, (k, c, scratch)  # 64 MiB


def test_memory_permutation_does_not_change_predictions():
  mem, x, y, z, xq, zq = _classification()
  perm = np.random.default_rng(5).permutation(len(x))
  shuffled = rm.build_memory(x[perm], y[perm], z[perm], task="classification", temperature=1.5)
  np.testing.assert_allclose(rm.predict(shuffled, xq, zq, k=10, sigma=0.5),
                             rm.predict(mem, xq, zq, k=10, sigma=0.5), atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_k1_memorizes_training_labels(temperature):
  mem, x, y, z, _, _ = _classification(t=temperature)
  got = np.asarray(rm.predict(mem, x, z, k=1, sigma=1.0))
  np.testing.assert_array_equal(got.argmax(axis=1), y)
  np.testing.assert_allclose(got, np.eye(6)[y], atol=1e-6)
  rng = np.random.default_rng(6)
  yr, fr = rng.normal(size=(2, len(x))).astype(np.float32)
  reg = rm.build_memory(x, yr, fr, task="regression")
  np.testing.assert_allclose(rm.predict(reg, x, fr, k=1, sigma=1.0), yr, atol=1e-6)


def test_leave_one_out_equals_search_without_the_point():
  rng = np.random.default_rng(7)
  n, c, k = 40, 3, 5
  x = rng.normal(size=(n, 4)).astype(np.float32)
  # Exact duplicates and a point equidistant to several others: ties must resolve by
  # index exactly as a search on the reduced memory would.
  x[6] = x[5]
  x[12] = x[5]
  y = rng.integers(0, c, n)
  z = rng.normal(size=(n, c)).astype(np.float32)
  mem = rm.build_memory(x, y, z, task="classification", temperature=1.0)
  loo = np.asarray(rm.predict(mem, x, z, k=k, sigma=0.4, exclude=np.arange(n)))
  for i in range(n):
    keep = np.arange(n) != i
    reduced = rm.build_memory(x[keep], y[keep], z[keep], task="classification", temperature=1.0)
    want = rm.predict(reduced, x[i:i + 1], z[i:i + 1], k=k, sigma=0.4)
    np.testing.assert_allclose(loo[i:i + 1], want, atol=1e-6, err_msg=f"query {i}")
  # Excluding a point that is not among the k + 1 nearest drops the last one instead.
  far = np.argmax(((x - x[0]) ** 2).sum(1))
  np.testing.assert_allclose(
      rm.predict(mem, x[:1], z[:1], k=k, sigma=0.4, exclude=np.array([far])),
      rm.predict(mem, x[:1], z[:1], k=k, sigma=0.4), atol=1e-7)


def test_drop_excluded_matches_numpy_order():
  mem, x, y, z, _, _ = _classification(n=60)
  res = rm.knn(x, mem.keys, 8)
  exclude = np.where(np.arange(60) % 2 == 0, np.arange(60), 0)
  kept = rm.drop_excluded(res.distances, res.indices, exclude)
  _, want_idx, _ = resmem_numpy(x, np.zeros((60, 1)), x, np.zeros((60, 1)), 7, 1.0, exclude)
  np.testing.assert_array_equal(kept.indices, want_idx)


@pytest.mark.parametrize("as_jax", [False, True])
def test_batch_sizes_inside_a_bucket_and_new_sigma_do_not_recompile(as_jax):
  mem, _, _, _, xq, zq = _classification(q=120)
  if as_jax:  # what a Flax model hands over
    xq, zq = jnp.asarray(xq), jnp.asarray(zq)
  rm.predict(mem, xq[:100], zq[:100], k=4, sigma=1.0)
  before = _combine._cache_size(), knn_api._knn_padded._cache_size()
  rm.predict(mem, xq[:110], zq[:110], k=4, sigma=0.2)  # 100 and 110 share the bucket 112
  rm.predict(mem, xq[:97], zq[:97], k=4, sigma=7.0)
  assert (_combine._cache_size(), knn_api._knn_padded._cache_size()) == before


def test_streamed_chunks_equal_one_search():
  mem, _, _, _, xq, zq = _classification(q=50)
  whole = rm.predict(mem, xq, zq, k=6, sigma=0.5)
  np.testing.assert_allclose(rm.predict(mem, xq, zq, k=6, sigma=0.5, query_chunk=16), whole,
                             atol=1e-7)
  exclude = np.arange(50)
  np.testing.assert_allclose(
      rm.predict(mem, xq, zq, k=6, sigma=0.5, exclude=exclude, query_chunk=7),
      rm.predict(mem, xq, zq, k=6, sigma=0.5, exclude=exclude), atol=1e-7)


def test_empty_query_batch():
  mem, _, _, _, xq, zq = _classification()
  assert rm.predict(mem, xq[:0], zq[:0], k=3, sigma=1.0).shape == (0, 6)


def _bad_predict_cases():
  nan_q = np.zeros((4, 8), np.float32)
  nan_q[1, 2] = np.nan
  return [
      (dict(mem="memory"), TypeError, "mem must be a rm.Memory"),
      (dict(embeddings=np.zeros((4, 5), np.float32)), ValueError, "dimension D=8"),
      (dict(embeddings=np.zeros((4, 8), np.int32)), TypeError, "embeddings.dtype=int32"),
      (dict(embeddings=nan_q), ValueError, "embeddings[1, 2]=nan"),
      (dict(base_outputs=np.zeros((4, 7), np.float32)), ValueError, "C=6 classes"),
      (dict(base_outputs=np.zeros((3, 6), np.float32)), ValueError, "base_outputs.shape=(3, 6)"),
      (dict(base_outputs=np.full((4, 6), np.inf, np.float32)), ValueError, "=inf"),
      (dict(k=0), ValueError, "k=0"),
      (dict(k=301), ValueError, "k=301"),
      (dict(k=2.0), TypeError, "k=2.0"),
      (dict(k=300, exclude=np.arange(4)), ValueError, "N - 1 = 299"),
      (dict(sigma=0.0), ValueError, "sigma=0.0"),
      (dict(sigma=-2.0), ValueError, "sigma=-2.0"),
      (dict(sigma=float("inf")), ValueError, "sigma=inf"),
      (dict(exclude=np.arange(3)), ValueError, "exclude.shape=(3,)"),
      (dict(exclude=np.array([0, 1, 300, 2])), ValueError, "exclude[2]=300"),
      (dict(exclude=np.array([0, 1, -1, 2])), ValueError, "exclude[2]=-1"),
      (dict(exclude=np.zeros(4, np.float32)), TypeError, "exclude.dtype"),
      (dict(task="regression"), ValueError, "built for task='classification'"),
      (dict(fingerprint="other"), ValueError, "fingerprint='other'"),
      (dict(query_chunk=0), ValueError, "query_chunk=0"),
      (dict(implementation="faiss"), ValueError, "implementation='faiss'"),
  ]


@pytest.mark.parametrize("case", range(len(_bad_predict_cases())))
def test_predict_rejects_bad_input(case):
  mem, _, _, _, xq, zq = _classification()
  overrides, exc, fragment = _bad_predict_cases()[case]
  kwargs = dict(mem=mem, embeddings=xq[:4], base_outputs=zq[:4], k=3, sigma=1.0)
  kwargs.update(overrides)
  with pytest.raises(exc) as info:
    rm.predict(kwargs.pop("mem"), kwargs.pop("embeddings"), kwargs.pop("base_outputs"), **kwargs)
  assert fragment in str(info.value), str(info.value)


def test_predict_rejects_a_memory_whose_arrays_disagree_with_its_meta():
  """Before this check, residuals with fewer rows than keys were gathered with clamped
  indices and gave plausible-looking scores."""
  mem, _, _, _, xq, zq = _classification()
  rows = ("keys", "residuals", "outputs", "targets")
  cases = [
      (mem._replace(residuals=mem.residuals[:10]), r"mem.residuals must be shaped \(300, 6\)"),
      (mem._replace(outputs=mem.outputs[:, :5]), r"mem.outputs must be shaped \(300, 6\)"),
      (mem._replace(keys=mem.keys[:, :3]), r"mem.keys must be shaped \(300, 8\)"),
      (mem._replace(targets=mem.targets.astype(jnp.float32)), "mem.targets must have an integer"),
      (mem._replace(**{name: getattr(mem, name)[:0] for name in rows}), "mem is empty"),
  ]
  for bad, message in cases:
    with pytest.raises(ValueError, match=message):
      rm.predict(bad, xq[:4], zq[:4], k=3, sigma=1.0)
  rm.predict(mem._replace(residuals=mem.residuals.astype(jnp.bfloat16)), xq[:4], zq[:4], k=3,
             sigma=1.0)  # another float dtype is fine


def test_regression_memory_rejects_classification_shaped_outputs():
  rng = np.random.default_rng(8)
  x = rng.normal(size=(20, 3)).astype(np.float32)
  mem = rm.build_memory(x, np.zeros(20, np.float32), np.zeros(20, np.float32), task="regression")
  with pytest.raises(ValueError, match=r"per-example shape \(\)"):
    rm.predict(mem, x[:2], np.zeros((2, 5), np.float32), k=1, sigma=1.0)
  with pytest.raises(ValueError, match="built for task='regression'"):
    rm.predict(mem, x[:2], np.zeros(2, np.float32), k=1, sigma=1.0, task="classification")


def test_under_jit_a_bad_sigma_or_exclude_gives_nan_rows():
  """Traced values cannot be checked: a sigma <= 0 used to act as the sigma -> 0 limit
  and an exclude outside [0, N) as no exclusion, both plausible; now they are NaN."""
  mem, x, _, z, _, _ = _classification(n=30)
  f = jax.jit(lambda e, o, ex, s: rm.predict(mem, e, o, k=3, sigma=s, exclude=ex))
  good = np.asarray(f(x[:3], z[:3], jnp.array([0, 1, 2]), 1.0))
  assert np.isfinite(good).all()
  np.testing.assert_allclose(
      good, rm.predict(mem, x[:3], z[:3], k=3, sigma=1.0, exclude=np.arange(3)), atol=1e-6)
  out = np.asarray(f(x[:3], z[:3], jnp.array([0, 999, -1]), 1.0))
  np.testing.assert_array_equal(out[0], good[0])
  assert np.isnan(out[1:]).all()
  for sigma in (0.0, -1.0, float("inf"), float("nan")):
    assert np.isnan(np.asarray(f(x[:3], z[:3], jnp.array([0, 1, 2]), sigma))).all(), sigma


def test_neighbour_weights_checks_a_concrete_sigma():
  d = jnp.array([[0.0, 1.0]])
  for sigma in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
      rm.neighbour_weights(d, sigma=sigma)
  traced = jax.jit(lambda s: rm.neighbour_weights(d, sigma=s))
  assert np.isnan(np.asarray(traced(-1.0))).all()
  np.testing.assert_allclose(traced(1.0), rm.neighbour_weights(d, sigma=1.0), rtol=1e-6)


def test_drop_excluded_marks_out_of_range_rows():
  dist = jnp.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
  idx = jnp.array([[4, 2, 7], [4, 2, 7]], jnp.int32)
  res = rm.drop_excluded(dist, idx, jnp.array([2, 10]), n=10)
  np.testing.assert_array_equal(res.indices, [[4, 7], [4, 2]])
  np.testing.assert_array_equal(res.distances[0], [0.0, 2.0])
  assert np.isnan(np.asarray(res.distances[1])).all()

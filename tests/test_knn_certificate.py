"""The exactness certificate and its direct fallback, on data where the fast ranking fails.

On 20k points of the unit circle the neighbour gaps (~3e-4) are far below the float32
rounding of ||x||^2 - 2 q.x on unit vectors (~1e-7 relative to 1, i.e. ~3e-4 in
distance): the ranked candidates alone return wrong neighbours, so the certificate
must fail and the direct search must take over.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resmem_jax as rm
from resmem_jax.kernels import api


def circle(rng, n):
  angle = rng.uniform(0, 2 * np.pi, size=n)
  return np.stack([np.cos(angle), np.sin(angle)], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def dense():
  rng = np.random.default_rng(0)
  keys, queries = circle(rng, 20_000), circle(rng, 200)
  d2 = ((queries[:, None, :].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)
  return queries, keys, d2


def check_exact(result, d2, k):
  order = np.argsort(d2, axis=1, kind="stable")[:, :k]
  want = np.sqrt(np.take_along_axis(d2, order, axis=1))
  np.testing.assert_allclose(np.asarray(result.distances), want, rtol=1e-6, atol=1e-9)
  # Indices wherever the float64 gap to the next neighbour is above float32 rounding.
  gaps = np.diff(np.sqrt(np.sort(d2, axis=1)[:, :k + 1]), axis=1)
  separated = gaps > 1e-6 * np.maximum(want, 1e-6)
  np.testing.assert_array_equal(np.asarray(result.indices)[separated], order[separated])


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_dense_circle_is_exact_through_the_fallback(dense, k, implementation):
  queries, keys, d2 = dense
  _, _, certified = api._knn_padded(jnp.asarray(queries), jnp.asarray(keys), k=k, metric="l2",
                                    implementation=implementation, block_sizes=None)
  assert not np.asarray(certified).all(), "the certificate should fail on this data"
  check_exact(rm.knn(queries, keys, k, implementation=implementation), d2, k)


def test_fallback_under_an_outer_jit(dense):
  queries, keys, d2 = dense
  result = jax.jit(lambda q, x: rm.knn(q, x, 3, implementation="xla"))(queries, keys)
  check_exact(result, d2, 3)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("relu", [False, True])
def test_certificate_passes_on_ordinary_data(metric, relu):
  """Gaussian data, and non-negative (ReLU) data whose inner products are all large
  next to their gaps: no row needs the fallback."""
  rng = np.random.default_rng(1)
  keys = rng.normal(size=(5000, 64)).astype(np.float32)
  queries = rng.normal(size=(64, 64)).astype(np.float32)
  if relu:
    keys, queries = np.maximum(keys, 0.0), np.maximum(queries, 0.0)
  _, _, certified = api._knn_padded(jnp.asarray(queries), jnp.asarray(keys), k=10,
                                    metric=metric, implementation="xla", block_sizes=None)
  assert np.asarray(certified).all()


def test_ip_ties_fail_the_certificate_and_come_back_in_index_order():
  """Copies of one key are the best inner products of most queries: their scores tie,
  the certificate cannot separate the k-th from the candidates left out, and the
  direct search returns the copies lowest index first."""
  rng = np.random.default_rng(3)
  keys = rng.normal(size=(500, 16)).astype(np.float32)
  queries = rng.normal(size=(32, 16)).astype(np.float32)
  copies = np.arange(7, 500, 25)  # 20 copies
  keys[copies] = 5.0 * keys[copies[0]]
  _, _, certified = api._knn_padded(jnp.asarray(queries), jnp.asarray(keys), k=3,
                                    metric="ip", implementation="xla", block_sizes=None)
  others = np.delete(keys, copies, axis=0)
  winners = queries @ keys[copies[0]] > (queries @ others.T).max(axis=1)  # led by copies
  assert winners.any() and not np.asarray(certified)[winners].any()
  result = rm.knn(queries, keys, 3, metric="ip", implementation="xla")
  np.testing.assert_array_equal(np.asarray(result.indices)[winners],
                                np.broadcast_to(copies[:3], (winners.sum(), 3)))


def test_direct_implementation_is_exact(dense):
  queries, keys, d2 = dense
  check_exact(rm.knn(queries, keys, 4, implementation="direct"), d2, 4)


# --------------------------------------------------------------------------------------
# The one number the certificate takes on trust: the largest candidate score.


def _lost_the_nearest(queries, keys, k, **kwargs):
  """The XLA search, but its nearest candidate lost and the last slot left unfilled."""
  scores, indices = api.knn_xla(queries, keys, k, **kwargs)
  n = keys.shape[0]
  return (jnp.concatenate([scores[:, 1:], jnp.full_like(scores[:, :1], jnp.inf)], axis=1),
          jnp.concatenate([indices[:, 1:], jnp.full_like(indices[:, :1], n)], axis=1))


def _indices_off_by_one(queries, keys, k, **kwargs):
  """The XLA search with every index one key off: the scores are not their keys'."""
  scores, indices = api.knn_xla(queries, keys, k, **kwargs)
  return scores, (indices + 1) % keys.shape[0]


def _ordinary(metric):
  rng = np.random.default_rng(2)
  return (rng.normal(size=(48, 16)).astype(np.float32),
          rng.normal(size=(3000, 16)).astype(np.float32))


@pytest.mark.parametrize("metric,broken", [
    ("l2", _lost_the_nearest),  # inf as the largest score would certify any answer
    ("l2", _indices_off_by_one),
    ("ip", _lost_the_nearest),
    ("ip", _indices_off_by_one),
])
def test_a_top_score_that_is_not_its_keys_is_not_trusted(metric, broken, monkeypatch):
  queries, keys = _ordinary(metric)
  expected = rm.knn(queries, keys, 5, metric=metric, implementation="reference")
  monkeypatch.setitem(api.IMPLEMENTATIONS, "xla", broken)
  _, _, certified = api._knn_padded(jnp.asarray(queries), jnp.asarray(keys), k=5,
                                    metric=metric, implementation="xla", block_sizes=None)
  assert not np.asarray(certified).any()
  # Every row is recomputed by the direct search: the broken implementation costs time,
  # not exactness.
  result = rm.knn(queries, keys, 5, metric=metric, implementation="xla")
  np.testing.assert_array_equal(np.asarray(result.indices), np.asarray(expected.indices))
  np.testing.assert_allclose(np.asarray(result.distances), np.asarray(expected.distances),
                             rtol=1e-5, atol=1e-6)

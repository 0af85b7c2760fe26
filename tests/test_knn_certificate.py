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
from resmem_jax.kernels.base import centre_fn


def circle(rng, n):
  angle = rng.uniform(0, 2 * np.pi, size=n)
  return np.stack([np.cos(angle), np.sin(angle)], axis=1).astype(np.float32)


def squared_distances(queries, keys):
  """(Q, N) float64 squared distances: the oracle."""
  q, x = np.asarray(queries, np.float64), np.asarray(keys, np.float64)
  return ((q[:, None, :] - x[None]) ** 2).sum(-1)


@pytest.fixture(scope="module")
def dense():
  rng = np.random.default_rng(0)
  keys, queries = circle(rng, 20_000), circle(rng, 200)
  return queries, keys, squared_distances(queries, keys)


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
  """Under jit the fallback redoes the whole batch when any row is uncertified: here
  most rows pass (queries near a sparse cluster) and some fail (on the dense circle),
  and the failing ones must not be skipped because others passed."""
  circle_queries, circle_keys, _ = dense
  rng = np.random.default_rng(5)
  cluster = (5.0 + 0.3 * rng.standard_normal((12, 2))).astype(np.float32)
  keys = np.concatenate([circle_keys, cluster])
  queries = np.concatenate([circle_queries[:48],
                            (5.0 + 0.3 * rng.standard_normal((200, 2))).astype(np.float32)])
  _, _, certified = api._knn_padded(jnp.asarray(queries), jnp.asarray(keys), k=3,
                                    metric="l2", implementation="xla", block_sizes=None)
  certified = np.asarray(certified)[:len(queries)]
  assert certified.any() and not certified.all(), "the batch must mix both kinds of rows"
  result = jax.jit(lambda q, x: rm.knn(q, x, 3, implementation="xla"))(queries, keys)
  check_exact(result, squared_distances(queries, keys), 3)


def _near_key_then_dense_arc(seed=0, n_queries=16, arc=1000):
  """Queries on the unit circle, each with one key on it (d_1 = 0) and then an arc of
  1000 keys at distance ~0.01, 1e-7 apart: below the ranking's float32 error (~1e-5 in
  distance at unit norms), far above the rounding of a distance of 0.01. The rest of
  the circle holds keys no nearer than 0.05 to any query."""
  rng = np.random.default_rng(seed)
  anchors = rng.uniform(0, 2 * np.pi, n_queries)
  far = rng.uniform(0, 2 * np.pi, 2000)
  gap = np.abs((far[:, None] - anchors[None, :] + np.pi) % (2 * np.pi) - np.pi)
  angles = [far[gap.min(axis=1) > 0.05]]
  for a in anchors:
    angles += [np.array([a]), a + 0.01 + rng.uniform(0, 1e-4, arc)]
  angles = np.concatenate(angles)
  keys = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
  queries = np.stack([np.cos(anchors), np.sin(anchors)], 1).astype(np.float32)
  return queries, keys


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_the_certificate_proves_the_kth_neighbour_not_the_first(implementation):
  """The nearest key is far ahead of every other, but neighbours 2..k lie in an arc
  the ranking cannot order: only the k-th distance can prove them, so the rows must
  fail the certificate and be recomputed."""
  queries, keys = _near_key_then_dense_arc()
  _, _, certified = api._knn_padded(jnp.asarray(queries), jnp.asarray(keys), k=5,
                                    metric="l2", implementation=implementation,
                                    block_sizes=None)
  assert not np.asarray(certified)[:len(queries)].all()
  check_exact(rm.knn(queries, keys, 5, implementation=implementation),
              squared_distances(queries, keys), 5)


@pytest.mark.parametrize("offset", [1e4, -3e4])
@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_offset_data_are_certified(offset, implementation):
  """Data 1e4 from the origin, ranked on data centred by the key mean: every row is
  proven. Uncentred, the ranking's error grows with the offset squared, no row would
  be, and every row would silently pay for the direct search."""
  rng = np.random.default_rng(3)
  keys = (offset + rng.standard_normal((901, 8))).astype(np.float32)
  queries = (offset + rng.standard_normal((30, 8))).astype(np.float32)
  _, _, certified = api._knn_padded(jnp.asarray(queries), jnp.asarray(keys), k=6,
                                    metric="l2", implementation=implementation,
                                    block_sizes=None)
  assert np.asarray(certified).all()
  check_exact(rm.knn(queries, keys, 6, implementation=implementation),
              squared_distances(queries, keys), 6)


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


# --------------------------------------------------------------------------------------
# The certificate's error bound against a ranking that errs as much as the bound allows.


def _ranking_off_by(fraction):
  """An l2 search whose ranking scores err by `fraction` of the bound documented in
  `api.search_certified`, E(q) = gamma (R^2 + 2 ||q_c|| R), gamma = 4 (D + 2) eps / 2:
  each row's best key is scored that much too high."""
  def search(queries, keys, k, *, metric, block_sizes, centring):
    del block_sizes
    assert metric == "l2"
    centre = centre_fn(centring)
    qc, xc = centre(queries), centre(keys)
    scores = (jnp.sum(xc * xc, -1)[None, :]
              - 2.0 * jnp.dot(qc, xc.T, precision=jax.lax.Precision.HIGHEST))
    gamma = 4.0 * (keys.shape[1] + 2) / 2 * float(jnp.finfo(jnp.float32).eps)
    radius = jnp.sqrt(jnp.max(jnp.sum(xc * xc, -1)))
    error = gamma * (radius ** 2 + 2.0 * jnp.linalg.norm(qc, axis=-1) * radius)
    best = jax.nn.one_hot(jnp.argmin(scores, axis=1), keys.shape[0], dtype=scores.dtype)
    neg, idx = jax.lax.top_k(0.0 - (scores + best * (fraction * error)[:, None]), k)
    return -neg, idx.astype(jnp.int32)
  return search


def test_the_certificate_covers_any_ranking_error_within_its_bound(monkeypatch):
  """D = 256. Each query's nearest key is at squared distance c, five more at
  c + (0.5 .. 0.7) E, every other key on the unit sphere (R ~ 1). A ranking that scores
  the nearest 0.9 E too high, within the documented bound, leaves it out of the k + 4
  candidates: the certificate must see that it could have, and send the row to the
  direct search (a bound a few times too small certifies the wrong neighbour)."""
  dim, n_far = 256, 2000
  rng = np.random.default_rng(0)
  far = rng.standard_normal((n_far // 2, dim))
  far /= np.linalg.norm(far, axis=1, keepdims=True)
  error = 4.0 * (dim + 2) / 2 * float(np.finfo(np.float32).eps) * (1.0 + 2.0 * 0.3)
  queries, near = [], []
  for j in range(4):
    q = np.zeros(dim)
    q[j] = 0.3  # ||q_c|| ~ 0.3
    queries.append(q)
    for extra in [0.0] + [0.5 + 0.05 * i for i in range(5)]:
      u = rng.standard_normal(dim)
      near.append(q + np.sqrt(0.01 + extra * error) * u / np.linalg.norm(u))
  keys = np.concatenate([far, -far, np.array(near)]).astype(np.float32)
  queries = np.array(queries, np.float32)
  monkeypatch.setitem(api.IMPLEMENTATIONS, "off_by_09", _ranking_off_by(0.9))
  monkeypatch.setattr(api, "KNOWN_IMPLEMENTATIONS", api.KNOWN_IMPLEMENTATIONS + ("off_by_09",))
  result = rm.knn(queries, keys, 1, implementation="off_by_09")
  np.testing.assert_array_equal(np.asarray(result.indices)[:, 0], n_far + 6 * np.arange(4))
  check_exact(result, squared_distances(queries, keys), 1)

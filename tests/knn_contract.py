"""The contract every kNN implementation must meet, as a reusable test class.

`KnnContract` is not collected by pytest (no `Test` prefix); each backend's test file
subclasses it, names its `IMPLEMENTATION` and picks small `BLOCK_SIZES`, so that ragged
tiles, several key tiles and several query tiles are exercised on small data. Every
shape stays small (N up to a few thousand, Q up to ~200) so a Pallas kernel in
interpret mode can run the whole suite on CPU.

The oracle is a float64 NumPy brute force. Distances are compared with a tolerance
scaled by sqrt(D) and by the size of the (centred) data; indices are compared exactly
wherever the float64 distances separate the neighbours by more than that tolerance, and
everywhere on data whose distances are exact in float32 (integer coordinates), where
equal distances must come out lower index first.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resmem_jax
from resmem_jax.kernels import BlockSizes

EPS32 = float(np.finfo(np.float32).eps)


# --------------------------------------------------------------------------------------
# Oracle and comparison helpers.


class Oracle(NamedTuple):
  """Float64 brute force: the whole ordered distance matrix of a small problem."""

  scores: np.ndarray  # (Q, N) float64: squared distance (l2) or -<q, x> (ip)
  order: np.ndarray  # (Q, N) int64: argsort of scores, equal scores lower index first
  tol: float  # score differences below this are within float32 rounding


def as_float64(x) -> np.ndarray:
  """The values the implementation sees (e.g. bfloat16-rounded), in float64."""
  return np.asarray(jnp.asarray(x).astype(jnp.float32), dtype=np.float64)


def score_tolerance(queries: np.ndarray, keys: np.ndarray, metric: str) -> float:
  """How far float32 rounding may move a ranking score, scaled by sqrt(D) and the data.

  A float32 dot product of length D errs by about eps * sqrt(D) * ||q|| * ||x|| (random
  rounding; the worst case is D instead of sqrt(D)). l2 ranks centred data, so the
  scale is the largest centred norm; the offset term covers the rounding of the centre.
  """
  dim = queries.shape[1]
  if metric == "ip":
    r_q = np.linalg.norm(queries, axis=1).max()
    r_x = np.linalg.norm(keys, axis=1).max()
    return 16 * EPS32 * np.sqrt(dim) * r_q * r_x
  mean = keys.mean(axis=0)
  radius = max(np.linalg.norm(queries - mean, axis=1).max(),
               np.linalg.norm(keys - mean, axis=1).max())
  offset = np.abs(mean).max()
  return 16 * EPS32 * np.sqrt(dim) * (radius * radius + radius * offset)


def oracle(queries, keys, metric: str = "l2") -> Oracle:
  q = as_float64(queries)
  x = as_float64(keys)
  if metric == "ip":
    scores = -(q @ x.T)
  else:
    mean = x.mean(axis=0)  # centred in float64 too: no cancellation on offset data
    qc, xc = q - mean, x - mean
    scores = (np.sum(qc * qc, axis=1)[:, None] + np.sum(xc * xc, axis=1)[None, :]
              - 2.0 * (qc @ xc.T))
    scores = np.maximum(scores, 0.0)
  order = np.argsort(scores, axis=1, kind="stable")
  return Oracle(scores, order, score_tolerance(q, x, metric))


def scattered_copies(seed: int, n: int = 97, dim: int = 64, n_q: int = 40, copies: int = 30
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Random keys, `copies` of them (at random positions) replaced by one key times 6."""
  rng = np.random.default_rng(seed)
  keys = rng.normal(size=(n, dim)).astype(np.float32)
  queries = rng.normal(size=(n_q, dim)).astype(np.float32)
  positions = np.sort(rng.choice(n, copies, replace=False))
  keys[positions] = 6.0 * keys[positions[0]]
  return queries, keys


def separated(sorted_scores: np.ndarray, k: int, tol: float) -> np.ndarray:
  """(Q, k) mask: rank j is determined, its float64 gaps to ranks j-1 and j+1 exceed tol."""
  n_q, n = sorted_scores.shape
  gaps = np.diff(sorted_scores, axis=1)  # (Q, N - 1)
  ok = np.ones((n_q, k), dtype=bool)
  ok[:, 1:] &= gaps[:, :k - 1] > tol
  upper = min(k, n - 1)
  ok[:, :upper] &= gaps[:, :upper] > tol
  return ok


def assert_indices_equal_where_separated(indices, expected, sorted_scores, tol):
  """Indices equal wherever the float64 gap to the neighbouring distances exceeds tol."""
  k = indices.shape[1]
  mask = separated(sorted_scores, k, tol)
  bad = np.argwhere(mask & (indices != expected))
  assert bad.size == 0, (
      f"{len(bad)} separated neighbours differ, first at (query, rank)={tuple(bad[0])}: "
      f"got index {indices[tuple(bad[0])]}, expected {expected[tuple(bad[0])]}")


def check_result(result, queries, keys, k, metric="l2", *, exact_ties=False):
  """Checks one search against the float64 oracle; returns the oracle for further checks."""
  distances, indices = result
  n_q = queries.shape[0]
  n = keys.shape[0]
  assert isinstance(result, resmem_jax.KnnResult)
  assert distances.shape == (n_q, k) and indices.shape == (n_q, k)
  assert distances.dtype == jnp.float32, distances.dtype
  assert indices.dtype == jnp.int32, indices.dtype
  distances = np.asarray(distances, dtype=np.float64)
  indices = np.asarray(indices)
  assert np.all(np.isfinite(distances))
  assert np.all((indices >= 0) & (indices < n)), "indices out of range"
  assert all(len(set(row)) == k for row in indices), "an index is repeated in a row"
  assert np.all(np.diff(distances, axis=1) >= 0), "distances are not ascending"

  q = as_float64(queries)
  x = as_float64(keys)
  ref = oracle(queries, keys, metric)
  expected = ref.order[:, :k]
  sorted_scores = np.take_along_axis(ref.scores, ref.order, axis=1)

  # The returned distance is that of the returned index, computed directly, to float32
  # rounding of ||q - x|| (not of the norms: that is what the re-scoring is for).
  winners = x[indices]  # (Q, k, D)
  if metric == "ip":
    direct = -np.einsum("qd,qkd->qk", q, winners)
    scale = np.einsum("qd,qkd->qk", np.abs(q), np.abs(winners))
    np.testing.assert_allclose(distances, direct, rtol=0,
                               atol=4 * EPS32 * np.sqrt(q.shape[1]) * scale.max() + 1e-30)
    returned_scores = distances
  else:
    direct = np.sqrt(np.sum(np.square(q[:, None, :] - winners), axis=-1))
    magnitude = max(np.abs(q).max(), np.abs(x).max())
    np.testing.assert_allclose(
        distances, direct, rtol=4 * EPS32 * np.sqrt(q.shape[1]),
        atol=4 * EPS32 * magnitude * np.sqrt(q.shape[1]))
    returned_scores = np.square(distances)
  # The k distances are the k smallest, up to the tolerance of a ranking score.
  np.testing.assert_allclose(returned_scores, sorted_scores[:, :k], rtol=0, atol=ref.tol)

  if exact_ties:
    np.testing.assert_array_equal(indices, expected)
  else:
    assert_indices_equal_where_separated(indices, expected, sorted_scores, ref.tol)
  return ref


# --------------------------------------------------------------------------------------
# Data.


def random_data(seed: int, n_q: int, n: int, dim: int, *, offset: float = 0.0,
                scale: float = 1.0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  keys = offset + scale * rng.standard_normal((n, dim))
  queries = offset + scale * rng.standard_normal((n_q, dim))
  return queries.astype(dtype), keys.astype(dtype)


def integer_data(seed: int, n_q: int, n_half: int, dim: int, *, low: int = -2, high: int = 2):
  """Integer keys with many exact ties, duplicate rows, and a key mean of exactly zero.

  Keys are rows and their negations (the mean is 0 in any float arithmetic, so
  centring is exact) plus repeated rows; queries include copies of keys. Every score
  and distance is then exact in float32, and equal distances are truly equal.
  """
  rng = np.random.default_rng(seed)
  half = rng.integers(low, high + 1, size=(n_half, dim))
  repeats = half[rng.integers(0, n_half, size=n_half // 4)]
  half = np.concatenate([half, repeats])
  keys = np.concatenate([half, -half])[rng.permutation(2 * len(half))]
  queries = rng.integers(low, high + 1, size=(n_q, dim))
  queries[: n_q // 3] = keys[rng.integers(0, len(keys), size=n_q // 3)]
  return queries.astype(np.float32), keys.astype(np.float32)


def merge(a, b, offset: int, k: int):
  """Merges two (distances, indices) results, b's indices shifted by `offset`."""
  distances = np.concatenate([np.asarray(a[0]), np.asarray(b[0])], axis=1)
  indices = np.concatenate([np.asarray(a[1]), np.asarray(b[1]) + offset], axis=1)
  order = np.lexsort((indices, distances), axis=1)[:, :k]
  return (np.take_along_axis(distances, order, axis=1),
          np.take_along_axis(indices, order, axis=1))


# --------------------------------------------------------------------------------------
# The contract.

# Every subclass runs the same property tests with its own `search`; hypothesis flags
# that as "differing executors", which is what a contract suite means to do.
property_settings = settings(max_examples=5,
                             suppress_health_check=[HealthCheck.differing_executors])


class KnnContract:
  """Shared tests; subclasses set `IMPLEMENTATION` and small `BLOCK_SIZES`."""

  IMPLEMENTATION: str = "reference"
  BLOCK_SIZES: BlockSizes | None = None

  def search(self, queries, keys, k, metric="l2"):
    return resmem_jax.knn(queries, keys, k, metric=metric,
                          implementation=self.IMPLEMENTATION, block_sizes=self.BLOCK_SIZES)

  # Values.

  @pytest.mark.parametrize("dim", [1, 3, 130])
  def test_random_data(self, dim):
    queries, keys = random_data(0, 37, 1001, dim)
    check_result(self.search(queries, keys, 7), queries, keys, 7)

  def test_many_query_tiles(self):
    queries, keys = random_data(1, 200, 777, 16)
    check_result(self.search(queries, keys, 5), queries, keys, 5)

  @pytest.mark.parametrize("dim", [3, 130])
  def test_exact_ties_lower_index_first(self, dim):
    queries, keys = integer_data(2, 40, 500 if dim == 3 else 300, dim, low=-1, high=1)
    for k in (1, 9, 33):
      check_result(self.search(queries, keys, k), queries, keys, k, exact_ties=True)

  def test_all_keys_equal(self):
    keys = np.full((301, 4), 3.0, np.float32)
    queries = np.zeros((5, 4), np.float32)
    result = self.search(queries, keys, 20)
    check_result(result, queries, keys, 20, exact_ties=True)

  @pytest.mark.parametrize("metric", ["l2", "ip"])
  def test_copies_of_a_random_key_tie_by_index_across_tile_shapes(self, metric):
    """Non-integer keys rounded in tiles of different shapes (2049 keys: a ragged last
    tile for any block_n) must still tie exactly, lower index first."""
    rng = np.random.default_rng(13)
    keys = np.tile(rng.standard_normal((1, 64)).astype(np.float32), (2049, 1))
    queries = rng.standard_normal((24, 64)).astype(np.float32)
    check_result(self.search(queries, keys, 10, metric), queries, keys, 10, metric,
                 exact_ties=True)
    keys = rng.standard_normal((2049, 8)).astype(np.float32)
    keys[5] *= 10.0  # the best inner product of most queries, and the nearest key of some
    keys[-1] = keys[5]  # its copy, alone in the ragged last tile
    queries = np.concatenate([queries[:, :8], keys[5] + 0.01 * queries[:8, :8]])
    for k in (1, 2):
      check_result(self.search(queries, keys, k, metric), queries, keys, k, metric,
                   exact_ties=True)

  @pytest.mark.parametrize("metric", ["l2", "ip"])
  def test_scattered_copies_of_a_long_key_tie_by_index(self, metric):
    """30 copies of one long key scattered among 97: most queries' best keys by inner
    product, gathered into candidate lists at different positions, where they must not
    round apart (ip once dropped copies 8 and 10 for 21 and 23 this way)."""
    queries, keys = scattered_copies(seed=0)
    for k in (1, 5, 7):
      check_result(self.search(queries, keys, k, metric), queries, keys, k, metric,
                   exact_ties=True)

  @pytest.mark.parametrize("offset,scale", [(1e4, 1.0), (-3e4, 0.1), (0.0, 1e3)])
  def test_offset_and_large_norms(self, offset, scale):
    queries, keys = random_data(3, 30, 901, 8, offset=offset, scale=scale)
    result = self.search(queries, keys, 6)
    check_result(result, queries, keys, 6)
    # Distances are accurate relative to themselves, not to the norms.
    direct = np.linalg.norm(
        as_float64(queries)[:, None] - as_float64(keys)[np.asarray(result.indices)], axis=-1)
    np.testing.assert_allclose(np.asarray(result.distances), direct, rtol=1e-5)

  def test_k_one(self):
    queries, keys = random_data(4, 33, 1234, 5)
    check_result(self.search(queries, keys, 1), queries, keys, 1)

  def test_k_equals_n(self):
    queries, keys = random_data(5, 11, 150, 3)
    result = self.search(queries, keys, 150)
    check_result(result, queries, keys, 150)
    np.testing.assert_array_equal(np.sort(np.asarray(result.indices), axis=1),
                                  np.broadcast_to(np.arange(150), (11, 150)))

  def test_single_query(self):
    queries, keys = random_data(6, 1, 999, 12)
    check_result(self.search(queries, keys, 4), queries, keys, 4)

  def test_single_key(self):
    queries, keys = random_data(7, 9, 1, 3)
    result = self.search(queries, keys, 1)
    check_result(result, queries, keys, 1)
    np.testing.assert_array_equal(np.asarray(result.indices), 0)

  def test_query_equal_to_a_key_is_its_own_neighbour(self):
    _, keys = random_data(8, 1, 800, 6)
    queries = keys[[0, 399, 799]]
    result = self.search(queries, keys, 3)
    check_result(result, queries, keys, 3)
    np.testing.assert_array_equal(np.asarray(result.indices)[:, 0], [0, 399, 799])
    np.testing.assert_array_equal(np.asarray(result.distances)[:, 0], 0.0)

  @pytest.mark.parametrize("dim", [3, 130])
  def test_inner_product(self, dim):
    queries, keys = random_data(9, 25, 1003, dim)
    result = self.search(queries, keys, 8, metric="ip")
    check_result(result, queries, keys, 8, metric="ip")

  def test_inner_product_exact_ties(self):
    queries, keys = integer_data(10, 20, 400, 5)
    check_result(self.search(queries, keys, 17, metric="ip"), queries, keys, 17,
                 metric="ip", exact_ties=True)

  @pytest.mark.parametrize("metric", ["l2", "ip"])
  def test_bfloat16_inputs(self, metric):
    queries, keys = random_data(11, 21, 700, 24)
    queries, keys = jnp.asarray(queries, jnp.bfloat16), jnp.asarray(keys, jnp.bfloat16)
    result = self.search(queries, keys, 5, metric=metric)
    # The oracle sees the bfloat16-rounded values, exactly as the implementation does.
    check_result(result, queries, keys, 5, metric=metric)

  def test_float64_numpy_inputs_are_searched_in_float32(self):
    queries, keys = random_data(12, 10, 500, 4, dtype=np.float64)
    result = self.search(queries, keys, 3)
    check_result(result, queries.astype(np.float32), keys.astype(np.float32), 3)

  def test_deterministic(self):
    queries, keys = random_data(13, 19, 640, 7)
    a = self.search(queries, keys, 6)
    b = self.search(queries, keys, 6)
    np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(b.indices))
    np.testing.assert_array_equal(np.asarray(a.distances), np.asarray(b.distances))

  # Invariants.

  # The property tests vary the data, not the shapes: one compilation serves them all.

  @property_settings
  @given(seed=st.integers(0, 2**31 - 1))
  def test_permuting_keys_permutes_indices(self, seed):
    n, k = 300, 7
    queries, keys = random_data(seed, 13, n, 5)
    perm = np.random.default_rng(seed + 1).permutation(n)
    plain = self.search(queries, keys, k)
    permuted = self.search(queries, keys[perm], k)
    ref = check_result(permuted, queries, keys[perm], k)
    np.testing.assert_allclose(np.asarray(permuted.distances), np.asarray(plain.distances),
                               rtol=1e-5, atol=1e-6)
    sorted_scores = np.take_along_axis(ref.scores, ref.order, axis=1)
    assert_indices_equal_where_separated(perm[np.asarray(permuted.indices)],
                                         np.asarray(plain.indices), sorted_scores, ref.tol)

  @property_settings
  @given(seed=st.integers(0, 2**31 - 1), sizes=st.sampled_from([(10, 140), (75, 75)]))
  def test_split_then_merge_equals_one_search(self, seed, sizes):
    # Each part has a zero key mean, so every score stays exact in float32 and even the
    # order of exact ties across the two parts must agree with one search.
    k = 6
    queries, keys_a = integer_data(seed, 15, sizes[0], 3, low=-3, high=3)
    _, keys_b = integer_data(seed + 1, 1, sizes[1], 3, low=-3, high=3)
    keys = np.concatenate([keys_a, keys_b])
    first = self.search(queries, keys_a, k)
    second = self.search(queries, keys_b, k)
    merged = merge(first, second, len(keys_a), k)
    whole = self.search(queries, keys, k)
    check_result(whole, queries, keys, k, exact_ties=True)
    np.testing.assert_array_equal(merged[1], np.asarray(whole.indices))
    np.testing.assert_array_equal(merged[0], np.asarray(whole.distances))

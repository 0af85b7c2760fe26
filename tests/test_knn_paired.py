"""Paired chunk minima (`BlockSizes.pairs`): the tag, the pair reduction, and the search.

The paired search reads the k winners off the chosen chunks' tagged minima and gathers
only chunks whose second score may also win; a query with more of those than
`xla.PAIR_SLOTS` sends its query tile through the unpaired exact search. The tests
check the pieces against NumPy, the certificate's trust in the tagged scores, and the
three regimes of the search: no crowded chunk, a few (searched in slots), too many
(the unpaired fallback), each against a float64 brute force.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from knn_contract import KnnContract, check_result, integer_data, random_data

import resmem_jax as rm
from resmem_jax.kernels import BlockSizes, api, xla

PAIRED = BlockSizes(block_q=16, block_n=96, chunk=8, pairs=True)


@pytest.mark.usefixtures("tiny_segments")
class TestXlaPaired(KnnContract):
  """The whole contract on the paired path (ip and k * chunk >= N take other paths),
  in short segments: searches over N >= 2 segments (N >= 384 at k + margin = 11)
  merge the k best of several, smaller ones search all keys at once. The tests below
  search unsegmented, at the default segment budget."""
  IMPLEMENTATION = "xla"
  BLOCK_SIZES = PAIRED


# --------------------------------------------------------------------------------------
# The pieces.


def test_ordered_keys_keep_float_order_and_invert():
  rng = np.random.default_rng(0)
  values = np.concatenate([rng.standard_normal(1000) * 10.0 ** rng.integers(-30, 30, 1000),
                           [0.0, -0.0, 1e-45, -1e-45, np.finfo(np.float32).max,
                            -np.finfo(np.float32).max]]).astype(np.float32)
  keys = np.asarray(xla.ordered(jnp.asarray(values)))
  order = np.lexsort((keys, values))  # by value; -0 and +0 are equal values
  assert np.all(np.diff(keys[order]) >= 0)
  assert np.all(np.diff(keys[order])[np.diff(values[order]) > 0] > 0)
  np.testing.assert_array_equal(np.asarray(xla.from_ordered(jnp.asarray(keys))).view(np.int32),
                                values.view(np.int32))


@pytest.mark.parametrize("chunk", [2, 8, 64])
def test_tile_pairs_are_the_two_smallest_tagged_scores(chunk):
  rng = np.random.default_rng(chunk)
  n, bq = 5 * chunk + chunk // 2, 7  # a ragged last chunk
  scores = rng.standard_normal((n, bq)).astype(np.float32)
  scores[:3] = scores[3:6]  # exact ties inside a chunk
  scores[-1] = 0.0
  first, second = xla._tile_pairs(jnp.asarray(scores), chunk)
  first, second = np.asarray(first), np.asarray(second)
  padded = np.full((-(-n // chunk) * chunk, bq), np.finfo(np.float32).max, np.float32)
  padded[:n] = scores
  tagged = np.asarray(xla.ordered(jnp.asarray(padded))).reshape(-1, chunk, bq)
  tagged = (tagged & ~(chunk - 1)) | np.arange(chunk, dtype=np.int32)[None, :, None]
  two = np.sort(tagged, axis=1)[:, :2]
  np.testing.assert_array_equal(first, two[:, 0])
  np.testing.assert_array_equal(second, two[:, 1])
  # The tag is the position of the smallest score (the first of equal ones), and it
  # moves the score by less than `chunk` units in the last place.
  groups = padded.reshape(-1, chunk, bq)
  np.testing.assert_array_equal(first & (chunk - 1), np.argmin(groups, axis=1))
  smallest = groups.min(axis=1)
  value = np.asarray(xla.from_ordered(jnp.asarray(first)))
  assert np.all(np.abs(value - smallest) < chunk * np.spacing(np.abs(smallest)) + 1e-45)
  assert np.all(np.isfinite(value))


def test_tile_pairs_of_infinite_scores_stay_finite():
  """A tagged infinity would be a NaN pattern, which top_k would rank first."""
  scores = jnp.asarray([[np.inf], [1.0], [-np.inf], [2.0], [np.inf], [np.inf]], jnp.float32)
  first, second = xla._tile_pairs(scores, 4)
  values = np.asarray(xla.from_ordered(jnp.concatenate([first, second])))
  assert np.all(np.isfinite(values))
  np.testing.assert_array_equal(np.asarray(first)[:, 0] & 3, [2, 0])  # -inf, then +inf
  assert values[0, 0] < -1e38 and values[2, 0] == pytest.approx(1.0)


def test_pairs_need_a_power_of_two_chunk_up_to_64():
  for chunk in (0, 3, 12, 128):
    with pytest.raises(ValueError, match="pairs needs chunk"):
      BlockSizes(block_n=384, chunk=chunk, pairs=True)
  assert BlockSizes(block_n=128, chunk=64, pairs=True).pairs


def test_default_pairs_where_few_chunks_are_crowded():
  assert BlockSizes.get_default(106, 128, 100_000).pairs  # C2: ~0.9 crowded per query
  assert not BlockSizes.get_default(106, 128, 20_000).pairs  # ~4.5: unpaired, chunk 8
  assert not BlockSizes.get_default(106, 128).pairs  # ip, float64: no n given
  assert not BlockSizes.get_default(14, 128, 100_000).pairs  # small k: under 5% to gain


def test_certificate_widens_its_bound_only_where_the_search_tags_scores():
  f32 = jnp.float32
  def tags(k, n, dtype=f32, metric="l2", block_sizes=None):
    tagged = xla.tiling(k, n, 128, dtype, metric, block_sizes)[1]
    assert api._tags_scores("xla", k, n, 128, dtype, metric, block_sizes) == tagged
    return tagged
  assert tags(106, 100_000)
  assert not tags(106, 100_000, metric="ip")
  assert not tags(106, 100_000, dtype=jnp.float64)
  assert not tags(14, 100_000)  # default tiles for small k: unpaired
  assert tags(5, 3001, block_sizes=PAIRED)
  assert not tags(5, 5 * PAIRED.chunk, block_sizes=PAIRED)  # k chunks hold every key
  assert not tags(5, 3001, block_sizes=BlockSizes(chunk=0))  # no pruning


# --------------------------------------------------------------------------------------
# The search, in its three regimes.


def near_copies(rng, queries, keys, per_query, block):
  """Keys with `per_query` blocks of `block` adjacent near-copies of each query, so
  the chunks holding them have two or more winners (crowded)."""
  keys = keys.copy()
  n_q = queries.shape[0]
  starts = rng.choice(keys.shape[0] // block, size=n_q * per_query, replace=False) * block
  for i, start in enumerate(starts):
    q = queries[i // per_query]
    jitter = rng.standard_normal((block, keys.shape[1])).astype(np.float32) * 1e-2
    keys[start:start + block] = q + jitter
  return keys


def paired_search(queries, keys, k, block_sizes=PAIRED):
  """`rm.knn`'s certified search, without its fallback: (result, certified)."""
  dist, idx, certified = api._knn_padded(jnp.asarray(queries), jnp.asarray(keys), k=k,
                                         metric="l2", implementation="xla",
                                         block_sizes=block_sizes)
  return rm.KnnResult(dist, idx), np.asarray(certified)


def crowded_count(queries, keys, k, block_sizes=PAIRED):
  """Chosen chunks per query whose second score is within reach (as the search sees it)."""
  mean = jnp.mean(jnp.asarray(keys), axis=0, keepdims=True)
  q, x = jnp.asarray(queries) - mean, jnp.asarray(keys) - mean
  first, second = xla._chunk_pairs(q, x, jnp.sum(x * x, -1), block_sizes.block_n,
                                   block_sizes.chunk)
  ids = xla._select_chunks(xla.from_ordered(first), k)
  rows = jnp.arange(q.shape[0])[:, None]
  tau = jnp.max(first[ids, rows], axis=1, keepdims=True)
  return np.asarray(jnp.sum(second[ids, rows] <= tau, axis=1))


@pytest.mark.parametrize("per_query,regime", [(0, "none"), (3, "slots"), (12, "fallback")])
def test_paired_search_is_exact_with_and_without_crowded_chunks(per_query, regime):
  rng = np.random.default_rng(per_query)
  queries, keys = random_data(per_query, 40, 3001, 16)
  keys = near_copies(rng, queries, keys, per_query, block=2) if per_query else keys
  k = 2 * per_query + 5  # all near-copies plus a few ordinary keys
  crowded = crowded_count(queries, keys, api.n_candidates(k, 3001))
  if regime == "none":
    assert crowded.max() <= 1
  elif regime == "slots":
    assert 3 <= crowded.min() and crowded.max() <= xla.PAIR_SLOTS
  else:
    assert crowded.min() > xla.PAIR_SLOTS
  result, certified = paired_search(queries, keys, k)
  assert certified.all()  # exact without the direct fallback
  check_result(result, queries, keys, k)
  unpaired, _ = paired_search(queries, keys, k, BlockSizes(block_q=16, block_n=96, chunk=8))
  np.testing.assert_array_equal(np.asarray(result.indices), np.asarray(unpaired.indices))
  np.testing.assert_array_equal(np.asarray(result.distances), np.asarray(unpaired.distances))


def test_duplicate_keys_in_one_chunk_tie_lower_index_first():
  queries, keys = integer_data(3, 30, 200, 5)
  keys = np.repeat(keys, 2, axis=0)  # every key twice, side by side in one chunk
  for k in (1, 2, 7, 20):
    check_result(rm.knn(queries, keys, k, implementation="xla", block_sizes=PAIRED),
                 queries, keys, k, exact_ties=True)


def test_default_paired_search_at_scale_is_certified():
  """The default tiles pick pairs here (k = 50 over 20k keys); ragged last tile."""
  queries, keys = random_data(9, 300, 20_001, 32)
  assert BlockSizes.get_default(api.n_candidates(50, 20_001), 32, 20_001).pairs
  result, certified = paired_search(queries, keys, 50, block_sizes=None)
  assert certified.all()
  check_result(result, queries, keys, 50)


def test_paired_search_under_jit_and_with_offset_data():
  queries, keys = random_data(10, 50, 2000, 8, offset=3e3)
  result = jax.jit(lambda q, x: rm.knn(q, x, 9, implementation="xla", block_sizes=PAIRED))(
      queries, keys)
  check_result(result, queries, keys, 9)

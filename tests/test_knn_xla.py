"""The kNN contract for the blocked XLA search, under several tilings.

Small tiles make every case cross several key tiles (the last one ragged) and several
query tiles. The variants cover no pruning (the running top-k over key tiles), a chunk
as long as a key tile, the default tiles, whose key tiles are larger than every N
here, a gather budget so small that the exact search steps through a query tile one
query at a time, and short chunks in segments so short that most searches merge
several (the paired search in segments: tests/test_knn_paired.py). Each class
compiles its own searches (about 60, most of its time), so a tiling earns a class
only where it runs code the others do not.
"""

import numpy as np
import pytest
from knn_contract import KnnContract, check_result, scattered_copies

import resmem_jax
from resmem_jax.kernels import BlockSizes, xla


class TestXlaUnpruned(KnnContract):
  IMPLEMENTATION = "xla"
  BLOCK_SIZES = BlockSizes(block_q=24, block_n=128, chunk=0)


class TestXlaChunkIsTile(KnnContract):
  IMPLEMENTATION = "xla"
  BLOCK_SIZES = BlockSizes(block_q=8, block_n=64, chunk=64)


class TestXlaDefaultTiles(KnnContract):
  IMPLEMENTATION = "xla"


class TestXlaExactSearchOneQueryPerStep(KnnContract):
  """The exact search's gather budget shrunk to nothing: one query per step, so the
  per-step loop over a query tile (several steps, results stitched back) is covered."""
  IMPLEMENTATION = "xla"
  BLOCK_SIZES = BlockSizes(block_q=12, block_n=96, chunk=8)  # own tiles: own traces

  @pytest.fixture(autouse=True)
  def _tiny_gather_budget(self, monkeypatch):
    monkeypatch.setattr(xla, "GATHER_BYTES", 1)


@pytest.mark.usefixtures("tiny_segments")
class TestXlaSegments(KnnContract):
  """Segments of 4 k chunks (rounded up to whole key tiles): most searches here run
  several segments through the scan, the last one ragged, and merge their k best
  across segment boundaries; the smallest (N < 2 segments) run the short chunks'
  pruned search over all keys at once."""
  IMPLEMENTATION = "xla"
  BLOCK_SIZES = BlockSizes(block_q=16, block_n=32, chunk=4)  # own tiles: own traces


@pytest.mark.usefixtures("tiny_segments")
def test_segments_merge_exact_ties_lower_index_first():
  """Six segments of 160 keys (the last 200, ending in a ragged key tile) rank like a
  float64 brute force, ties lower index first. Small integer coordinates make every
  score exact in float32, so the many duplicate keys (values 0..2 in 4 dimensions)
  tie exactly, within and across segments, and at the k-th place. (Paired minima
  order tied chunk minima by their position tags, which the public `knn` puts right:
  TestXlaPaired in tests/test_knn_paired.py.)"""
  pairs = False
  rng = np.random.default_rng(0)
  keys = rng.integers(0, 3, (1000, 4)).astype(np.float32)
  queries = rng.integers(0, 3, (40, 4)).astype(np.float32)
  blocks = BlockSizes(block_q=16, block_n=32, chunk=4, pairs=pairs)
  assert xla.segment_length(16, 32, 4, 9, pairs) == 160  # 4 * 9 chunks of 4, in tiles
  scores, indices = xla.knn_xla(queries, keys, 9, block_sizes=blocks)
  k64 = keys.astype(np.float64)
  want_scores = (k64 * k64).sum(1)[None, :] - 2.0 * queries.astype(np.float64) @ k64.T
  want = np.argsort(want_scores, axis=1, kind="stable")[:, :9]
  np.testing.assert_array_equal(indices, want)
  np.testing.assert_array_equal(scores, np.take_along_axis(want_scores, want, axis=1))


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.usefixtures("tiny_segments")
def test_copies_tie_by_index_across_segments(metric, pairs):
  """Exact copies of keys spread over many segments come back lower index first."""
  blocks = BlockSizes(block_q=8, block_n=16, chunk=2, pairs=pairs)  # own tiles: own traces
  for seed in range(3):
    queries, keys = scattered_copies(seed, n=600)
    for k in (3, 5, 7):
      assert xla.segment_length(8, 16, 2, k + 4, pairs) < keys.shape[0] // 2
      result = resmem_jax.knn(queries, keys, k, metric=metric, implementation="xla",
                              block_sizes=blocks)
      check_result(result, queries, keys, k, metric, exact_ties=True)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("block_n,chunk", [(16, 2), (32, 4), (96, 3), (96, 4)])
def test_scattered_copies_tie_by_index_under_short_chunks(metric, block_n, chunk):
  """The exact search gathers a chunk's keys into a (queries, k * chunk, D) block whose
  dot products XLA may round differently by position, so the search's own ranking can
  put a later copy of a key before an earlier one. Before ip had the certificate's
  margin (it searched exactly k candidates), all four ip cases here failed: some row
  came back with a higher-index copy in place of a lower one."""
  for seed in range(3):
    queries, keys = scattered_copies(seed)
    for k in (3, 5, 7):
      result = resmem_jax.knn(queries, keys, k, metric=metric, implementation="xla",
                              block_sizes=BlockSizes(block_q=8, block_n=block_n, chunk=chunk))
      check_result(result, queries, keys, k, metric, exact_ties=True)

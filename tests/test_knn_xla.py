"""The kNN contract for the blocked XLA search, under several tilings.

Small tiles make every case cross several key tiles (the last one ragged) and several
query tiles. The variants cover short chunks (with the grouped chunk selection),
no pruning (the running top-k over key tiles), a chunk as long as a key tile, and the
default tiles, whose key tiles are larger than every N here, and a gather budget so
small that the exact search steps through a query tile one query at a time.
"""

import pytest
from knn_contract import KnnContract, check_result, scattered_copies

import resmem_jax
from resmem_jax.kernels import BlockSizes, xla


class TestXlaPruned(KnnContract):
  IMPLEMENTATION = "xla"
  BLOCK_SIZES = BlockSizes(block_q=16, block_n=96, chunk=8)


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

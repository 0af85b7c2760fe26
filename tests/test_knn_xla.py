"""The kNN contract for the blocked XLA search, under several tilings.

Small tiles make every case cross several key tiles (the last one ragged) and several
query tiles. The variants cover short chunks (with the grouped chunk selection),
no pruning (the running top-k over key tiles), a chunk as long as a key tile, and the
default tiles, whose key tiles are larger than every N here.
"""

from knn_contract import KnnContract

from resmem_jax.kernels import BlockSizes


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

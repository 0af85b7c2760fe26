"""Types shared by every kNN implementation: the result tuple and the tiling parameters."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from jaxtyping import Array, Float, Int


class KnnResult(NamedTuple):
  """The `k` nearest keys of each query, nearest first.

  Attributes:
    distances: (Q, k) float32 (float64 when 64-bit JAX is on and an input is float64).
      Euclidean distance for `metric="l2"`, negated inner product for `metric="ip"`;
      ascending along each row.
    indices: (Q, k) int32 row indices into `keys`. Equal distances are ordered by the
      lower index first.
  """

  distances: Float[Array, "Q k"]
  indices: Int[Array, "Q k"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Static tiling of the blocked search (hashable: it is a static jit argument).

  Attributes:
    block_q: queries per tile (the query count is padded to a multiple of it).
    block_n: keys per matmul tile; the last tile holds the ragged remainder, the keys
      are never padded or copied.
    chunk: consecutive keys per pruning chunk (0 disables pruning). The k smallest
      scores of a row lie inside the k chunks with the smallest minima, so a cheap
      vectorized min per chunk shrinks what the exact selection must scan; it costs
      block_q * N / chunk floats of chunk minima per query tile.
  """

  block_q: int = 256
  block_n: int = 2048
  chunk: int = 16

  def __post_init__(self):
    for name in ("block_q", "block_n"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")
    if not isinstance(self.chunk, int) or self.chunk < 0:
      raise ValueError(f"BlockSizes.chunk must be a non-negative int, got {self.chunk!r}")
    if self.chunk and self.block_n % self.chunk:
      raise ValueError(
          f"BlockSizes.block_n={self.block_n} must be a multiple of chunk={self.chunk}")

  @classmethod
  def get_default(cls, k: int, d: int) -> "BlockSizes":
    """The fastest of the tiles tried on a 2-core x86 CPU (see kernels/bench.py).

    Measured at k = 10 (d = 64 and 128) and k = 100 (d = 128); other k reuse the
    nearest setting. A (block_n, block_q) = (2048, 256) score tile (2 MiB) was as
    fast as or faster than 1 MiB and 4 MiB tiles. The chunk trades the chunk-minimum
    selection (~N / chunk values per query) against the exact search over the chosen
    chunks (k * chunk keys gathered per query): small k affords long chunks, which
    matter more when a low d makes the matmul cheap. At k = 100 and 106, d = 128,
    chunk 8 took 2-3% less CPU time than chunk 4 (the exact search's gather, cached
    per few queries, is cheaper than the longer chunk-minimum selection).
    """
    if k <= 16:
      return cls(block_q=256, block_n=2048, chunk=32 if d <= 96 else 16)
    if k <= 256:
      return cls(block_q=256, block_n=2048, chunk=8)
    return cls(block_q=256, block_n=2048, chunk=0)

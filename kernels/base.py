"""Types shared by every kNN implementation: the result tuple and the tiling parameters."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from jaxtyping import Array, Float, Int


class KnnResult(NamedTuple):
  """The `k` nearest keys of each query, nearest first.

  Attributes:
    distances: (Q, k) float32. Euclidean distance for `metric="l2"`, negated inner
      product for `metric="ip"`; ascending along each row.
    indices: (Q, k) int32 row indices into `keys`. Equal distances are ordered by the
      lower index first.
  """

  distances: Float[Array, "Q k"]
  indices: Int[Array, "Q k"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Static tiling of the blocked search (hashable: it is a static jit argument).

  Attributes:
    block_q: queries per tile.
    block_n: keys per tile; the ragged last key tile is masked, never copied.
    chunk: keys per pruning chunk inside a tile (0 disables pruning). The k smallest
      scores of a row lie inside the k chunks with the smallest minima, so a cheap
      vectorized min per chunk shrinks what the exact selection must scan.
  """

  block_q: int = 512
  block_n: int = 4096
  chunk: int = 32

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
    """Tiles measured to be fastest on CPU for a given (k, d); see kernels/bench.py."""
    del d  # The tile shape depends mostly on k through the pruning ratio.
    if k <= 16:
      return cls(block_q=512, block_n=4096, chunk=32)
    if k <= 128:
      return cls(block_q=256, block_n=8192, chunk=8)
    return cls(block_q=256, block_n=4096, chunk=0)

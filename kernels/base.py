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


class Centring(NamedTuple):
  """The affine map every implementation applies to its inputs: x -> x * scale - mean.

  `kernels.api` searches on data times a power of two (`api.search_scale`), centred by
  the key mean (exact ranking for offset data). The keys go to an implementation
  as they are, with this map, which it applies to each tile of keys it loads (and to
  each key it gathers): a centred copy of all the keys would double the search's
  memory. `scale` is exact (a power of two), so a tile computes the same bits as a
  copy would have held, fused multiply-add or not.

  Attributes:
    scale: 0-d array, a power of two.
    mean: (1, D) array, subtracted after scaling (zeros: no centring).
  """

  scale: Float[Array, ""]
  mean: Float[Array, "1 D"]

  def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
    return x * self.scale - self.mean.reshape((1,) * (x.ndim - 1) + (-1,))


def centre_fn(centring: "Centring | None"):
  """`centring` as a function of a tile (the identity for None)."""
  return (lambda x: x) if centring is None else centring


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
      block_q / chunk floats of chunk minima per key, as far as `xla.SEGMENT_BYTES`
      (64 MiB) per query tile, beyond which the keys are searched in segments.
    pairs: keep each chunk's two smallest scores, the smallest tagged with its position,
      instead of the minimum alone (l2 on float32 only; ip and float64 ignore it). The
      k winners are then read off the chosen chunks' minima, and only the few chosen
      chunks whose second score may also win are searched key by key. Needs a
      power-of-two chunk of at most 64: the position lives in the score's last
      log2(chunk) bits (see `kernels/xla.py`).
  """

  block_q: int = 256
  block_n: int = 2048
  chunk: int = 16
  pairs: bool = False

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
    if self.pairs and (self.chunk not in (2, 4, 8, 16, 32, 64)):
      raise ValueError(f"BlockSizes.pairs needs chunk to be a power of two from 2 to 64, "
                       f"got chunk={self.chunk}")

  @classmethod
  def get_default(cls, k: int, d: int, n: int | None = None) -> "BlockSizes":
    """The fastest of the tiles tried on a 2-core x86 CPU (see kernels/bench.py).

    `n` is the number of keys when the search could use paired minima (l2 on
    float32), None otherwise.

    Measured at k = 10 (d = 64 and 128) and k = 100 (d = 128); other k reuse the
    nearest setting. A (block_n, block_q) = (2048, 256) score tile (2 MiB) was as
    fast as or faster than 1 MiB and 4 MiB tiles. The chunk trades the chunk-minimum
    selection (~N / chunk values per query) against the exact search over the chosen
    chunks (k * chunk keys gathered per query): small k affords long chunks, which
    matter more when a low d makes the matmul cheap. At k = 100 and 106, d = 128,
    chunk 8 took 2-3% less CPU time than chunk 4 (the exact search's gather, cached
    per few queries, is cheaper than the longer chunk-minimum selection).

    Paired minima (`pairs`) skip most of that gather. They pay where k is large and
    two winners rarely share a chunk: about k^2 chunk / (2 n) chosen chunks per query
    hold a second candidate, and up to `xla.PAIR_SLOTS` (8) of them are searched key
    by key (a query tile with a query beyond that runs the unpaired exact search).
    At n = 100k, k = 106, d = 128, pairs with chunk 16 took 17-19% less CPU time than
    chunk 8 unpaired; at k = 14 they gained under 5% (not used).
    """
    if k <= 16:
      return cls(block_q=256, block_n=2048, chunk=32 if d <= 96 else 16)
    if k <= 256:
      if n is not None and k * k * 16 <= 4 * n:  # <= 2 chunks per query to search whole
        return cls(block_q=256, block_n=2048, chunk=16, pairs=True)
      return cls(block_q=256, block_n=2048, chunk=8)
    return cls(block_q=256, block_n=2048, chunk=0)

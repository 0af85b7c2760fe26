"""Exact blocked kNN in plain XLA: query tiles x key tiles with a running top-k.

For each query tile the key tiles are visited in order. A tile's scores
`||x||^2 - 2 <q, x>` are pruned exactly before the selection: the k smallest scores of
a row lie inside the k chunks (contiguous runs of `chunk` keys) with the smallest
minima, because the minima of k other chunks would otherwise be k scores below a
winner. A min per chunk is a cheap vectorized reduction, so `lax.top_k` (the slow part
on CPU) scans k * chunk candidates instead of block_n. The tile's winners are then
merged into the running top-k. The (Q, N) matrix is never formed: memory is
O(block_q * block_n + Q * k).

Ties keep the lower index first everywhere: `lax.top_k` is stable, the chosen chunks
are re-sorted by position before their scores are gathered, and the running top-k
(lower indices) precedes the new tile in every merge.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from resmem_jax.kernels.base import BlockSizes

HIGHEST = jax.lax.Precision.HIGHEST


def _tile_top_k(scores: Float[Array, "bq bn"], k: int, chunk: int
                ) -> tuple[Float[Array, "bq kk"], Int[Array, "bq kk"]]:
  """Smallest min(k, bn) scores of each row of one tile and their column indices."""
  bq, bn = scores.shape
  if not chunk or k * chunk >= bn:
    neg, cols = jax.lax.top_k(-scores, min(k, bn))
    return -neg, cols
  n_chunks = bn // chunk
  chunked = scores.reshape(bq, n_chunks, chunk)
  _, chunk_ids = jax.lax.top_k(-chunked.min(axis=-1), k)
  chunk_ids = jnp.sort(chunk_ids, axis=-1)  # position order keeps ties lower-index first
  candidates = jnp.take_along_axis(chunked, chunk_ids[:, :, None], axis=1).reshape(bq, k * chunk)
  neg, pos = jax.lax.top_k(-candidates, k)
  cols = jnp.take_along_axis(chunk_ids, pos // chunk, axis=-1) * chunk + pos % chunk
  return -neg, cols


def _query_tile(q_tile: Float[Array, "bq D"], keys: Float[Array, "N D"],
                key_sq: Float[Array, "N"], k: int, metric: str, block_n: int, chunk: int
                ) -> tuple[Float[Array, "bq k"], Int[Array, "bq k"]]:
  n = keys.shape[0]
  bq = q_tile.shape[0]
  n_blocks = -(-n // block_n)

  def body(carry, b):
    best, best_idx = carry
    # The last tile is shifted back to end at N (no padded copy of the keys); columns
    # that an earlier tile already covered are masked out.
    start = jnp.minimum(b * block_n, n - block_n)
    x = jax.lax.dynamic_slice_in_dim(keys, start, block_n)
    dots = jnp.dot(q_tile, x.T, precision=HIGHEST)
    if metric == "ip":
      scores = -dots
    else:
      scores = jax.lax.dynamic_slice_in_dim(key_sq, start, block_n)[None, :] - 2.0 * dots
    cols = start + jnp.arange(block_n, dtype=jnp.int32)
    scores = jnp.where(cols[None, :] >= b * block_n, scores, jnp.inf)
    vals, tile_cols = _tile_top_k(scores, k, chunk)
    merged_vals = jnp.concatenate([best, vals], axis=1)
    merged_idx = jnp.concatenate([best_idx, start + tile_cols.astype(jnp.int32)], axis=1)
    neg, pos = jax.lax.top_k(-merged_vals, k)
    return (-neg, jnp.take_along_axis(merged_idx, pos, axis=1)), None

  init = (jnp.full((bq, k), jnp.inf, q_tile.dtype), jnp.full((bq, k), n, jnp.int32))
  (best, best_idx), _ = jax.lax.scan(body, init, jnp.arange(n_blocks))
  return best, best_idx


def knn_xla(queries: Float[Array, "Q D"], keys: Float[Array, "N D"], k: int, *,
            metric: str = "l2", block_sizes: BlockSizes | None = None
            ) -> tuple[Float[Array, "Q k"], Int[Array, "Q k"]]:
  """Ranking scores and indices of the k best keys per query (see module docstring).

  Queries must already be padded to a multiple of `block_sizes.block_q` (or fewer
  than it); the public wrapper does this with its size buckets.
  """
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(k, queries.shape[1])
  n_q = queries.shape[0]
  n = keys.shape[0]
  block_n = min(block_sizes.block_n, n)
  chunk = block_sizes.chunk if block_n % max(block_sizes.chunk, 1) == 0 else 0
  block_q = min(block_sizes.block_q, n_q)
  if n_q % block_q:
    raise ValueError(f"{n_q=} must be a multiple of {block_q=}")
  key_sq = jnp.sum(keys * keys, axis=-1)
  q_tiles = queries.reshape(n_q // block_q, block_q, -1)
  best, best_idx = jax.lax.map(
      lambda q: _query_tile(q, keys, key_sq, k, metric, block_n, chunk), q_tiles)
  return best.reshape(n_q, k), best_idx.reshape(n_q, k)

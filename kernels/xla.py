"""Exact blocked kNN in plain XLA: chunk minima over whole rows, then a small exact search.

For a tile of queries the search runs in three steps:

1. Minima. The key tiles are visited in order; each tile's scores
   `||x||^2 - 2 <q, x>` (a cache-sized matmul) are reduced to one minimum per chunk of
   `chunk` consecutive keys. Only the minima leave the tile, so the (Q, N) matrix is
   never formed: memory is O(block_q * (block_n + N / chunk) + Q * k).
2. Chunk selection. The k smallest scores of a row lie inside the k chunks with the
   smallest minima: otherwise the minima of k other chunks would be k scores below a
   winner. `lax.top_k` picks those chunks from the whole row's minima at once (through
   groups of chunks when the row is long, by the same argument one level up), so the
   slow selection scans about N / chunk values per query instead of N.
3. Exact search. The k * chunk keys of the chosen chunks are gathered and re-scored;
   one `lax.top_k` over them gives the k winners. It runs on a few queries at a time,
   so the gathered keys (k * chunk rows per query) are re-read from cache rather than
   memory: at k = 106, chunk 4, d = 128 this about halved the stage's time.

Ties keep the lower index first: `lax.top_k` is stable, chosen chunks and groups are
put back in position order before their members are expanded, so every candidate list
is in increasing key order. A chunk whose minimum ties the k-th smallest minimum holds
a tied score at a lower index than any tied score in a later, unchosen chunk.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from resmem_jax.kernels.base import BlockSizes

HIGHEST = jax.lax.Precision.HIGHEST
# Bytes of gathered keys per exact-search step: a few MiB stay in the last-level cache.
GATHER_BYTES = 4 << 20


def _scores_t(x: Float[Array, "n D"], q: Float[Array, "bq D"], x_sq: Float[Array, "n"] | None
              ) -> Float[Array, "n bq"]:
  """Ranking scores, keys along the rows: ||x||^2 - 2 <q, x> (l2, `x_sq` given) or -<q, x>."""
  dots = jnp.dot(x, q.T, precision=HIGHEST)
  if x_sq is None:
    return -dots
  return x_sq[:, None] - 2.0 * dots


def _smallest(values: Float[Array, "bq m"], k: int) -> Int[Array, "bq k"]:
  """Positions of the k smallest values of each row, lower position first on ties.

  Negated as 0 - v, which maps +0 and -0 both to +0: `lax.top_k` ranks +0 above -0,
  and a zero inner product carries the sign of its factors, but equal distances must
  tie by position.
  """
  return jax.lax.top_k(0.0 - values, k)[1]


def _chunk_minima(q: Float[Array, "bq D"], keys: Float[Array, "N D"],
                  key_sq: Float[Array, "N"] | None, block_n: int, chunk: int
                  ) -> Float[Array, "G bq"]:
  """Minimum score of every chunk of `chunk` consecutive keys, G = ceil(N / chunk).

  Everything is keys-major, (keys, bq): a chunk is then `chunk` whole rows and its
  minimum an elementwise min of rows, which vectorizes across the queries (a min
  along a short minor axis does not), and no (bq, G) transpose is ever copied.
  """
  n = keys.shape[0]
  bq = q.shape[0]
  n_full = n // block_n

  def tile_minima(x, x_sq):
    scores = _scores_t(x, q, x_sq)
    pad = -scores.shape[0] % chunk
    if pad:  # only the ragged last tile: its last chunk is partial
      scores = jnp.pad(scores, ((0, pad), (0, 0)), constant_values=jnp.inf)
    return scores.reshape(-1, chunk, bq).min(axis=1)

  parts = []
  if n_full:
    def body(_, b):
      x = jax.lax.dynamic_slice_in_dim(keys, b * block_n, block_n)
      x_sq = None if key_sq is None else jax.lax.dynamic_slice_in_dim(key_sq, b * block_n, block_n)
      return None, tile_minima(x, x_sq)

    _, minima = jax.lax.scan(body, None, jnp.arange(n_full, dtype=jnp.int32))  # (T, block_n / chunk, bq)
    parts.append(minima.reshape(-1, bq))
  if n % block_n:
    start = n_full * block_n
    parts.append(tile_minima(keys[start:], None if key_sq is None else key_sq[start:]))
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def _select_chunks(minima: Float[Array, "G bq"], k: int) -> Int[Array, "bq k"]:
  """Ids of the k chunks with the smallest minima, in increasing order."""
  n_chunks, bq = minima.shape
  # Groups of chunks, so that top_k scans ~ G / group + k * group values, not G.
  group = 2 ** round(math.log2(max(1.0, math.sqrt(n_chunks / k) / 2)))
  if group > 1 and k * group < n_chunks:
    pad = -n_chunks % group
    minima = jnp.pad(minima, ((0, pad), (0, 0)), constant_values=jnp.inf)
    group_minima = minima.reshape(-1, group, bq).min(axis=1).T  # (bq, G / group)
    group_ids = jnp.sort(_smallest(group_minima, k), axis=-1)
    candidates = (group_ids[:, :, None] * group
                  + jnp.arange(group)[None, None, :]).reshape(bq, k * group)
    values = minima[candidates, jnp.arange(bq)[:, None]]  # (bq, k * group)
    chunk_ids = jnp.take_along_axis(candidates, _smallest(values, k), axis=1)
  else:
    chunk_ids = _smallest(minima.T, k)
  return jnp.sort(chunk_ids, axis=-1)


def running_top_k(q: Float[Array, "bq D"], keys: Float[Array, "N D"], k: int, block_n: int,
                  score: Callable, aux: Float[Array, "N"] | None = None
                  ) -> tuple[Float[Array, "bq k"], Int[Array, "bq k"]]:
  """The unpruned search: every key tile's top-k merged into a running top-k.

  `score(q, x, aux_tile) -> (bq, tile)` gives a tile's scores (smaller is better);
  `aux` is a per-key array sliced along with the keys (e.g. ||x||^2), or None.
  """
  n = keys.shape[0]
  bq = q.shape[0]

  def merge(carry, x, x_aux, start):
    best, best_idx = carry
    scores = score(q, x, x_aux)
    pos = _smallest(scores, min(k, scores.shape[1]))
    # The running top-k holds lower indices, so it goes first: ties stay in key order.
    vals = jnp.concatenate([best, jnp.take_along_axis(scores, pos, axis=1)], axis=1)
    idx = jnp.concatenate([best_idx, start + pos.astype(jnp.int32)], axis=1)
    pos = _smallest(vals, k)
    return jnp.take_along_axis(vals, pos, axis=1), jnp.take_along_axis(idx, pos, axis=1)

  def body(carry, b):
    x = jax.lax.dynamic_slice_in_dim(keys, b * block_n, block_n)
    x_aux = None if aux is None else jax.lax.dynamic_slice_in_dim(aux, b * block_n, block_n)
    return merge(carry, x, x_aux, b * block_n), None

  block_n = min(block_n, n)
  n_full = n // block_n
  carry = (jnp.full((bq, k), jnp.inf, q.dtype), jnp.full((bq, k), n, jnp.int32))
  carry, _ = jax.lax.scan(body, carry, jnp.arange(n_full, dtype=jnp.int32))
  if n % block_n:
    start = n_full * block_n
    carry = merge(carry, keys[start:], None if aux is None else aux[start:], start)
  return carry


def _exact_search(q: Float[Array, "s D"], keys: Float[Array, "N D"],
                  key_sq: Float[Array, "N"] | None, chunk_ids: Int[Array, "s k"], chunk: int
                  ) -> tuple[Float[Array, "s k"], Int[Array, "s k"]]:
  """The k best keys among the chosen chunks' members: gather, re-score, `top_k`."""
  n = keys.shape[0]
  s, k = chunk_ids.shape
  cols = (chunk_ids[:, :, None] * chunk + jnp.arange(chunk)[None, None, :]).reshape(s, k * chunk)
  valid = cols < n  # the last chunk may be partial
  cols = jnp.minimum(cols, n - 1)
  x = jnp.take(keys, cols, axis=0)  # (s, k * chunk, D)
  dots = jnp.einsum("qd,qmd->qm", q, x, precision=HIGHEST)
  scores = -dots if key_sq is None else jnp.take(key_sq, cols) - 2.0 * dots
  scores = jnp.where(valid, scores, jnp.inf)
  pos = _smallest(scores, k)
  return (jnp.take_along_axis(scores, pos, axis=1),
          jnp.take_along_axis(cols, pos, axis=1).astype(jnp.int32))


def _gather_rows(bq: int, row_bytes: int) -> int:
  """Queries per exact-search step: the largest divisor of bq whose gathered keys fit
  in GATHER_BYTES, so the (rows, k * chunk, D) gather is re-read from cache, not memory."""
  rows = max(1, min(bq, GATHER_BYTES // row_bytes))
  while bq % rows:
    rows -= 1
  return rows


def _query_tile(q: Float[Array, "bq D"], keys: Float[Array, "N D"],
                key_sq: Float[Array, "N"] | None, k: int, block_n: int, chunk: int
                ) -> tuple[Float[Array, "bq k"], Int[Array, "bq k"]]:
  n, d = keys.shape
  if not chunk or k * chunk >= n:  # pruning cannot help
    return running_top_k(q, keys, k, block_n, lambda q, x, x_sq: _scores_t(x, q, x_sq).T,
                         key_sq)
  bq = q.shape[0]
  chunk_ids = _select_chunks(_chunk_minima(q, keys, key_sq, block_n, chunk), k)
  rows = _gather_rows(bq, k * chunk * d * keys.dtype.itemsize)
  best, best_idx = jax.lax.map(
      lambda a: _exact_search(a[0], keys, key_sq, a[1], chunk),
      (q.reshape(-1, rows, d), chunk_ids.reshape(-1, rows, k)))
  return best.reshape(bq, k), best_idx.reshape(bq, k)


def knn_xla(queries: Float[Array, "Q D"], keys: Float[Array, "N D"], k: int, *,
            metric: str = "l2", block_sizes: BlockSizes | None = None
            ) -> tuple[Float[Array, "Q k"], Int[Array, "Q k"]]:
  """Ranking scores and indices of the k best keys per query (see module docstring).

  Queries are padded to a multiple of the query tile; the public wrapper's size
  buckets keep that padding small.
  """
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(k, queries.shape[1])
  n_q = queries.shape[0]
  n = keys.shape[0]
  chunk = block_sizes.chunk
  block_n = min(block_sizes.block_n, n)
  if chunk:  # a key tile holds whole chunks
    block_n = max(chunk, block_n // chunk * chunk)
  block_q = min(block_sizes.block_q, n_q)
  n_tiles = -(-n_q // block_q)
  padded = queries
  if n_tiles * block_q != n_q:
    padded = jnp.pad(queries, ((0, n_tiles * block_q - n_q), (0, 0)))
  key_sq = jnp.sum(keys * keys, axis=-1) if metric == "l2" else None
  q_tiles = padded.reshape(n_tiles, block_q, -1)
  best, best_idx = jax.lax.map(
      lambda q: _query_tile(q, keys, key_sq, k, block_n, chunk), q_tiles)
  return best.reshape(-1, k)[:n_q], best_idx.reshape(-1, k)[:n_q]

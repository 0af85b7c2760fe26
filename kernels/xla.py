"""Exact blocked kNN in plain XLA: chunk minima over whole rows, then a small exact search.

For a tile of queries the search runs in three steps:

1. Minima. The key tiles are visited in order, each centred as it is loaded (the
   caller's `Centring`: no centred copy of the keys); each tile's scores
   `||x||^2 - 2 <q, x>` (a cache-sized matmul) are reduced to one minimum per chunk of
   `chunk` consecutive keys. Only the minima leave the tile, so the (Q, N) matrix is
   never formed. Where the minima of a query tile would pass `SEGMENT_BYTES`, the
   keys are searched in segments (steps 1-3 each; the last one to two segments
   long) whose k best are merged in key order, so memory is O(block_q * block_n +
   SEGMENT_BYTES + Q * k) plus N squared norms. Measured (Q = 256, d = 64, 2^22 and
   2^23 keys, `tests/test_knn_memory.py`): 4 bytes more per key, the norms.
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

Paired minima (`BlockSizes.pairs`, l2 on float32) make step 3 mostly vanish. Step 1
keeps two numbers per chunk, its smallest score m1 tagged with that key's position
and its second smallest m2. Let tau be the largest m1 of the k chosen chunks. Every
key outside the chosen chunks scores >= tau, and every key but the smallest of a
chosen chunk scores >= m2. So where m2 > tau for all k chosen chunks, the k winners
are exactly the k tagged minima: no key is gathered. A chosen chunk with m2 <= tau
(about k^2 chunk / (2N) of them per query on data in random order) may hold a second
winner: its keys are gathered and scored as in step 3, up to `PAIR_SLOTS` chunks per
query. A query tile with a query that has more such chunks runs the unpaired step 3.

The tag: scores are mapped to int32 keys with the same order (`ordered`); the last
log2(chunk) bits of a key are replaced by the key's position in its chunk, so one
elementwise min gives the minimum and where it is. A tagged score differs from the
score by less than chunk units in the last place, at most `PACKED_ULPS`; the
certificate in `api.search_certified` allows for it. Equal tagged minima keep the
lower chunk first; a tie between a tagged minimum and a key of a searched chunk is
not put in index order here, which is left to the certificate's re-scoring (it sorts
its candidates by (distance, index), and a tie that reaches past them fails it).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from resmem_jax.kernels.base import BlockSizes, Centring, centre_fn

HIGHEST = jax.lax.Precision.HIGHEST
# Bytes of gathered keys per exact-search step: a few MiB stay in the last-level cache.
GATHER_BYTES = 4 << 20
# Paired minima: chosen chunks searched key by key per query (see the module docstring).
PAIR_SLOTS = 8
# Largest change of a ranking score by its position tag: chunks hold at most 64 keys.
PACKED_ULPS = 64
# Chunk minima (or pairs) held per query tile: longer key ranges are searched in
# segments whose k best are merged, so memory does not grow with N.
SEGMENT_BYTES = 64 << 20


def _scores_t(x: Float[Array, "n D"], q: Float[Array, "bq D"], x_sq: Float[Array, "n"] | None
              ) -> Float[Array, "n bq"]:
  """Ranking scores, keys along the rows: ||x||^2 - 2 <q, x> (l2, `x_sq` given) or -<q, x>."""
  dots = jnp.dot(x, q.T, precision=HIGHEST)
  if x_sq is None:
    return -dots
  return x_sq[:, None] - 2.0 * dots


def _padded_tail(keys: Float[Array, "N D"], aux: Float[Array, "N"] | None, start: int,
                 block_n: int, centre: Callable
                 ) -> tuple[Float[Array, "block_n D"], Float[Array, "block_n"] | None, Array]:
  """The ragged last keys[start:] (fewer than block_n), centred, and their `aux`,
  zero-padded to a whole tile, and which of its rows are keys.

  Every search scores its ragged remainder through this, as a tile of the same shape
  as the others: XLA picks its loops by shape, so a tile of another shape may round
  the same key's score differently, and an exact duplicate of an earlier key would
  then win or lose its tie by rounding instead of by index. The copy is under one tile.
  """
  rows = keys.shape[0] - start
  pad = lambda a: None if a is None else jnp.pad(
      a, ((0, block_n - rows),) + ((0, 0),) * (a.ndim - 1))
  return (pad(centre(keys[start:])), pad(None if aux is None else aux[start:]),
          jnp.arange(block_n) < rows)


def _key_tile(keys: Float[Array, "N D"], aux: Float[Array, "N"] | None, b, block_n: int,
              centre: Callable) -> tuple[Float[Array, "block_n D"], Float[Array, "block_n"] | None]:
  """Key tile `b` (a traced index), centred, and its `aux`."""
  x = centre(jax.lax.dynamic_slice_in_dim(keys, b * block_n, block_n))
  return x, None if aux is None else jax.lax.dynamic_slice_in_dim(aux, b * block_n, block_n)


def _gather_keys(keys: Float[Array, "N D"], cols: Int[Array, "..."], centre: Callable
                 ) -> Float[Array, "... D"]:
  """keys[cols], centred."""
  return centre(jnp.take(keys, cols, axis=0))


def _tail_scores_t(q: Float[Array, "bq D"], keys: Float[Array, "N D"],
                   key_sq: Float[Array, "N"] | None, start: int, block_n: int, centre: Callable
                   ) -> Float[Array, "block_n bq"]:
  """`_scores_t` of the ragged last keys[start:] as a whole tile (`_padded_tail`); the
  padding rows score +inf."""
  x, x_sq, valid = _padded_tail(keys, key_sq, start, block_n, centre)
  return jnp.where(valid[:, None], _scores_t(x, q, x_sq), jnp.inf)


def squared_norms(keys: Float[Array, "N D"], centre: Callable = centre_fn(None)
                  ) -> Float[Array, "N"]:
  """||centre(x)||^2 of every key, in one pass that fuses the centring (no copy)."""
  x = centre(keys)
  return jnp.sum(x * x, axis=-1)


def _smallest(values: Float[Array, "bq m"], k: int) -> Int[Array, "bq k"]:
  """Positions of the k smallest values of each row, lower position first on ties.

  Negated as 0 - v, which maps +0 and -0 both to +0: `lax.top_k` ranks +0 above -0,
  and a zero inner product carries the sign of its factors, but equal distances must
  tie by position.
  """
  return jax.lax.top_k(0.0 - values, k)[1]


def _per_chunk(q: Float[Array, "bq D"], keys: Float[Array, "N D"],
               key_sq: Float[Array, "N"] | None, block_n: int, chunk: int, centre: Callable,
               start, length: int | None, reduce: Callable):
  """`reduce(scores)` of every key tile of keys[start:start + length] (default: to the
  end), each tile's (block_n, bq) scores to a pytree of (block_n / chunk, bq) arrays,
  one row per chunk; concatenated to G = ceil(length / chunk) rows.

  Everything is keys-major, (keys, bq): a chunk is then `chunk` whole rows and its
  reduction elementwise over rows, which vectorizes across the queries (a reduction
  along a short minor axis does not), and no (bq, G) transpose is ever copied.
  `start` is a multiple of block_n, traced or not; a range with a ragged end must
  end at N and start at a static offset.
  """
  n = keys.shape[0]
  bq = q.shape[0]
  length = n - start if length is None else length
  n_full = length // block_n
  parts = []
  if n_full:
    def body(_, b):
      x, x_sq = _key_tile(keys, key_sq, b, block_n, centre)
      return None, reduce(_scores_t(x, q, x_sq))

    # leaves: (T, block_n / chunk, bq)
    _, tiles = jax.lax.scan(body, None,
                            start // block_n + jnp.arange(n_full, dtype=jnp.int32))
    parts.append(jax.tree.map(lambda a: a.reshape(-1, bq), tiles))
  if length % block_n:
    tail = start + n_full * block_n
    n_chunks = -(-(n - tail) // chunk)
    last = reduce(_tail_scores_t(q, keys, key_sq, tail, block_n, centre))
    parts.append(jax.tree.map(lambda a: a[:n_chunks], last))
  if len(parts) == 1:
    return parts[0]
  return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *parts)


def _chunk_minima(q: Float[Array, "bq D"], keys: Float[Array, "N D"],
                  key_sq: Float[Array, "N"] | None, block_n: int, chunk: int, centre: Callable,
                  start=0, length: int | None = None) -> Float[Array, "G bq"]:
  """Minimum score of every chunk of `chunk` consecutive keys of keys[start:start +
  length], G = ceil(length / chunk), keys-major (`_per_chunk`)."""
  bq = q.shape[0]
  return _per_chunk(q, keys, key_sq, block_n, chunk, centre, start, length,
                    lambda scores: scores.reshape(-1, chunk, bq).min(axis=1))


def _select_chunks(minima: Float[Array, "G bq"], k: int) -> Int[Array, "bq k"]:
  """Ids of the k chunks with the smallest minima, ordered by (minimum, id)."""
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
  return chunk_ids


def _flip(bits: Int[Array, "..."]) -> Int[Array, "..."]:
  """Negative float32 bit patterns reversed, so int32 order is float order (an involution)."""
  return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def ordered(scores: Float[Array, "..."]) -> Int[Array, "..."]:
  """float32 -> int32 keys with the same order."""
  return _flip(jax.lax.bitcast_convert_type(scores, jnp.int32))


def from_ordered(keys: Int[Array, "..."]) -> Float[Array, "..."]:
  """The inverse of `ordered`."""
  return jax.lax.bitcast_convert_type(_flip(keys), jnp.float32)


def tag_positions(scores: Float[Array, "..."], positions: Int[Array, "..."], chunk: int
                  ) -> Int[Array, "..."]:
  """Ordered int32 keys of `scores` whose last log2(chunk) bits hold `positions` (each
  < chunk). Scores are clipped to the finite floats first: a tagged infinity would
  read as NaN."""
  largest = jnp.finfo(scores.dtype).max
  return (ordered(jnp.clip(scores, -largest, largest)) & ~(chunk - 1)) | positions


def _tile_pairs(scores: Float[Array, "n bq"], chunk: int
                ) -> tuple[Int[Array, "c bq"], Int[Array, "c bq"]]:
  """Per chunk of `chunk` rows: the smallest tagged score m1 and the second smallest m2.

  Scores become ordered int32 keys whose last log2(chunk) bits hold the row's position
  in its chunk, so all keys of a chunk differ and the position of m1 is `m1 & (chunk - 1)`.
  A pairwise tournament keeps (min, second min) with elementwise min/max only, which
  vectorizes across the queries like a plain min. Scores are clipped to the finite
  floats (a tagged infinity would read as NaN), and the ragged last chunk is padded
  with the largest one.
  """
  pad = -scores.shape[0] % chunk
  if pad:
    scores = jnp.pad(scores, ((0, pad), (0, 0)), constant_values=jnp.finfo(scores.dtype).max)
  tagged = tag_positions(scores.reshape(-1, chunk, scores.shape[1]),
                         jnp.arange(chunk, dtype=jnp.int32)[None, :, None], chunk)
  lows = [tagged[:, j] for j in range(chunk)]
  highs = [None] * chunk
  while len(lows) > 1:
    merged_lows, merged_highs = [], []
    for a in range(0, len(lows), 2):
      low_a, high_a, low_b, high_b = lows[a], highs[a], lows[a + 1], highs[a + 1]
      merged_lows.append(jnp.minimum(low_a, low_b))
      second = jnp.maximum(low_a, low_b)
      if high_a is not None:
        second = jnp.minimum(second, jnp.minimum(high_a, high_b))
      merged_highs.append(second)
    lows, highs = merged_lows, merged_highs
  return lows[0], highs[0]


def _chunk_pairs(q: Float[Array, "bq D"], keys: Float[Array, "N D"], key_sq: Float[Array, "N"],
                 block_n: int, chunk: int, centre: Callable = centre_fn(None), start=0,
                 length: int | None = None) -> tuple[Int[Array, "G bq"], Int[Array, "G bq"]]:
  """`_tile_pairs` of every key tile of keys[start:start + length], keys-major
  (`_per_chunk`)."""
  return _per_chunk(q, keys, key_sq, block_n, chunk, centre, start, length,
                    lambda scores: _tile_pairs(scores, chunk))


def _no_best(bq: int, k: int, n: int, dtype) -> tuple[Array, Array]:
  """An empty running k best: +inf scores at index n (past every key)."""
  return jnp.full((bq, k), jnp.inf, dtype), jnp.full((bq, k), n, jnp.int32)


def _merge_best(a: tuple[Array, Array], b: tuple[Array, Array]) -> tuple[Array, Array]:
  """The k best (k = `a`'s width) of two (scores, indices) lists, `a`'s (lower
  indices) first on ties."""
  scores = jnp.concatenate([a[0], b[0]], axis=1)
  indices = jnp.concatenate([a[1], b[1]], axis=1)
  pos = _smallest(scores, a[0].shape[1])
  return jnp.take_along_axis(scores, pos, axis=1), jnp.take_along_axis(indices, pos, axis=1)


def running_top_k(q: Float[Array, "bq D"], keys: Float[Array, "N D"], k: int, block_n: int,
                  score: Callable, aux: Float[Array, "N"] | None = None,
                  centre: Callable = centre_fn(None), whole_tiles: bool = False
                  ) -> tuple[Float[Array, "bq k"], Int[Array, "bq k"]]:
  """The unpruned search: every key tile's top-k merged into a running top-k.

  `score(q, x, aux_tile) -> (bq, tile)` gives a tile's scores (smaller is better) on
  the tile `x = centre(keys tile)`; `aux` is a per-key array sliced along with the
  keys (e.g. ||x||^2), or None. Fewer than `block_n` keys are scored as one tile of
  their own size, unless `whole_tiles`: then as a padded tile of `block_n`, so every
  tile has one shape whatever N is.
  """
  n = keys.shape[0]
  bq = q.shape[0]

  def merge(carry, x, x_aux, start, valid=None):
    scores = score(q, x, x_aux)
    if valid is not None:  # the padded remainder: its padding rows are no keys
      scores = jnp.where(valid[None, :], scores, jnp.inf)
    pos = _smallest(scores, min(k, scores.shape[1]))
    # The running top-k holds lower indices, so it goes first: ties stay in key order.
    return _merge_best(carry, (jnp.take_along_axis(scores, pos, axis=1),
                               start + pos.astype(jnp.int32)))

  def body(carry, b):
    x, x_aux = _key_tile(keys, aux, b, block_n, centre)
    return merge(carry, x, x_aux, b * block_n), None

  block_n = block_n if whole_tiles else min(block_n, n)
  n_full = n // block_n
  carry = _no_best(bq, k, n, q.dtype)
  if n_full:
    carry, _ = jax.lax.scan(body, carry, jnp.arange(n_full, dtype=jnp.int32))
  if n % block_n:
    start = n_full * block_n
    x, x_aux, valid = _padded_tail(keys, aux, start, block_n, centre)
    carry = merge(carry, x, x_aux, start, valid)
  return carry


def _exact_search(q: Float[Array, "s D"], keys: Float[Array, "N D"],
                  key_sq: Float[Array, "N"] | None, chunk_ids: Int[Array, "s k"], chunk: int,
                  centre: Callable) -> tuple[Float[Array, "s k"], Int[Array, "s k"]]:
  """The k best keys among the chosen chunks' members: gather, re-score, `top_k`."""
  n = keys.shape[0]
  s, k = chunk_ids.shape
  cols = (chunk_ids[:, :, None] * chunk + jnp.arange(chunk)[None, None, :]).reshape(s, k * chunk)
  valid = cols < n  # the last chunk may be partial
  cols = jnp.minimum(cols, n - 1)
  x = _gather_keys(keys, cols, centre)  # (s, k * chunk, D)
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


def _exact_tile(q: Float[Array, "bq D"], keys: Float[Array, "N D"],
                key_sq: Float[Array, "N"] | None, chunk_ids: Int[Array, "bq k"], chunk: int,
                centre: Callable) -> tuple[Float[Array, "bq k"], Int[Array, "bq k"]]:
  """Step 3 for a whole query tile, a few queries (`_gather_rows`) at a time.

  The chosen chunks are put in increasing order first, so that every candidate list
  is in increasing key order (ties: lower index first).
  """
  chunk_ids = jnp.sort(chunk_ids, axis=-1)
  bq, k = chunk_ids.shape
  d = keys.shape[1]
  rows = _gather_rows(bq, k * chunk * d * keys.dtype.itemsize)
  best, best_idx = jax.lax.map(
      lambda a: _exact_search(a[0], keys, key_sq, a[1], chunk, centre),
      (q.reshape(-1, rows, d), chunk_ids.reshape(-1, rows, k)))
  return best.reshape(bq, k), best_idx.reshape(bq, k)


def paired_select(q: Float[Array, "bq D"], keys: Float[Array, "N D"], key_sq: Float[Array, "N"],
                  first: Int[Array, "G bq"], second: Int[Array, "G bq"], k: int, chunk: int,
                  centre: Callable = centre_fn(None), chunk0=0
                  ) -> tuple[Float[Array, "bq k"], Int[Array, "bq k"]]:
  """Steps 2-3 with paired minima (module docstring), from every chunk's tagged minimum
  `first` and second score `second` (`_tile_pairs`; keys-major, G chunks from chunk
  `chunk0` on: all of them by default). `q` is centred; `keys` are centred by `centre`
  as they are gathered.

  Also the selection step of the Pallas GPU kernel for large k (kernels/pallas_knn.py),
  which computes the pairs on chip.
  """
  n = keys.shape[0]
  bq = q.shape[0]
  chunk_ids = _select_chunks(from_ordered(first), k)  # (bq, k)
  rows = jnp.arange(bq)[:, None]
  low = first[chunk_ids, rows]
  tau = jnp.max(low, axis=1, keepdims=True)
  crowded = second[chunk_ids, rows] <= tau  # may hold a second winner
  chunk_ids = chunk_ids + chunk0  # rows of `first` to global chunk ids from here on
  # The first PAIR_SLOTS crowded chunks (stable top_k: in position order) are searched
  # key by key; empty slots are masked.
  n_slots = min(PAIR_SLOTS, k)
  slots = jax.lax.top_k(crowded.astype(jnp.float32), n_slots)[1]
  slot_used = jnp.take_along_axis(crowded, slots, axis=1)
  slot_chunks = jnp.take_along_axis(chunk_ids, slots, axis=1)
  cols = (slot_chunks[:, :, None] * chunk
          + jnp.arange(chunk)[None, None, :]).reshape(bq, n_slots * chunk)
  valid = jnp.repeat(slot_used, chunk, axis=1) & (cols < n)
  cols = jnp.minimum(cols, n - 1)
  dots = jnp.einsum("qd,qmd->qm", q, _gather_keys(keys, cols, centre), precision=HIGHEST)
  member_scores = jnp.where(valid, jnp.take(key_sq, cols) - 2.0 * dots, jnp.inf)
  # Every other chosen chunk contributes its tagged minimum alone.
  low_scores = jnp.where(crowded, jnp.inf, from_ordered(low))
  low_idx = chunk_ids * chunk + (low & (chunk - 1))
  pool = jnp.concatenate([low_scores, member_scores], axis=1)
  pool_idx = jnp.concatenate([low_idx, cols], axis=1)
  pos = _smallest(pool, k)
  best = jnp.take_along_axis(pool, pos, axis=1)
  best_idx = jnp.take_along_axis(pool_idx, pos, axis=1).astype(jnp.int32)
  overflow = jnp.sum(crowded, axis=1) > n_slots

  def unpaired():
    exact, exact_idx = _exact_tile(q, keys, key_sq, chunk_ids, chunk, centre)
    return (jnp.where(overflow[:, None], exact, best),
            jnp.where(overflow[:, None], exact_idx, best_idx))

  return jax.lax.cond(jnp.any(overflow), unpaired, lambda: (best, best_idx))


def _pruned_range(q: Float[Array, "bq D"], keys: Float[Array, "N D"],
                  key_sq: Float[Array, "N"] | None, k: int, block_n: int, chunk: int,
                  pairs: bool, centre: Callable, start, length: int
                  ) -> tuple[Float[Array, "bq k"], Int[Array, "bq k"]]:
  """Steps 1-3 (module docstring) on keys[start:start + length]; global indices."""
  if pairs:
    first, second = _chunk_pairs(q, keys, key_sq, block_n, chunk, centre, start, length)
    return paired_select(q, keys, key_sq, first, second, k, chunk, centre,
                         chunk0=start // chunk)
  minima = _chunk_minima(q, keys, key_sq, block_n, chunk, centre, start, length)
  chunk_ids = _select_chunks(minima, k) + start // chunk
  return _exact_tile(q, keys, key_sq, chunk_ids, chunk, centre)


def segment_length(block_q: int, block_n: int, chunk: int, k: int, pairs: bool) -> int:
  """Keys per segment of the pruned search: whole key tiles whose chunk minima (4
  bytes per chunk and query) or pairs (8) fit in SEGMENT_BYTES, and at least 4 k
  chunks, so that the k chosen chunks prune most of a segment."""
  per_chunk = block_q * (8 if pairs else 4)
  length = max(SEGMENT_BYTES // per_chunk * chunk, 4 * k * chunk)
  return -(-length // block_n) * block_n


def _query_tile(q: Float[Array, "bq D"], keys: Float[Array, "N D"],
                key_sq: Float[Array, "N"] | None, k: int, block_n: int, chunk: int,
                pairs: bool, centre: Callable) -> tuple[Float[Array, "bq k"], Int[Array, "bq k"]]:
  """The k best keys of one centred query tile; keys are centred tile by tile.

  Beyond two segments (`segment_length`), the keys are searched a segment at a time
  (the last takes the remainder, one to two segments long) and the k best of each
  merged into a running k best, in key order: the chunk minima then take constant
  memory instead of block_q * N / chunk floats.
  """
  n = keys.shape[0]
  if not chunk or k * chunk >= n:  # pruning cannot help
    return running_top_k(q, keys, k, block_n, lambda q, x, x_sq: _scores_t(x, q, x_sq).T,
                         key_sq, centre)
  search = functools.partial(_pruned_range, q, keys, key_sq, k, block_n, chunk, pairs, centre)
  segment = segment_length(q.shape[0], block_n, chunk, k, pairs)
  n_segments = n // segment
  if n_segments < 2:
    return search(0, n)

  def body(best, s):
    return _merge_best(best, search(s * segment, segment)), None

  best, _ = jax.lax.scan(body, _no_best(q.shape[0], k, n, q.dtype),
                         jnp.arange(n_segments - 1, dtype=jnp.int32))
  last = (n_segments - 1) * segment
  return _merge_best(best, search(last, n - last))


def tiling(k: int, n: int, dim: int, dtype, metric: str, block_sizes: BlockSizes | None
           ) -> tuple[BlockSizes, bool]:
  """The tiling `knn_xla` runs a k-search over n keys with, and whether it ranks by
  paired minima, whose scores carry a position tag (`PACKED_ULPS`; the certificate
  in `api.search_certified` widens its bound for them, and only for them).

  Paired minima tag float32 l2 scores only: ip keeps its scores untouched (they are
  its distances), and a search that does not prune (no chunk, or k chunks already
  covering every key) ranks the scores as they are.
  """
  pairs_ok = metric == "l2" and jnp.dtype(dtype) == jnp.float32
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(k, dim, n if pairs_ok else None)
  chunk = block_sizes.chunk
  return block_sizes, bool(pairs_ok and block_sizes.pairs and chunk and k * chunk < n)


def knn_xla(queries: Float[Array, "Q D"], keys: Float[Array, "N D"], k: int, *,
            metric: str = "l2", block_sizes: BlockSizes | None = None,
            centring: Centring | None = None
            ) -> tuple[Float[Array, "Q k"], Int[Array, "Q k"]]:
  """Ranking scores and indices of the k best keys per query (see module docstring),
  on `centring(queries)` and `centring(keys)` (None: the inputs as they are).

  The keys are centred tile by tile as they are scored, and gathered keys as they are
  gathered: no centred copy of them is made. Queries are padded to a multiple of the
  query tile; the public wrapper's size buckets keep that padding small.
  """
  n_q = queries.shape[0]
  n = keys.shape[0]
  block_sizes, pairs = tiling(k, n, queries.shape[1], keys.dtype, metric, block_sizes)
  chunk = block_sizes.chunk
  block_n = min(block_sizes.block_n, n)
  if chunk:  # a key tile holds whole chunks
    block_n = max(chunk, block_n // chunk * chunk)
  block_q = min(block_sizes.block_q, n_q)
  n_tiles = -(-n_q // block_q)
  centre = centre_fn(centring)
  padded = centre(queries)
  if n_tiles * block_q != n_q:
    padded = jnp.pad(padded, ((0, n_tiles * block_q - n_q), (0, 0)))
  key_sq = squared_norms(keys, centre) if metric == "l2" else None
  q_tiles = padded.reshape(n_tiles, block_q, -1)
  best, best_idx = jax.lax.map(
      lambda q: _query_tile(q, keys, key_sq, k, block_n, chunk, pairs, centre), q_tiles)
  return best.reshape(-1, k)[:n_q], best_idx.reshape(-1, k)[:n_q]

"""Exact kNN by direct differences: the fallback for queries the certificate cannot prove.

The ranking score ||x||^2 - 2 <q, x> of the fast paths carries a rounding error of
order eps * ||x|| (||x|| + 2 ||q||), which can exceed the gaps between neighbours when
the data are dense next to their norms (e.g. 10^5 points on a circle). Summing
(q_i - x_i)^2 instead has an error relative to the distance itself, so its order is
the float64 order up to float32 rounding of the distances. It is O(Q N D) elementwise
work rather than a matmul: `rm.knn` runs it only on the rows whose certificate failed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

# Bounds the (block_q, block_n, D) difference tensor: 2^21 floats = 8 MiB.
_TILE_ELEMENTS = 1 << 21
_BLOCK_Q = 16


def knn_direct(queries: Float[Array, "Q D"], keys: Float[Array, "N D"], k: int, *,
               metric: str = "l2", block_sizes=None
               ) -> tuple[Float[Array, "Q k"], Int[Array, "Q k"]]:
  """Squared distances (l2) or negated inner products (ip) of the k best, lower index first.

  Takes UNcentred inputs: centring rounds each coordinate by eps * |x - mean|, which is
  exactly the error this path exists to avoid.
  """
  del block_sizes
  n_q, dim = queries.shape
  n = keys.shape[0]
  block_n = int(max(1, min(n, _TILE_ELEMENTS // (_BLOCK_Q * dim))))
  n_blocks = -(-n // block_n)
  pad_q = -n_q % _BLOCK_Q
  q_tiles = jnp.pad(queries, ((0, pad_q), (0, 0))).reshape(-1, _BLOCK_Q, dim)

  def tile(q):
    def body(carry, b):
      best, best_idx = carry
      # The last block is shifted back to end at N; columns an earlier block already
      # covered are masked, so no padded copy of the keys is made.
      start = jnp.minimum(b * block_n, n - block_n)
      x = jax.lax.dynamic_slice_in_dim(keys, start, block_n)
      if metric == "ip":
        scores = -jnp.sum(q[:, None, :] * x[None, :, :], axis=-1)
      else:
        scores = jnp.sum(jnp.square(q[:, None, :] - x[None, :, :]), axis=-1)
      cols = start + jnp.arange(block_n, dtype=jnp.int32)
      scores = jnp.where(cols[None, :] >= b * block_n, scores, jnp.inf)
      # Running top-k first: on equal scores the lower (earlier) index wins.
      merged = jnp.concatenate([best, scores], axis=1)
      merged_idx = jnp.concatenate(
          [best_idx, jnp.broadcast_to(cols[None, :], scores.shape)], axis=1)
      neg, pos = jax.lax.top_k(-merged, k)
      return (-neg, jnp.take_along_axis(merged_idx, pos, axis=1)), None

    init = (jnp.full((_BLOCK_Q, k), jnp.inf, queries.dtype),
            jnp.full((_BLOCK_Q, k), n, jnp.int32))
    (best, best_idx), _ = jax.lax.scan(body, init, jnp.arange(n_blocks))
    return best, best_idx

  best, best_idx = jax.lax.map(tile, q_tiles)
  return best.reshape(-1, k)[:n_q], best_idx.reshape(-1, k)[:n_q]

"""Exact kNN by direct differences: the fallback for queries the certificate cannot prove.

The ranking score ||x||^2 - 2 <q, x> of the fast paths carries a rounding error of
order eps * ||x|| (||x|| + 2 ||q||), which can exceed the gaps between neighbours when
the data are dense next to their norms (e.g. 10^5 points on a circle). Summing
(q_i - x_i)^2 instead has an error relative to the distance itself, so its order is
the float64 order up to float32 rounding of the distances. It is O(Q N D) elementwise
work rather than a matmul: `rm.knn` runs it only on the rows whose certificate failed.
The tiles and the running top-k are the XLA path's unpruned search (`running_top_k`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from resmem_jax.kernels.base import Centring, centre_fn
from resmem_jax.kernels.xla import running_top_k

# Bounds the (block_q, block_n, D) difference tensor: 2^21 floats = 8 MiB.
_TILE_ELEMENTS = 1 << 21
_BLOCK_Q = 16
# Keys per tile at most; fewer keys are scored as one padded tile of the same shape.
_MAX_BLOCK_N = 2048


def _direct_scores(q: Float[Array, "bq D"], x: Float[Array, "bn D"], aux, *, metric: str
                   ) -> Float[Array, "bq bn"]:
  del aux
  if metric == "ip":
    return -jnp.sum(q[:, None, :] * x[None, :, :], axis=-1)
  return jnp.sum(jnp.square(q[:, None, :] - x[None, :, :]), axis=-1)


def knn_direct(queries: Float[Array, "Q D"], keys: Float[Array, "N D"], k: int, *,
               metric: str = "l2", block_sizes=None, centring: Centring | None = None
               ) -> tuple[Float[Array, "Q k"], Int[Array, "Q k"]]:
  """Squared distances (l2) or negated inner products (ip) of the k best, lower index
  first, on `centring(queries)` and `centring(keys)` (keys tile by tile).

  Meant for a `centring` that only scales (zero mean): centring rounds each coordinate
  by eps * |x - mean|, which is exactly the error this path exists to avoid.

  The key tiles have one shape for a given D, whatever N is (XLA picks its loops by
  shape, and another shape may round a sum differently), so a shard of a sharded
  search mostly scores a key with the bits one device gives it: on 8 shards of 25 keys
  (D = 4, inner products of data offset by 1e4, all near-tied in float32), 312 of 768
  rows kept another k-th neighbour than one device before, none since. Not always: the
  tiles of the scan and the padded last tile are compiled apart, and the merge ranks
  the shards' winners by their re-scored distances, which may round differently again.
  In such data (1e4 + 0.01 N(0, 1), D = 4) at N = 2560, k = 7, 5 to 125 of 128 rows
  differed over six draws, and all 128 with a spread of 0.001 (where 2011 keys are
  float32 copies of others); every answer was within 1.5 float32 ulps of the float64
  k-th score, with copies in index order, on one device and sharded alike. Summing
  over D in a fixed order (unrolled adds) made more rows differ, not fewer.
  """
  del block_sizes
  centre = centre_fn(centring)
  n_q, dim = queries.shape
  block_n = int(max(1, min(_MAX_BLOCK_N, _TILE_ELEMENTS // (_BLOCK_Q * dim))))
  q_tiles = jnp.pad(centre(queries), ((0, -n_q % _BLOCK_Q), (0, 0))).reshape(-1, _BLOCK_Q, dim)
  score = lambda q, x, aux: _direct_scores(q, x, aux, metric=metric)
  best, best_idx = jax.lax.map(
      lambda q: running_top_k(q, keys, k, block_n, score, centre=centre, whole_tiles=True),
      q_tiles)
  return best.reshape(-1, k)[:n_q], best_idx.reshape(-1, k)[:n_q]

"""The plain-jnp kNN: the whole (Q, N) score matrix and one `lax.top_k`.

It is the oracle of the test suite and the path for tiny inputs. It takes the public
wrapper's inputs with their `Centring` and returns ranking scores, not distances; the
wrapper re-scores the winners.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from resmem_jax.kernels.base import Centring, centre_fn

HIGHEST = jax.lax.Precision.HIGHEST


def ranking_scores(queries: Float[Array, "Q D"], keys: Float[Array, "N D"],
                   metric: str) -> Float[Array, "Q N"]:
  """Scores whose row order equals the distance order.

  l2: ||x||^2 - 2 <q, x>   (||q||^2 is dropped: it does not change a row's order)
  ip: -<q, x>
  """
  dots = jnp.dot(queries, keys.T, precision=HIGHEST)
  if metric == "ip":
    return -dots
  return jnp.sum(keys * keys, axis=-1)[None, :] - 2.0 * dots


def knn_reference(queries: Float[Array, "Q D"], keys: Float[Array, "N D"], k: int, *,
                  metric: str = "l2", block_sizes=None, centring: Centring | None = None
                  ) -> tuple[Float[Array, "Q k"], Int[Array, "Q k"]]:
  """Top-k of the full score matrix of `centring(queries)` and `centring(keys)`;
  `lax.top_k` keeps the lower index first on ties."""
  del block_sizes
  centre = centre_fn(centring)
  queries, keys = centre(queries), centre(keys)  # the (Q, N) scores are larger anyway
  # 0 - s, not -s: +0 and -0 must tie by index (see xla._smallest).
  neg_top, indices = jax.lax.top_k(0.0 - ranking_scores(queries, keys, metric), k)
  return -neg_top, indices.astype(jnp.int32)

"""`knn`: the one public exact-kNN op, with its implementations behind one switch."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from resmem_jax import _validation as v
from resmem_jax.kernels import sharded
from resmem_jax.kernels.base import BlockSizes, KnnResult
from resmem_jax.kernels.reference import knn_reference
from resmem_jax.kernels.xla import knn_xla

HIGHEST = jax.lax.Precision.HIGHEST
METRICS = ("l2", "ip")

# name -> fn(queries, keys, k, *, metric, block_sizes) -> (scores, indices), on centred
# inputs. Optional backends register themselves through guarded imports below so a
# missing backend never breaks `import resmem_jax`.
IMPLEMENTATIONS: dict[str, Callable] = {"reference": knn_reference, "xla": knn_xla}
# Everything `implementation=` may name, registered or not (for the error messages).
KNOWN_IMPLEMENTATIONS = ("reference", "xla", "pallas")
# Inputs this small run the plain reference: one small matmul beats the tiled loop.
REFERENCE_MAX_PAIRS = 1 << 16

try:  # The Pallas kernel is optional: it needs a jax with Pallas and a supported platform.
  from resmem_jax.kernels import pallas_knn as _pallas_knn  # pytype: disable=import-error
except ImportError:
  _pallas_knn = None
else:
  IMPLEMENTATIONS["pallas"] = _pallas_knn.knn_pallas


def query_bucket(n: int) -> int:
  """Padded number of queries: at most 25% padding (or < 8 rows), few compiled shapes.

  Sizes are m * 2^e with m in {4, 5, 6, 7} (and at least 8), so any n >= 32 pads by
  at most a quarter and a new batch size inside a bucket reuses the compiled search.
  """
  if n <= 8:
    return 8
  step = max(1 << (n.bit_length() - 3), 8)
  return -(-n // step) * step


def default_implementation(n_queries: int, n_keys: int, k: int, dim: int, dtype) -> str:
  """The best registered implementation for the default backend and this problem."""
  platform = jax.default_backend()
  if (platform in ("gpu", "tpu") and _pallas_knn is not None
      and _pallas_knn.is_supported(k=k, dim=dim, dtype=dtype, platform=platform)):
    return "pallas"
  if n_queries * n_keys <= REFERENCE_MAX_PAIRS:
    return "reference"
  return "xla"


def _rescore(queries: Float[Array, "Q D"], keys: Float[Array, "N D"],
             indices: Int[Array, "Q k"], metric: str
             ) -> tuple[Float[Array, "Q k"], Int[Array, "Q k"]]:
  """Exact distances of the k winners, computed directly, then re-sorted.

  The expanded ||x||^2 - 2 q.x ranks well but loses every digit of a distance that is
  small next to the norms; ||q - x|| on the k winners (Q x k x D work) does not.
  Sorting on (distance, index) keeps the lower index first on ties.
  """

  def one(args):
    q, idx = args
    winners = keys[idx]  # (k, D)
    if metric == "ip":
      dist = -jnp.sum(q[None, :] * winners, axis=-1)
    else:
      dist = jnp.sqrt(jnp.sum(jnp.square(q[None, :] - winners), axis=-1))
    return jax.lax.sort((dist, idx), num_keys=2)

  # Batches of queries bound the (batch, k, D) gather of winners.
  return jax.lax.map(one, (queries, indices), batch_size=min(256, queries.shape[0]))


@functools.partial(jax.jit, static_argnames=("k", "metric", "implementation", "block_sizes"))
def _knn_padded(queries, keys, *, k, metric, implementation, block_sizes):
  dtype = jnp.promote_types(jnp.promote_types(queries.dtype, keys.dtype), jnp.float32)
  queries = queries.astype(dtype)
  keys = keys.astype(dtype)
  if metric == "l2":
    # Centring on the key mean keeps the ranking exact for data far from the origin,
    # where ||x||^2 and 2 q.x are huge and nearly cancel.
    mean = jnp.mean(keys, axis=0, keepdims=True)
    q_rank, k_rank = queries - mean, keys - mean
  else:
    q_rank, k_rank = queries, keys
  _, indices = IMPLEMENTATIONS[implementation](
      q_rank, k_rank, k, metric=metric, block_sizes=block_sizes)
  return _rescore(queries, keys, indices.astype(jnp.int32), metric)


def knn(queries: Float[Array, "Q D"], keys: Float[Array, "N D"], k: int, *,
        metric: str = "l2", implementation: str | None = None,
        block_sizes: BlockSizes | None = None) -> KnnResult:
  r"""Exact k-nearest-neighbour search.

  For every query q the k keys x_j with the smallest

    l2: d_j = ||q - x_j||_2          ip: d_j = -<q, x_j>

  in ascending order, equal distances with the lower index first. The search ranks by
  ||x||^2 - 2 <q, x> on data centred by the key mean, with f32 matmuls at
  `Precision.HIGHEST`, then recomputes the k winners' distances directly, so the
  result equals a float64 brute-force search up to float32 rounding of the distances.
  Memory stays O(block_q * (block_n + N / chunk) + Q * k) above a centred copy of
  the keys: the (Q, N) matrix is never formed.

  Args:
    queries: (Q, D) floating array.
    keys: (N, D) floating array, N >= 1.
    k: number of neighbours, 1 <= k <= N.
    metric: "l2" (Euclidean) or "ip" (negated inner product).
    implementation: None picks the best for the platform (the Pallas kernel on GPU/TPU
      where it supports the problem, the blocked XLA search otherwise, the reference
      for tiny inputs); or one of "reference", "xla", "pallas".
    block_sizes: tiling of the blocked search; `BlockSizes.get_default(k, D)` if None.

  Returns:
    KnnResult(distances (Q, k) float32, indices (Q, k) int32).

  Raises:
    TypeError: non-floating queries or keys, non-int k.
    ValueError: bad shapes, non-finite values, k outside [1, N], unknown metric or
      implementation.

  Example:
    >>> res = knn(jnp.zeros((2, 3)), jnp.eye(3), k=2)
    >>> res.indices
    Array([[0, 1], [0, 1]], dtype=int32)

  References:
    Yang et al., "ResMem: Learn what you can and memorize the rest", NeurIPS 2023.
  """
  queries = v.as_array("queries", queries)
  keys = v.as_array("keys", keys)
  v.check_floating("queries", queries)
  v.check_floating("keys", keys)
  v.check_ndim("queries", queries, (2,), "a (Q, D) matrix")
  v.check_ndim("keys", keys, (2,), "an (N, D) matrix")
  n_q, dim = queries.shape
  n_keys = keys.shape[0]
  if n_keys == 0:
    raise ValueError(f"keys must hold at least one row, got keys.shape={tuple(keys.shape)}")
  if keys.shape[1] != dim:
    raise ValueError(f"queries and keys must share their last dimension, got "
                     f"queries.shape={tuple(queries.shape)}, keys.shape={tuple(keys.shape)}")
  k = v.check_int("k", k, low=1, high=n_keys)
  v.check_choice("metric", metric, METRICS)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"block_sizes must be a BlockSizes, got {block_sizes!r}")
  if implementation is None:
    implementation = default_implementation(n_q, n_keys, k, dim, queries.dtype)
  v.check_choice("implementation", implementation, KNOWN_IMPLEMENTATIONS)
  if implementation not in IMPLEMENTATIONS:
    available = ", ".join(repr(name) for name in IMPLEMENTATIONS)
    raise ValueError(f"implementation={implementation!r} is not available in this "
                     f"installation; use one of {available} or None")
  v.check_finite("queries", queries)
  v.check_finite("keys", keys)

  if n_q == 0:
    return KnnResult(jnp.zeros((0, k), jnp.float32), jnp.zeros((0, k), jnp.int32))
  padded = query_bucket(n_q)
  if padded != n_q:
    queries = jnp.pad(jnp.asarray(queries), ((0, padded - n_q), (0, 0)))
  if sharded.row_axes(keys) is not None:
    # Keys split over devices by rows: local searches + one merge, same result.
    distances, indices = sharded.knn_sharded(
        queries, keys, k, metric=metric, implementation=implementation,
        block_sizes=block_sizes)
  else:
    distances, indices = _knn_padded(
        queries, keys, k=k, metric=metric, implementation=implementation,
        block_sizes=block_sizes)
  return KnnResult(distances[:n_q], indices[:n_q])

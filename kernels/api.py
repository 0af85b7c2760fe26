"""`knn`: the one public exact-kNN op, with its implementations behind one switch."""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from resmem_jax import _validation as v
from resmem_jax.kernels import sharded
from resmem_jax.kernels import xla as _xla
from resmem_jax.kernels.base import BlockSizes, Centring, KnnResult
from resmem_jax.kernels.direct import knn_direct
from resmem_jax.kernels.reference import knn_reference
from resmem_jax.kernels.xla import PACKED_ULPS, knn_xla

HIGHEST = jax.lax.Precision.HIGHEST
METRICS = ("l2", "ip")

# name -> fn(queries, keys, k, *, metric, block_sizes, centring) -> (scores, indices),
# ranking `centring(queries)` against `centring(keys)`, the keys centred tile by tile
# (kernels/base.py: `Centring`). Optional backends register themselves through guarded
# imports below so a missing backend never breaks `import resmem_jax`.
# "direct" sums (q_i - x_i)^2 over every pair (no matmul): slow, never the default, and
# the exact fallback for the queries whose certificate fails (see `search_certified`).
IMPLEMENTATIONS: dict[str, Callable] = {
    "reference": knn_reference, "xla": knn_xla, "direct": knn_direct}
# Everything `implementation=` may name, registered or not (for the error messages).
KNOWN_IMPLEMENTATIONS = ("reference", "xla", "pallas", "direct")
# Queries per step of the re-scoring loop; every query bucket is a multiple of it.
RESCORE_BATCH = 8
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
  at most a quarter and a new batch size inside a bucket reuses the compiled search:
  only `knn`'s row padding (for device arrays) and its final cut to n rows compile
  anew, two small programs (tens of ms on CPU).
  """
  if n <= 8:
    return 8
  step = max(1 << (n.bit_length() - 3), 8)
  return -(-n // step) * step


# Platforms where the Pallas kernel, picked by `implementation=None`, failed to compile
# or run in this process, or disagreed with the XLA path on the check problem: the
# default there is the XLA path from then on.
_PALLAS_FAILED: set[str] = set()
# Kernel configurations (platform, metric, candidates, D, tiles, the caller's abstract
# mesh) that passed the check problem in this process (`_check_kernel`).
_PALLAS_CHECKED: set[tuple] = set()
# The check problem: query and key counts past whole tiles of every default tiling
# (query tiles of 32, 64 or 128 rows, key tiles of 32 to 512); at least this many keys,
# more where the GPU pairs kernel needs them (`_check_keys`).
_CHECK_QUERIES, _CHECK_KEYS = 131, 1061


def _check_keys(candidates: int, block_sizes: BlockSizes | None) -> int:
  """Keys of the check problem: enough that the GPU pairs kernel prunes chunks (with
  fewer than candidates * chunk keys it hands the search to the XLA path, and the
  check would compare XLA with XLA), and a ragged last tile."""
  chunk = block_sizes.chunk if block_sizes is not None and block_sizes.pairs else 16
  return max(_CHECK_KEYS, 2 * candidates * max(chunk, 1) + 37)


def _platform() -> str:
  return jax.default_backend()


def default_implementation(n_queries: int, n_keys: int, k: int, dim: int, dtype,
                           metric: str = "l2") -> str:
  """The best registered implementation for the default backend and this problem."""
  platform = _platform()
  if (platform in ("gpu", "tpu") and platform not in _PALLAS_FAILED and _pallas_knn is not None
      and _pallas_knn.is_supported(k=n_candidates(k, n_keys), dim=dim, dtype=dtype,
                                   platform=platform, metric=metric)):
    return "pallas"
  if n_queries * n_keys <= REFERENCE_MAX_PAIRS:
    return "reference"
  return "xla"


def _rescore(queries: Float[Array, "Q D"], keys: Float[Array, "N D"],
             indices: Int[Array, "Q m"], metric: str, scale, n_valid: int | None = None
             ) -> tuple[Float[Array, "Q m"], Int[Array, "Q m"]]:
  """Exact distances of the candidates on the data times `scale`, then re-sorted.

  The expanded ||x||^2 - 2 q.x ranks well but loses every digit of a distance that is
  small next to the norms; ||q - x|| on the candidates (Q x m x D work) does not.
  Sorting on (distance, index) keeps the lower index first on ties. Columns from
  `n_valid` on are padding (so that a shard re-scores at the same width as one device,
  which gives the same bits): they sort last as (inf, N).
  """
  n = keys.shape[0]

  def one(args):
    q, idx = args
    q = q * scale
    winners = keys[idx] * scale  # (m, D)
    if metric == "ip":
      return 0.0 - jnp.sum(q[None, :] * winners, axis=-1)  # +0, never -0
    # A query on a key: d = 0, where sqrt's derivative is infinite and 0 * inf would
    # make the whole gradient NaN; the subgradient 0 is taken there instead.
    squares = jnp.sum(jnp.square(q[None, :] - winners), axis=-1)
    nonzero = squares != 0  # NaN stays NaN
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squares, 1.0)), 0.0)

  # A fixed batch (query buckets are multiples of 8) bounds the (batch, m, D) gather and
  # compiles the same loop body for every number of queries, so a row's distances are
  # the same bits whether it is searched in a large batch or re-done in a small one.
  dist = jax.lax.map(one, (queries, indices), batch_size=RESCORE_BATCH)
  if n_valid is not None and n_valid < indices.shape[1]:
    valid = jnp.arange(indices.shape[1])[None, :] < n_valid
    dist, indices = jnp.where(valid, dist, jnp.inf), jnp.where(valid, indices, n)
  return sort_nearly_sorted(dist, indices)


def _after(d_a, i_a, d_b, i_b):
  """(d_a, i_a) sorts strictly after (d_b, i_b)."""
  return (d_a > d_b) | ((d_a == d_b) & (i_a > i_b))


def sort_nearly_sorted(dist: Float[Array, "Q m"], idx: Int[Array, "Q m"],
                       passes: int = 2) -> tuple[Float[Array, "Q m"], Int[Array, "Q m"]]:
  """Rows sorted by (distance, index), cheaply when they almost are already.

  The candidates arrive in the ranking's order, which the re-scored distances keep up
  to swaps of near-ties. A few odd-even transposition passes (compare-and-swap of
  neighbours, vectorized over all rows) sort such rows; if any row is still out of
  order, the whole batch takes the full `lax.sort` instead. Either way the result is
  the order of `lax.sort` on (distance, index).
  """
  d, i = dist, idx
  rows, m = d.shape
  for p in range(min(passes, m - 1)):
    lo = p % 2
    hi = lo + (m - lo) // 2 * 2
    d_a, d_b = d[:, lo:hi:2], d[:, lo + 1:hi:2]
    i_a, i_b = i[:, lo:hi:2], i[:, lo + 1:hi:2]
    swap = _after(d_a, i_a, d_b, i_b)
    d_mid = jnp.stack([jnp.where(swap, d_b, d_a), jnp.where(swap, d_a, d_b)], axis=2)
    i_mid = jnp.stack([jnp.where(swap, i_b, i_a), jnp.where(swap, i_a, i_b)], axis=2)
    d = jnp.concatenate([d[:, :lo], d_mid.reshape(rows, -1), d[:, hi:]], axis=1)
    i = jnp.concatenate([i[:, :lo], i_mid.reshape(rows, -1), i[:, hi:]], axis=1)
  in_order = ~jnp.any(_after(d[:, :-1], i[:, :-1], d[:, 1:], i[:, 1:]))
  return jax.lax.cond(in_order, lambda: (d, i),
                      lambda: tuple(jax.lax.sort((dist, idx), num_keys=2)))


def candidate_margin(k: int) -> int:
  """Candidates searched beyond k, so that the certificate has a gap to stand on."""
  return max(4, k // 16)


def n_candidates(k: int, n: int) -> int:
  """How many candidates `search_certified` re-scores for a k-search over n keys (either
  metric: the margin is what the certificate's gap stands on)."""
  return min(n, k + candidate_margin(k))


def _tags_scores(implementation: str, k: int, n: int, dim: int, dtype, metric: str,
                 block_sizes: BlockSizes | None) -> bool:
  """Whether `implementation` ranks a k-search over n keys by position-tagged scores
  (paired minima); the same decision the implementation itself takes."""
  if implementation == "xla":
    return _xla.tiling(k, n, dim, dtype, metric, block_sizes)[1]
  if implementation == "pallas":
    backend = _pallas_knn.backend_for(_platform())
    return _pallas_knn.uses_pairs(backend, k, metric, block_sizes)
  return False


def search_certified(queries: Float[Array, "Q D"], keys: Float[Array, "N D"],
                     mean: Float[Array, "1 D"], k: int, *, metric: str, implementation: str,
                     block_sizes: BlockSizes | None, width: int | None = None, scale=1.0
                     ) -> tuple[Float[Array, "Q k"], Int[Array, "Q k"], Array]:
  r"""k nearest keys, re-scored exactly, with a per-query proof that none was missed.

  The implementation ranks by s(x) = ||x_c||^2 - 2 <q_c, x_c> on data centred by
  `mean` and returns m = k + `candidate_margin(k)` candidates. In float32, s carries
  an error of at most E(q) = gamma (R^2 + 2 ||q_c|| R), R = max ||x_c||, gamma =
  4 (D + 2) eps/2 (twice the textbook dot-product bound, as the pruning pass and the
  final selection may round differently). Every key left out has s >= s_m, the
  m-th candidate's score, so its true squared distance is at least
  s_m + ||q_c||^2 - E(q). (The XLA path's ranking scores, and the GPU pairs kernel's,
  carry a position tag of up to 64 units in the last place; gamma grows by 2 * 64 eps
  for them.) The candidates are re-scored directly as ||q - x||; if the k-th of them
  is below that bound, the k nearest are proven exact (certified). The certificate
  fails only where the data are dense next to their norms (many keys within E of the
  k-th distance); `knn` recomputes those rows with "direct".

  The inner-product metric ranks by s(x) = -<q, x> itself (no centring), with an
  error of at most E(q) = gamma ||q|| R; the re-scored k-th distance d_k carries as
  much, so the k nearest are proven when d_k + E(q) < s_m - E(q). Its ranking score
  is its distance, but not with the same rounding: the search's dot products run in
  tiles and gathers of other shapes than the re-scoring, so exact copies of one key
  may rank in another order than their indices. Without a margin such a tie could
  drop a lower-index copy; with it, the tie fails the certificate and the direct
  search, which scores every key alike, puts the copies in index order.

  For both metrics the one score the certificate takes on trust, s_m, is first
  checked against its key's score recomputed directly (`_top_score_is_its_keys`), so
  an unfilled slot or a score that is not its key's (a kernel gone wrong) sends the
  row to the fallback.

  `width` (static): re-score this many columns (padding beyond the candidates), so a
  shard of a sharded search, and the direct fallback, compute the same bits as one
  device's ranked search.

  `scale` (a power of two, `search_scale`): everything above runs on the data times
  `scale`, which moves exponents only; `mean` is the mean of the scaled keys. The
  distances are divided back at the end.

  Returns:
    (distances (Q, k), indices (Q, k), certified (Q,) bool).
  """
  n, dim = keys.shape
  exact = implementation == "direct"
  n_cand = k if exact else n_candidates(k, n)
  # The direct fallback re-scores at the same width as the ranked search, so the
  # distances it returns for a row are the same bits.
  width = width or n_candidates(k, n)
  if implementation == "direct":  # scaled, not centred: see kernels/direct.py
    mean = jnp.zeros_like(mean)
  # The keys are centred tile by tile inside the search, and where they are gathered
  # below: a centred copy of them would double the memory the search needs.
  centre = Centring(jnp.asarray(scale, keys.dtype), mean.astype(keys.dtype))
  q_rank = centre(queries)
  scores, indices = IMPLEMENTATIONS[implementation](
      queries, keys, n_cand, metric=metric, block_sizes=block_sizes, centring=centre)
  # Keeps XLA from fusing the search into what follows: on CPU a lax.top_k of k <= 9
  # fused with the re-scoring ran ~15x slower (the reference path at k = 1..5).
  scores, indices = jax.lax.optimization_barrier((scores, indices))
  indices = indices.astype(jnp.int32)
  ranked = indices
  if width > n_cand:
    indices = jnp.pad(indices, ((0, 0), (0, width - n_cand)))
  distances, indices = _rescore(queries, keys, indices, metric, scale, n_valid=n_cand)
  # Back to the caller's units: l2 distances scale by s, inner products by s^2: two
  # divisions, as s^2 may be beyond float32, kept apart by a barrier (XLA would
  # otherwise rewrite (d / s) / s as d / (s * s)).
  def unscale(d):
    d = d / scale
    return d if metric == "l2" else jax.lax.optimization_barrier(d) / scale
  if implementation == "direct":
    return unscale(distances[:, :k]), indices[:, :k], jnp.ones(queries.shape[0], bool)
  # Paired minima (the XLA path's, the GPU kernel's) tag the ranking scores, moving
  # them by up to PACKED_ULPS units in the last place (kernels/xla.py): twice that
  # joins the bound.
  tags = _tags_scores(implementation, n_cand, n, dim, keys.dtype, metric, block_sizes)
  tagged_ulps = PACKED_ULPS if tags else 0
  gamma = (4.0 * (dim + 2) / 2 + 2.0 * tagged_ulps) * float(jnp.finfo(scores.dtype).eps)
  radius = jnp.sqrt(jnp.max(_xla.squared_norms(keys, centre)))
  q_sq = jnp.sum(jnp.square(q_rank), axis=-1)
  s_m = jnp.max(scores, axis=-1)
  if metric == "ip":  # scores and distances are both -<q, x> on the scaled data
    error = gamma * jnp.sqrt(q_sq) * radius
    separated = distances[:, k - 1] + error < s_m - error
  else:
    error = gamma * (radius * radius + 2.0 * jnp.sqrt(q_sq) * radius)
    separated = jnp.square(distances[:, k - 1]) * (1.0 + gamma) < s_m + q_sq - error
  trusted = _top_score_is_its_keys(q_rank, keys, centre, scores, ranked, metric, gamma,
                                   error, q_sq, radius)
  # Every key is a candidate when n_cand == n: nothing was left out to separate.
  certified = trusted if n_cand == n else trusted & separated
  return unscale(distances[:, :k]), indices[:, :k], certified


def _top_score_is_its_keys(q_rank, keys, centre, scores, indices, metric: str, gamma: float,
                           error, q_sq, radius) -> Array:
  r"""Per row: the largest candidate score is its key's score, up to rounding.

  The certificate takes one number on trust from the implementation: s_m, the largest
  candidate score, which every key left out is said to reach. An unfilled slot (inf),
  an index out of range, or a score that is not its key's (a kernel miscompiled on a
  chip it was never run on) would let a wrong answer through, so s_m is compared
  with its key's score computed directly on the same centred data: ||q_c - x_c||^2 -
  ||q_c||^2 for l2, -<q, x> for ip. In exact arithmetic they are equal; in float32
  they differ by at most E(q) + gamma (d^2 + ||q_c||^2) (l2) or gamma ||q|| R (ip),
  plus (D + 2) float32-tiny per unit of scale for flushed subnormals. A row that
  fails is recomputed by the exact fallback, like any uncertified row. (A key that
  the implementation skipped while reporting true scores is beyond this check.)
  """
  n, dim = keys.shape
  top = jnp.argmax(scores, axis=-1)[:, None]
  s_top = jnp.take_along_axis(scores, top, axis=1)[:, 0]
  idx = jnp.take_along_axis(indices, top, axis=1)[:, 0]
  x = centre(keys[jnp.clip(idx, 0, n - 1)])
  q_norm = jnp.sqrt(q_sq)
  slack = (dim + 2) * float(jnp.finfo(scores.dtype).tiny) * jnp.square(1.0 + q_norm + radius)
  if metric == "ip":
    direct = -jnp.sum(q_rank * x, axis=-1)
    tolerance = gamma * q_norm * radius + slack
  else:
    d_sq = jnp.sum(jnp.square(q_rank - x), axis=-1)
    direct = d_sq - q_sq
    tolerance = error + gamma * (d_sq + q_sq) + slack
  in_range = (idx >= 0) & (idx < n)
  return in_range & jnp.isfinite(s_top) & (jnp.abs(s_top - direct) <= tolerance)


def search_dtype(queries, keys):
  """The dtype the search runs in: the promoted input dtype, at least float32."""
  return jnp.promote_types(jnp.promote_types(queries.dtype, keys.dtype), jnp.float32)


def _promote(queries, keys):
  dtype = search_dtype(queries, keys)
  return queries.astype(dtype), keys.astype(dtype)


def _row_padding(x, rows: int) -> list[tuple[int, int]]:
  return [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)


@functools.partial(jax.jit, static_argnums=1)
def _pad_rows(x, rows: int):
  return jnp.pad(x, _row_padding(x, rows))


@functools.partial(jax.jit, static_argnums=1)
def _first_rows(arrays, rows: int):
  return jax.tree.map(lambda a: a[:rows], arrays)


def pad_rows(x, rows: int):
  """`x` with zero rows appended up to `rows`: on the host for NumPy input, else in one
  small compiled program (the search after it then sees only bucket shapes)."""
  if x.shape[0] == rows:
    return x
  if isinstance(x, np.ndarray):
    return np.pad(x, _row_padding(x, rows))
  return _pad_rows(x, rows)


def key_mean(keys: Float[Array, "N D"], metric: str, scale=1.0) -> Float[Array, "1 D"]:
  """Centring for the ranking: the mean of `keys * scale` for l2 (exact ranking for
  offset data), zeros for ip.

  Summed as sum(keys * (scale / N)): the scaled keys are then never an array of their
  own (XLA:CPU would keep `keys * scale`, used here and by the search's norms, as an
  (N, D) copy). Any vector near the mean centres as well; this one is within float32
  rounding of it.
  """
  if metric == "l2":
    return jnp.sum(keys * (scale / keys.shape[0]), axis=0, keepdims=True)
  return jnp.zeros((1, keys.shape[1]), keys.dtype)


@functools.partial(jax.jit, static_argnames=("k", "metric", "implementation", "block_sizes"))
def _knn_padded(queries, keys, magnitude=None, *, k, metric, implementation, block_sizes):
  """One device's certified search; `magnitude` (max |value|, a dynamic scalar) is
  measured here when the caller could not (under an outer jit)."""
  queries, keys = _promote(queries, keys)
  scale, mean = scale_and_mean(queries, keys, magnitude, metric)
  return search_certified(queries, keys, mean, k, metric=metric,
                          implementation=implementation, block_sizes=block_sizes,
                          scale=scale)


def _search(queries, keys, k, *, metric, implementation, block_sizes, query_mesh=None,
            magnitude=None):
  if magnitude is not None:
    # A dynamic argument (no recompile per value), in the widest float JAX holds: with
    # 64-bit mode on, float64 data may lie beyond float32's range.
    magnitude = np.asarray(magnitude, jax.dtypes.canonicalize_dtype(np.float64))
  if sharded.row_axes(keys) is not None:
    # Keys split over devices by rows: local searches + one merge, same neighbours.
    return sharded.knn_sharded(queries, keys, k, metric=metric,
                               implementation=implementation, block_sizes=block_sizes,
                               magnitude=magnitude)
  if query_mesh is not None:
    # Several CPU devices: each searches a share of the queries at once (same bits).
    return sharded.knn_query_parallel(queries, keys, k, metric=metric,
                                      implementation=implementation,
                                      block_sizes=block_sizes, mesh=query_mesh,
                                      magnitude=magnitude)
  return _knn_padded(queries, keys, magnitude, k=k, metric=metric,
                     implementation=implementation, block_sizes=block_sizes)


def target_exponent(dim: int) -> int:
  """t such that data with max |value| below 2^t keep every intermediate of the search
  within float32: the largest are ~8 D (2 max)^2 (ranking scores on centred data,
  squared distances, the certificate's bounds), kept under 2^123 (a 16x margin)."""
  return (123 - 5 - math.ceil(math.log2(dim))) // 2


def search_scale(magnitude, dim: int, dtype=jnp.float32):
  """The power of two s that puts max |value| in [2^(t-1), 2^t), t = `target_exponent`.

  The search runs on (s q, s x): s moves exponents only, so every rounding is the one
  of the unscaled search, and the result has the same bits, wherever that one neither
  underflows nor overflows. Where it would (max |value| beyond ~1e19 overflows
  ||q - x||^2; below ~1e-19 the squares underflow to 0, and data spanning many orders
  of magnitude lose their small differences), the scaled search does not: at the top
  of the safe range, squares of values down to max * 2^-120 or so stay normal. `s`
  stays a normal float of `dtype` (2^+-126 in float32; 2^+-1022 in float64, whose
  data, with 64-bit mode on, may lie beyond float32's range). Works on a traced
  magnitude (under jit).
  """
  magnitude = jnp.asarray(magnitude)
  _, exponent = jnp.frexp(magnitude.astype(jnp.promote_types(magnitude.dtype, jnp.float32)))
  bound = -int(jnp.finfo(dtype).minexp)
  shift = jnp.clip(target_exponent(dim) - exponent, -bound, bound)
  return jnp.ldexp(jnp.ones((), dtype), shift.astype(jnp.int32))


def scale_and_mean(queries, keys, magnitude, metric: str):
  """The search's scale (`search_scale`) and the mean of the scaled keys (`key_mean`).

  `magnitude` is max |value| over queries and keys; None (the caller could not
  measure it on the host: under an outer jit) measures it here, in the graph.
  """
  if magnitude is None:
    magnitude = jnp.maximum(jnp.max(jnp.abs(queries), initial=0.0),
                            jnp.max(jnp.abs(keys), initial=0.0))
  scale = search_scale(magnitude, keys.shape[1], keys.dtype)
  return scale, key_mean(keys, metric, scale)


class KernelMismatch(RuntimeError):
  """The Pallas kernel's neighbours differ from the XLA path's on the check problem."""


def _check_kernel(candidates: int, dim: int, metric: str, block_sizes: BlockSizes | None
                  ) -> None:
  """Raises KernelMismatch unless the Pallas kernel returns the XLA path's neighbours
  on a check problem with this kernel configuration (its number of candidates, D,
  metric, tiles): `_CHECK_QUERIES` queries and `_check_keys` keys of small integers
  (-3 to 3), ragged against every default tile.

  Every distance and inner product of such data is an integer that float32 holds
  exactly, and many of them tie: both searches are exact (the certificate sends
  rows it cannot prove to the direct search), so their indices and distances must be
  equal, ties lower index first, whatever each rounds on the way. A kernel that
  compiles on a chip but computes something else there (a lowering bug, a chip
  generation it was never run on) is caught before it answers a caller. Runs eagerly
  in a thread of its own (JAX's tracing state is per thread), so also while an outer
  `jax.jit` traces the caller.
  """
  n_keys = _check_keys(candidates, block_sizes)
  rng = np.random.default_rng(0)
  queries = rng.integers(-3, 4, (_CHECK_QUERIES, dim)).astype(np.float32)
  keys = rng.integers(-3, 4, (n_keys, dim)).astype(np.float32)
  # The k whose candidates are the caller's (fewer, for a caller with so few keys that
  # every key is a candidate).
  k = max([1] + [j for j in range(1, candidates + 1) if n_candidates(j, n_keys) <= candidates])
  outcome = {}
  mesh = _callers_mesh()

  def search_both():
    try:
      with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        outcome["results"] = [
            jax.device_get(knn(queries, keys, k, metric=metric,
                               implementation=implementation,
                               block_sizes=block_sizes if implementation == "pallas" else None))
            for implementation in ("pallas", "xla")]
    except Exception as err:  # noqa: BLE001 - re-raised in the caller's thread
      outcome["error"] = err

  thread = threading.Thread(target=search_both, name="rm.knn kernel check")
  thread.start()
  thread.join()
  if "error" in outcome:
    raise outcome["error"]
  got, want = outcome["results"]
  rows = np.flatnonzero(np.any((got.indices != want.indices)
                               | (got.distances != want.distances), axis=1))
  if rows.size:
    raise KernelMismatch(
        f"{rows.size} of {_CHECK_QUERIES} rows of a check problem (small-integer data, "
        f"{n_keys} keys, d={dim}, k={k}, {metric}) differ from the XLA path's, "
        f"first row {rows[0]}: {got.indices[rows[0]].tolist()} against "
        f"{want.indices[rows[0]].tolist()}")


def _callers_mesh() -> Mesh | None:
  """The mesh of the caller's `jax.set_mesh`, for the check's thread (the setting is
  per thread, and a kernel may fail under an Explicit mesh alone), or None.

  Under jit only its abstract form is public: the check then runs under a mesh of the
  same axes and types over the first devices of its platform.
  """
  abstract = jax.sharding.get_abstract_mesh()
  if abstract.empty:
    return None
  try:
    return jax.sharding.get_mesh()
  except ValueError:  # under jit
    platform = getattr(abstract.abstract_device, "platform", None)
    devices = jax.devices(platform)[:abstract.size]
    return Mesh(np.asarray(devices).reshape(abstract.axis_sizes), abstract.axis_names,
                axis_types=abstract.axis_types)


def _agreed_check(candidates: int, dim: int, metric: str, block_sizes: BlockSizes | None, *,
                  across_processes: bool) -> None:
  """`_check_kernel`, with one verdict for every process when the search spans them:
  each runs the check on its own chips, and a process that passed while another
  failed would run another program than it, and wait in its collectives. The worst
  outcome wins everywhere: running out of device memory is raised on every process,
  any other failure sends every process to the XLA path."""
  try:
    _check_kernel(candidates, dim, metric, block_sizes)
    status, error = 0, None
  except Exception as err:  # noqa: BLE001 - re-raised below, on every process
    status, error = (2 if _is_device_out_of_memory(err) else 1), err
  if across_processes:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    statuses = np.asarray(multihost_utils.process_allgather(np.int32(status)))
    worst = int(statuses.max())
    if worst > status:
      where = np.flatnonzero(statuses == worst).tolist()
      reason = " (RESOURCE_EXHAUSTED: out of memory)" if worst == 2 else ""
      error = RuntimeError(f"processes {where} failed the Pallas kernel's check{reason}")
    status = worst
  if status:
    raise error


def _default_kernel_or_xla(search: Callable, queries, keys, *, k: int, metric: str,
                           block_sizes: BlockSizes | None):
  """`search` with the Pallas kernel, or with the XLA path if the kernel fails here.

  The kernel is the default on GPU and TPU but has not been compiled on every chip
  generation with every jax. So, when it was picked by default, each configuration
  (candidates, D, metric, tiles) is first checked on a small exact problem
  (`_agreed_check`, once per process), and a failure to compile, to run, or to agree
  with the XLA path there must not stop the caller's search: it is reported once as a
  warning, and the
  platform's default becomes the XLA path for the rest of the process. Under an outer
  `jax.jit` the check still runs (on its own data); a compile error of the caller's
  own program only comes when the caller compiles, out of reach here, and is raised
  as it is. So is the device running out of memory: that depends on what else the
  process holds, not on the kernel, and switching to the slower path for the rest of
  the process would outlast it; the remedy (smaller batches, freed buffers) is the
  caller's.
  """
  candidates = n_candidates(k, keys.shape[0])
  # The caller's mesh too: the check runs under it (`_callers_mesh`), and a kernel may
  # pass without a mesh and fail under one.
  config = (_platform(), metric, candidates, queries.shape[1], block_sizes,
            jax.sharding.get_abstract_mesh())
  traced = v.is_traced(queries) or v.is_traced(keys)
  try:
    if config not in _PALLAS_CHECKED:
      _agreed_check(candidates, queries.shape[1], metric, block_sizes,
                    across_processes=sharded.spans_processes(keys))
      _PALLAS_CHECKED.add(config)
    if not traced:
      out = search(implementation="pallas")
      jax.block_until_ready(out)  # a failure while running surfaces here, not later
      return out
  except Exception as err:  # noqa: BLE001 - whatever the compiler or runtime raised
    if _is_device_out_of_memory(err):
      raise
    platform = _platform()
    _PALLAS_FAILED.add(platform)
    message = str(err).strip().splitlines()
    warnings.warn(
        f"rm.knn: the Pallas kernel, the default on {platform}, failed "
        f"({type(err).__name__}{': ' + message[0][:200] if message else ''}); using the "
        f"XLA path on {platform} from now on. Pass implementation='pallas' to see the "
        f"whole error, or implementation='xla' to skip the kernel.", stacklevel=3)
    return search(implementation="xla")
  return search(implementation="pallas")  # traced: compiled with the caller's program


def _is_device_out_of_memory(err: Exception) -> bool:
  """Whether `err` is XLA failing to allocate device memory ("RESOURCE_EXHAUSTED: Out of
  memory ..."), as opposed to a kernel asking for more on-chip memory than the chip has
  ("RESOURCE_EXHAUSTED: Shared memory size limit exceeded"), which the XLA path avoids."""
  message = str(err)
  return "RESOURCE_EXHAUSTED" in message and "out of memory" in message.lower()


def _check_pallas_k(k: int, n_keys: int, metric: str) -> None:
  """The kernel's running top-k holds k plus the certificate's margin: say so in k."""
  limit = _pallas_knn.max_k(_pallas_knn.backend_for(_platform()), metric)
  need = n_candidates(k, n_keys)
  if need > limit:
    largest = max(j for j in range(1, limit + 1) if n_candidates(j, n_keys) <= limit)
    raise ValueError(
        f"implementation='pallas' keeps at most {limit} candidates per query here, and "
        f"k={k} needs {need} (k plus a certificate margin of {need - k}): use k <= "
        f"{largest}, or implementation='xla' or None")


def _redo_uncertified(queries, keys, k, metric, distances, indices, certified, magnitude,
                      n_valid: int):
  """Rows (of the first `n_valid`) whose certificate failed, recomputed by the exact
  direct search."""
  if v.is_traced(certified):
    # Under an outer jit the failing rows are unknown on the host: recompute the whole
    # batch, but only when some row needs it.
    def redo():
      d, i, _ = _search(queries, keys, k, metric=metric, implementation="direct",
                        block_sizes=None, magnitude=magnitude)
      keep = certified[:, None]
      return jnp.where(keep, distances, d), jnp.where(keep, indices, i)
    return jax.lax.cond(jnp.all(certified[:n_valid]), lambda: (distances, indices), redo)
  rows = np.flatnonzero(~np.asarray(certified)[:n_valid])
  if rows.size == 0:
    return distances, indices
  # Padded to a bucket by repeating the last row: the repeats search the same query
  # and write the same values, and every shape below is a bucket's (no compile per
  # number of failing rows).
  rows = np.pad(rows, (0, query_bucket(rows.size) - rows.size), mode="edge")
  d, i, _ = _search(jnp.asarray(queries)[rows], keys, k, metric=metric,
                    implementation="direct", block_sizes=None, magnitude=magnitude)
  return distances.at[rows].set(d), indices.at[rows].set(i)


def _poison_non_finite(queries, keys, distances, indices):
  """Under jit, where values cannot be checked: NaN distances and index -1 for a query
  row holding a NaN or inf, and for every row when a key does (an inf would otherwise
  pass as a finite, wrong answer).

  The barrier keeps XLA from fusing the selects into what the caller computes next.
  Fused into `rm.predict`'s weights under jit, XLA:CPU of jax 0.12.1 computed them
  from the unpoisoned distances in 3-5 runs of 10 (an inf query got finite weights;
  the HLO and the machine code were the same in passing and failing runs); with the
  barrier, 0 of 30. jax 0.10.2 never did.
  """
  ok = jnp.all(jnp.isfinite(queries), axis=1) & jnp.all(jnp.isfinite(keys))
  return jax.lax.optimization_barrier((jnp.where(ok[:, None], distances, jnp.nan),
                                       jnp.where(ok[:, None], indices, -1)))


def knn(queries: Float[Array, "Q D"], keys: Float[Array, "N D"], k: int, *,
        metric: str = "l2", implementation: str | None = None,
        block_sizes: BlockSizes | None = None) -> KnnResult:
  r"""Exact k-nearest-neighbour search.

  For every query q the k keys x_j with the smallest

    l2: d_j = ||q - x_j||_2          ip: d_j = -<q, x_j>

  in ascending order, equal distances with the lower index first. The search ranks by
  ||x||^2 - 2 <q, x> on data centred by the key mean, with f32 matmuls at
  `Precision.HIGHEST`, over a few more candidates than k, then recomputes their
  distances directly as ||q - x||. A per-query certificate (`search_certified`) proves
  that no key outside the candidates can be nearer; queries it cannot prove (data
  dense next to their norms) are recomputed by a direct-difference search. All of it
  runs on the data times a power of two (`search_scale`) that keeps squared
  differences from underflowing or overflowing float32 at any data scale. So the
  result equals a float64 brute-force search up to float32 rounding of the distances.
  The (Q, N) matrix is never formed, nor a copy of the keys (every tile is centred as
  it is loaded): working memory is O(block_q * block_n + Q * k) plus N squared norms
  and, for the pruned XLA search, the chunk minima of a segment of keys, a few times
  `xla.SEGMENT_BYTES` (64 MiB) at most (kernels/xla.py).

  On CPU, JAX runs a device's `top_k` selections on one core. In a process started
  with several CPU devices (`jax.config.update("jax_num_cpu_devices", os.cpu_count())`
  before the first JAX array), a large batch of queries (>= 1024 per device) held on
  no particular device is split over them, keys copied to each (at most 1 GiB of
  copies; see `sharded.query_mesh`), with the same bits as one device; the result
  comes back to the queries' device. Commit the inputs to one device
  (`jax.device_put(x, device)`) to keep the search there. Keys committed to a device
  (or a mesh) draw queries committed elsewhere to them: the search runs where the
  keys are, and so does its result.

  Args:
    queries: (Q, D) floating array. float64 input is searched in float32 unless
      `jax_enable_x64` is on (as every JAX op would); the neighbours are then those of
      the float32-rounded data.
    keys: (N, D) floating array, N >= 1.
    k: number of neighbours, 1 <= k <= N (an int, or a concrete 0-d integer array).
    metric: "l2" (Euclidean) or "ip" (negated inner product).
    implementation: None picks the best for the platform (the Pallas kernel on GPU/TPU
      where it supports the problem, the blocked XLA search otherwise, the reference
      for tiny inputs; the kernel picked this way is first checked against the XLA
      path on a small exact problem, once per configuration, and if it fails to
      compile or run there or here, other than by the device running out of memory,
      or disagrees, a warning says so and the XLA path is used from then on); or one
      of "reference", "xla", "pallas", "direct" (O(QND) elementwise, exact without a
      certificate; the fallback, never the default).
      "reference" forms the whole (Q, N) score matrix: for small inputs and tests only.
    block_sizes: tiling of the blocked search; `BlockSizes.get_default(k, D)` if None.

  Returns:
    KnnResult(distances (Q, k) float32 (float64 when 64-bit mode is on and an input
    is float64), indices (Q, k) int32). In a float32 search, distances float32
    cannot hold come back as 0 (below ~1e-38) or inf (above ~3e38); the indices keep
    the order of the scaled search's distances, so such zeros may list a higher index
    first. Input values below float32's smallest normal are read as 0 (XLA flushes
    subnormals), so keys that differ only there tie.

  Raises:
    TypeError: non-floating queries or keys, non-int k.
    ValueError: bad shapes, non-finite values, k outside [1, N], unknown metric or
      implementation. Under an outer `jax.jit` the values cannot be checked: a query
      row holding a NaN or inf gets NaN distances and index -1, and so does every row
      when a key holds one.

  Example:
    >>> res = knn(jnp.zeros((2, 3)), jnp.eye(3), k=2)
    >>> res.indices
    Array([[0, 1], [0, 1]], dtype=int32)

  References:
    Yang et al., "ResMem: Learn what you can and memorize the rest", NeurIPS 2023.
  """
  if sharded.spans_processes(keys):  # before any check a process could fail alone
    sharded.check_same_on_every_process("rm.knn's queries, k, metric or implementation",
                                        queries, k, metric, implementation, block_sizes)
  return knn_agreed(queries, keys, k, metric=metric, implementation=implementation,
                    block_sizes=block_sizes)


def knn_agreed(queries, keys, k: int, *, metric: str = "l2",
               implementation: str | None = None,
               block_sizes: BlockSizes | None = None, keys_name: str = "keys") -> KnnResult:
  """`knn` for a caller that has compared its inputs across processes already
  (`rm.predict` and `rm.sweep`, once per call rather than once per chunk); errors
  about the keys name them `keys_name` (the caller's name for them)."""
  queries = v.as_array("queries", queries)
  keys = v.as_array(keys_name, keys)
  v.check_floating("queries", queries)
  v.check_floating(keys_name, keys)
  v.check_ndim("queries", queries, (2,), "a (Q, D) matrix")
  v.check_ndim(keys_name, keys, (2,), "an (N, D) matrix")
  n_q, dim = queries.shape
  n_keys = keys.shape[0]
  if n_keys == 0:
    raise ValueError(f"keys must hold at least one row, got keys.shape={tuple(keys.shape)}")
  if keys.shape[1] != dim:
    raise ValueError(f"queries and keys must share their last dimension, got "
                     f"queries.shape={tuple(queries.shape)}, keys.shape={tuple(keys.shape)}")
  if dim == 0:
    raise ValueError(f"queries and keys need at least one column, got "
                     f"queries.shape={tuple(queries.shape)}, keys.shape={tuple(keys.shape)}")
  k = v.check_int("k", k, low=1, high=n_keys)
  v.check_choice("metric", metric, METRICS)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"block_sizes must be a BlockSizes, got {block_sizes!r}")
  chosen = implementation is None
  if chosen:
    implementation = default_implementation(n_q, n_keys, k, dim,
                                            search_dtype(queries, keys), metric)
  v.check_choice("implementation", implementation, KNOWN_IMPLEMENTATIONS)
  if implementation not in IMPLEMENTATIONS:
    available = ", ".join(repr(name) for name in IMPLEMENTATIONS)
    raise ValueError(f"implementation={implementation!r} is not available in this "
                     f"installation; use one of {available} or None")
  if implementation == "pallas":
    _check_pallas_k(k, n_keys, metric)
  if n_q == 0:
    v.finite_magnitude(keys_name, keys)
    dtype = jax.dtypes.canonicalize_dtype(search_dtype(queries, keys))
    return KnnResult(jnp.zeros((0, k), dtype), jnp.zeros((0, k), jnp.int32))
  queries = sharded.searchable(queries)
  keys = sharded.searchable(keys, rows_split_ok=True)
  queries = sharded.to_keys(queries, keys)
  padded = query_bucket(n_q)
  mesh = sharded.query_mesh(queries, keys)  # None for row-sharded (committed) keys
  if mesh is not None:  # an equal share of the queries for every CPU device
    padded = -(-padded // mesh.size) * mesh.size
  # Padded first, so that the measurement below (zero rows change no max |value|), the
  # search and the re-search of failing rows all see a bucket's shape: a new number of
  # queries inside a bucket compiles only the pad (for device arrays) and the final cut.
  queries = pad_rows(queries, padded)
  magnitudes = [v.finite_magnitude("queries", queries), v.finite_magnitude(keys_name, keys)]
  # Under an outer jit the magnitude is unknown here: the search measures it in the graph.
  magnitude = None if None in magnitudes else max(magnitudes)
  search = functools.partial(_search, queries, keys, k, metric=metric,
                             block_sizes=block_sizes, query_mesh=mesh, magnitude=magnitude)
  if chosen and implementation == "pallas":
    distances, indices, certified = _default_kernel_or_xla(
        search, queries, keys, k=k, metric=metric, block_sizes=block_sizes)
  else:
    distances, indices, certified = search(implementation=implementation)
  distances, indices = _redo_uncertified(queries, keys, k, metric, distances, indices,
                                         certified, magnitude, n_q)
  if magnitude is None:
    distances, indices = _poison_non_finite(queries, keys, distances, indices)
  if padded != n_q:
    distances, indices = _first_rows((distances, indices), n_q)
  return KnnResult(distances, indices)

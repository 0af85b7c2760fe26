"""ResMem prediction: the base prediction plus a soft kNN average of memorized residuals.

  p(x) = base(x) + sum_{j in N_k(x)} w_j r_j,   w = softmax(-d / sigma) over the k
  exact nearest neighbours N_k(x) of phi(x) among the memory's keys,

with base(x) = softmax(z(x) / T) for classification and f(x) for regression.

Reference: Yang et al., "ResMem: Learn what you can and memorize the rest",
NeurIPS 2023 (arXiv 2302.01576), section 3.
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from resmem_jax import _validation as v
from resmem_jax.kernels import sharded
from resmem_jax.kernels.api import knn_agreed, pad_rows, query_bucket
from resmem_jax.kernels.base import KnnResult
from resmem_jax.memory import (Memory, base_prediction, check_memory, check_queries,
                               check_temperature, safe_scale)

HIGHEST = jax.lax.Precision.HIGHEST
# Queries per search call when streaming a large query set; each chunk is padded to a
# size bucket (`query_bucket`) so only a handful of shapes ever compile.
DEFAULT_QUERY_CHUNK = 32768
# Queries per step of the residual gather, at most; fewer (a power of two) where their
# (batch, k, C) rows would exceed AGGREGATE_BUDGET elements (32 MiB of float32).
AGGREGATE_BATCH = 512
AGGREGATE_BUDGET = 1 << 23


def aggregate_batch(n_queries: int, k: int, n_outputs: int) -> int:
  """Queries per step of the residual gather: (batch, k, C) stays within the budget."""
  fit = max(1, AGGREGATE_BUDGET // (k * n_outputs))
  return max(1, min(AGGREGATE_BATCH, 1 << (fit.bit_length() - 1), n_queries))


def neighbour_weights(distances: Float[Array, "Q k"], *, sigma) -> Float[Array, "Q k"]:
  r"""Soft kNN weights w_j = exp(-d_j / sigma) / sum_l exp(-d_l / sigma).

  The row minimum is subtracted first (softmax is shift-invariant), so the largest
  exponent is exactly 0: no overflow or underflow to an all-zero row for any distances
  (inf included) and any sigma > 0 (`bandwidth` clamps sigma to [2^-126, 2^126], where
  it and its reciprocal are normal float32s). Weights are non-negative and sum to 1.
  Distances below float32's smallest normal (~1.2e-38) are read as 0 (XLA flushes
  subnormals), so such neighbours tie.

  Args:
    distances: (Q, k) neighbour distances (any order).
    sigma: bandwidth > 0: a float or a 0-d array (checked), or a traced scalar (under
      jit, where it cannot be checked: a sigma <= 0 or not finite gives NaN weights).

  Returns:
    (Q, k) float32 weights.

  Raises:
    ValueError: a concrete sigma <= 0 or not finite.

  Example:
    >>> rm.neighbour_weights(jnp.array([[0.0, 1e6]]), sigma=1e-3)
    Array([[1., 0.]], dtype=float32)
  """
  sigma = check_sigma("sigma", sigma)
  e = jnp.exp(-shift_to_nearest(distances) / bandwidth(sigma))
  weights = e / jnp.sum(e, axis=-1, keepdims=True)
  if v.is_traced(sigma):  # unchecked: a bad sigma must not pass as the sigma -> 0 limit
    weights = jnp.where(jnp.isfinite(sigma) & (sigma > 0), weights, jnp.nan)
  return weights


def shift_to_nearest(distances: Float[Array, "... k"]) -> Float[Array, "... k"]:
  """d - min(d) along the last axis, in float32, with 0 where d equals the minimum.

  The explicit 0 keeps rows whose distances all overflowed float32 (inf - inf) from
  turning into NaN: tied nearest neighbours share the weight, infinite or not.
  """
  distances = distances.astype(jnp.float32)
  nearest = jnp.min(distances, axis=-1, keepdims=True)
  return jnp.where(distances == nearest, 0.0, distances - nearest)


def bandwidth(sigma):
  """sigma as float32, clamped to [2^-126, 2^126] (~1.2e-38 to ~8.5e37).

  A smaller sigma > 0 would be flushed to 0 and give the nearest neighbour 0 / 0; at
  the smallest normal the weights are already the sigma -> 0 limit (all weight on the
  nearest, shared between exact ties) for any distances float32 tells apart. XLA may
  compute d / sigma as d * (1 / sigma), and beyond 2^126 that reciprocal is flushed to
  0 (uniform weights, and inf * 0 = NaN for an overflowed distance); at 2^126 the
  weights differ from sigma's only for distances above ~1e31.
  """
  return safe_scale(sigma)


def aggregate_residuals(residuals: Float[Array, "N C"], indices: Int[Array, "Q k"],
                        weights: Float[Array, "Q k"]) -> Float[Array, "Q C"]:
  r"""sum_j w_j r_{indices_j} for every query, without forming all (Q, k, C) rows at once.

  Args:
    residuals: (N, C) memorized residuals.
    indices: (Q, k) int rows of `residuals`.
    weights: (Q, k) neighbour weights.

  Returns:
    (Q, C) float32.
  """

  def one(args):
    idx, w = args
    return jnp.dot(w, residuals[idx].astype(jnp.float32), precision=HIGHEST)

  n_q = indices.shape[0]
  if n_q == 0:
    return jnp.zeros((0, residuals.shape[1]), jnp.float32)
  return jax.lax.map(one, (indices, weights.astype(jnp.float32)),
                     batch_size=aggregate_batch(n_q, indices.shape[1], residuals.shape[1]))


def drop_excluded(distances: Float[Array, "Q k1"], indices: Int[Array, "Q k1"],
                  exclude: Int[Array, "Q"], *, n: int | None = None) -> KnnResult:
  """From k + 1 neighbours keep k: drop `exclude[q]` where present, else the last.

  The k + 1 neighbours of a search are ordered by (distance, index); removing one
  memory point from the memory removes it from that order and shifts the rest up, so
  the result equals a k-search on the memory without that point (indices still refer
  to the full memory).

  `n` (static), the memory's size: a row whose `exclude` lies outside [0, n) excludes
  nothing, so its distances are set to NaN (under jit, where `predict` cannot check a
  traced `exclude`, the row's prediction is then NaN rather than a plausible one).
  """
  k = indices.shape[1] - 1
  hit = indices == exclude[:, None]
  drop = jnp.where(jnp.any(hit, axis=1), jnp.argmax(hit, axis=1), k)
  cols = jnp.arange(k)[None, :]
  src = cols + (cols >= drop[:, None]).astype(cols.dtype)
  distances = jnp.take_along_axis(distances, src, axis=1)
  if n is not None:
    valid = (exclude >= 0) & (exclude < n)
    distances = jnp.where(valid[:, None], distances, jnp.nan)
  return KnnResult(distances, jnp.take_along_axis(indices, src, axis=1))


def check_k_exclude(mem: Memory, n_queries: int, k, exclude, *, k_name: str = "k"):
  """Host checks of k (1 <= k <= N, or N - 1 with `exclude`) and of `exclude`."""
  n = mem.size
  if exclude is None:
    return v.check_int(k_name, k, low=1, high=n), None
  k = v.check_int(k_name, k, low=1)
  if k > n - 1:
    raise ValueError(f"{k_name} must satisfy 1 <= {k_name} <= N - 1 = {n - 1} when exclude "
                     f"is given (one memory point per query is left out), got {k_name}={k}")
  exclude = v.as_array("exclude", exclude)
  v.check_integer("exclude", exclude)
  if tuple(exclude.shape) != (n_queries,):
    raise ValueError(f"exclude must be a (Q,) = ({n_queries},) vector of memory indices, "
                     f"got exclude.shape={tuple(exclude.shape)}")
  if not v.is_traced(exclude) and exclude.size:
    host = np.asarray(exclude)
    bad = np.flatnonzero((host < 0) | (host >= n))
    if bad.size:
      raise ValueError(f"exclude must hold memory indices in [0, N={n}), got "
                       f"exclude[{bad[0]}]={host[bad[0]]}")
  return k, exclude


def check_sigma(name: str, sigma):
  """sigma > 0: a real scalar or 0-d array, returned as a float; a traced scalar
  (`predict` under jit, or differentiated in sigma) passes unchecked."""
  if isinstance(sigma, (np.ndarray, jax.Array)) and sigma.ndim != 0:
    raise TypeError(f"{name} must be a float or a 0-d array, got "
                    f"{name}.shape={tuple(sigma.shape)}")
  if v.is_traced(sigma):
    return sigma
  return check_temperature(name, v.concrete_scalar(sigma))


def search_chunks(mem: Memory, embeddings, k: int, exclude, *, implementation,
                  query_chunk: int, extra: tuple = ()) -> Iterator[tuple]:
  """Exact neighbours of the queries, chunk by chunk, with `exclude` applied.

  Yields (n_valid, KnnResult, padded extras) per chunk; every array has the chunk's
  bucketed row count so that what follows compiles once per bucket, and lies where
  the search's result does, rows split alike (JAX refuses one computation on arrays
  committed to different devices or meshes). Inputs must be checked already.
  """
  n_q = embeddings.shape[0]
  search_k = k + (exclude is not None)

  def chunk_of(x, start, stop, rows, where):
    x = pad_rows(x[start:stop], rows)
    return x if where is None or v.is_traced(x) else sharded.put(x, where)

  for start in range(0, n_q, query_chunk):
    stop = min(start + query_chunk, n_q)
    rows = query_bucket(stop - start)
    queries = pad_rows(embeddings[start:stop], rows)
    res = knn_agreed(queries, mem.keys, search_k, implementation=implementation,
                     keys_name="mem.keys")
    # Committed (placed by the caller): per-query inputs join it; else JAX places them.
    where = sharded.rows_like(res.indices) if sharded.committed(res.indices) else None
    if exclude is not None:
      res = _drop_excluded_jit(
          res.distances, res.indices,
          jnp.asarray(chunk_of(exclude, start, stop, rows, where), jnp.int32), n=mem.size)
    yield stop - start, res, tuple(chunk_of(x, start, stop, rows, where) for x in extra)


_drop_excluded_jit = jax.jit(drop_excluded, static_argnames="n")


@functools.partial(jax.jit, static_argnames=("task", "temperature", "placement"))
def _combine(residuals, distances, indices, base_outputs, sigma, *, task, temperature,
             placement):
  weights = neighbour_weights(distances, sigma=sigma)
  base = base_prediction(base_outputs, task=task, temperature=temperature)
  if placement is None:
    return base + aggregate_residuals(residuals, indices, weights)
  # Row-sharded memory: each device sums the residuals it holds, one psum adds them.
  return base + sharded.weighted_row_sum(
      residuals, indices, weights, placement=placement,
      batch_size=aggregate_batch(indices.shape[0], indices.shape[1], residuals.shape[1]))


def predict(mem: Memory, embeddings: Float[Array, "Q D"], base_outputs: Float[Array, "Q ..."],
            *, k: int, sigma: float, exclude: Int[Array, "Q"] | None = None,
            task: str | None = None, fingerprint: str | None = None,
            implementation: str | None = None,
            query_chunk: int = DEFAULT_QUERY_CHUNK) -> Float[Array, "Q ..."]:
  r"""ResMem prediction: base prediction plus the soft kNN average of residuals.

    classification:  p(x) = softmax(z(x) / T) + sum_{j in N_k(x)} w_j r_j   (T = mem's)
    regression:      f(x) + sum_{j in N_k(x)} w_j r_j
    w_j = exp(-d_j / sigma) / sum_{l in N_k(x)} exp(-d_l / sigma),  d_j = ||phi(x) - phi(x_j)||

  over the k exact nearest keys (ties: lower memory index first). Queries are padded
  to size buckets (a new batch size inside a bucket reuses the compiled search and
  combination; only the small input checks and slices compile for a new size) and
  streamed through the search `query_chunk` at a time. Changing `sigma` never
  recompiles. Differentiable in sigma, the embeddings, base outputs and the memory's
  keys and residuals, the neighbour sets held fixed (a query lying on a key takes the
  subgradient 0 of its distance there).

  Args:
    mem: a `Memory` from `build_memory` or `load_memory`.
    embeddings: (Q, D) floating query embeddings, D = mem.meta.dim.
    base_outputs: (Q, C) base logits (classification), or base outputs shaped
      (Q,) + mem.meta.output_shape (regression).
    k: neighbours, 1 <= k <= N (k <= N - 1 with `exclude`).
    sigma: softmax bandwidth > 0: a float, a 0-d array, or a traced scalar under jit
      (predictions are differentiable in it; it cannot be checked there, so a traced
      sigma <= 0 or not finite gives NaN predictions).
    exclude: optional (Q,) int memory indices; query q never uses memory point
      exclude[q] (leave-one-out on the training set). Under jit a traced value
      outside [0, N) cannot be checked either: its row's prediction is NaN.
    task: optional; when given, must equal the memory's task.
    fingerprint: optional base-model fingerprint; when given, must equal the memory's.
    implementation: kNN implementation (see `rm.knn`); None picks the best.
    query_chunk: queries per search call.

  Returns:
    (Q, C) float32 scores (the class is their argmax), or regression predictions
    shaped like `base_outputs`.

  Raises:
    TypeError: not a Memory, wrong dtypes, non-int k.
    ValueError: dimension, class-count or task mismatch with the memory, non-finite
      inputs, k out of range, sigma <= 0, exclude out of range or misshaped,
      fingerprint mismatch.

  Example:
    >>> mem = rm.build_memory(train_emb, train_y, train_logits, task="classification")
    >>> scores = rm.predict(mem, test_emb, test_logits, k=10, sigma=0.5)
    >>> loo = rm.predict(mem, train_emb, train_logits, k=10, sigma=0.5,
    ...                  exclude=jnp.arange(len(train_emb)))

  References:
    Yang et al., "ResMem: Learn what you can and memorize the rest", NeurIPS 2023.
  """
  if isinstance(mem, Memory) and sharded.spans_processes(mem.keys):
    sharded.check_same_on_every_process(
        "rm.predict's embeddings, base_outputs, k, sigma or exclude", embeddings,
        base_outputs, k, sigma, exclude, task, fingerprint, implementation, query_chunk)
  mem = check_memory(mem, task=task, fingerprint=fingerprint)
  embeddings, base_outputs = check_queries(mem, embeddings, base_outputs)
  k, exclude = check_k_exclude(mem, embeddings.shape[0], k, exclude)
  sigma = check_sigma("sigma", sigma)
  query_chunk = v.check_int("query_chunk", query_chunk, low=1)
  meta = mem.meta
  n_q = embeddings.shape[0]
  if n_q == 0:
    return jnp.zeros((0,) + meta.output_shape, jnp.float32)
  outputs = base_outputs.reshape(n_q, meta.n_outputs)
  # A host sigma is clamped before the float32 cast (1e300 would become inf, which the
  # traced check in `neighbour_weights` reads as a bad sigma); a traced one is checked there.
  sigma_arr = jnp.asarray(sigma, jnp.float32) if v.is_traced(sigma) else bandwidth(sigma)
  placement = sharded.placement(mem.residuals)
  pieces = []
  for n_valid, res, (chunk_outputs,) in search_chunks(
      mem, embeddings, k, exclude, implementation=implementation, query_chunk=query_chunk,
      extra=(outputs,)):
    out = _combine(mem.residuals, res.distances, res.indices, chunk_outputs, sigma_arr,
                   task=meta.task, temperature=meta.temperature, placement=placement)
    pieces.append(out[:n_valid])
  out = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)
  return out.reshape((n_q,) + meta.output_shape)

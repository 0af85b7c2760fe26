"""Tuning ResMem at the price of one search, with its baselines in the same harness.

`sweep` finds the max(ks) nearest neighbours of every held-out point once, then
scores every (k, sigma, T) from them: the k nearest of a point are the first k of its
max(ks) nearest, the weights are a softmax over those k distances, and the residuals
for a new temperature come from the logits stored in the memory, not from a new
search. The same neighbours give the baselines:

  deepnet:  the base model alone,    softmax(z / T)            | f(x)
  knn:      soft kNN on embeddings,  sum_j w_j onehot(y_j)     | sum_j w_j y_j
  knn_lm:   kNN-LM-style mixture,    lam p_kNN + (1 - lam) softmax(z / T)
  resmem:   softmax(z / T) + sum_j w_j r_j(T)                  | f(x) + sum_j w_j r_j

with r_j(T) = onehot(y_j) - softmax(z_j / T) and w = softmax(-d / sigma) over the k
nearest. (Khandelwal et al.'s kNN-LM weighs neighbours by exp(-d^2); here every kNN
method shares ResMem's weights, so the baselines differ from ResMem in what they
average, not in how they weigh.) Since
sum_j w_j r_j(T) = p_kNN - sum_j w_j softmax(z_j / T), the label part is shared by every
T, and a prefix of the neighbours is shared by every k: each (sigma, T) costs one pass
over the (k_max, C) gathered rows of a query, whatever the number of k.

Reference: Yang et al., "ResMem: Learn what you can and memorize the rest",
NeurIPS 2023, section 5 (tuning on a validation split); Khandelwal et al.,
"Generalization through Memorization: Nearest Neighbor Language Models", ICLR 2020.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resmem_jax import _validation as v
from resmem_jax.kernels import sharded
from resmem_jax.memory import (Memory, build_memory, check_labels, check_memory,
                               check_queries, check_temperature, safe_scale,
                               tempered_softmax)
from resmem_jax.predict import (DEFAULT_QUERY_CHUNK, bandwidth, check_k_exclude, check_sigma,
                                search_chunks, shift_to_nearest)

HIGHEST = jax.lax.Precision.HIGHEST
METHODS = ("resmem", "deepnet", "knn", "knn_lm")
DEFAULT_LAMS = (0.1, 0.25, 0.5, 0.75, 0.9)
# ResMem and interpolated scores are not probabilities (they can leave [0, 1]); the
# log-loss reads the true class's score clipped to [LOG_LOSS_EPS, 1].
LOG_LOSS_EPS = 1e-7
# Queries per float32 partial sum of a metric (the partial sums are added in float64).
SUM_BLOCK = 256
# A table row's settings, in the order they break exact ties of the metric.
KNOBS = ("k", "sigma", "temperature", "lam")
# Bound on the floats of the per-batch intermediates of the scoring loop (the gathered
# (batch, k_max, 1 + T, C) rows and the (batch, S, n_k, T, L, C) kNN-LM scores).
GRID_BUDGET = 1 << 22
# The power-of-4 exponent of a zero sum of squared errors (or of a padding row): below
# any float32 error's, so it never sets a block's common exponent.
NO_EXPONENT = -1000


class SweepResult(NamedTuple):
  """Every setting of every method on the held-out data, and the best of each.

  Attributes:
    table: one dict per (method, setting), with keys "method", "k", "sigma",
      "temperature", "lam" (None where a method has no such knob) and the metrics:
      "accuracy" and "log_loss" (classification) or "mse" (regression).
    best: method -> its best row: highest accuracy (ties: lowest log-loss) or lowest
      mse; exact ties of those go to the smaller k, then sigma, temperature, lam.
    metric: "accuracy" (higher is better) or "mse" (lower is better).
    n_queries: number of held-out points scored.
  """

  table: tuple[dict, ...]
  best: dict[str, dict]
  metric: str
  n_queries: int

  def format(self, *, methods: Sequence[str] = METHODS, top: int | None = None) -> str:
    """A plain-text table, best first within each method."""
    cols = ["method", *KNOBS]
    cols += ["accuracy", "log_loss"] if self.metric == "accuracy" else ["mse"]
    lines = ["  ".join(f"{c:>11}" for c in cols)]
    for method in methods:
      rows = sorted((r for r in self.table if r["method"] == method), key=_rank_key)
      for row in rows[:top]:
        lines.append("  ".join(f"{_fmt(row[c]):>11}" for c in cols))
    return "\n".join(lines)


def _fmt(x) -> str:
  if x is None:
    return "-"
  if isinstance(x, float):
    return f"{x:.4g}"
  return str(x)


def _rank_key(row: dict):
  """Best first: highest accuracy, then lowest log-loss (lowest mse); NaN ranks last,
  after inf. Exact ties go to the smaller k, then the smaller sigma, temperature and lam,
  so the choice does not depend on the order the grids were given in."""
  def last_if_nan(x):
    return (True, 0.0) if math.isnan(x) else (False, x)
  knobs = tuple((row.get(name) is not None, row.get(name) or 0.0) for name in KNOBS)
  if "accuracy" in row:
    return (-row["accuracy"], *last_if_nan(row["log_loss"]), *knobs)
  return (*last_if_nan(row["mse"]), *knobs)


def check_grid(name: str, values, check, *, distinct: bool = True) -> tuple:
  """`check(f"{name}[i]", value)` of each value of a non-empty sequence (or 1-d array)
  of settings, as a tuple; with `distinct`, a repeated value raises too."""
  if isinstance(values, (np.ndarray, jax.Array)) and values.ndim == 1:
    values = values.tolist()  # a 1-d array of settings, e.g. np.geomspace(0.1, 10, 5)
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
    raise ValueError(f"{name} must be a non-empty sequence (or 1-d array), got "
                     f"{name}={values!r}")
  out = tuple(check(f"{name}[{i}]", x) for i, x in enumerate(values))
  if distinct and len(set(out)) != len(out):
    raise ValueError(f"{name} must not repeat a value, got {name}={values!r}")
  return out


def _check_lam(name: str, lam) -> float:
  lam = v.concrete_scalar(lam)  # a 0-d array, as the other grids take
  if isinstance(lam, bool) or not isinstance(lam, (int, float, np.number)):
    raise TypeError(f"{name} must be a float, got {name}={lam!r}")
  if not 0.0 <= float(lam) <= 1.0:
    raise ValueError(f"{name} must lie in [0, 1], got {name}={lam!r}")
  return float(lam)


def _prefix_weights(dist, sigmas, ks):
  """(S, n_k, K) weights: softmax(-d / sigma) over the first k of the K sorted neighbours.

  Max-subtracted and clamped like `neighbour_weights`: the nearest neighbour's exponent
  is 0, so every row has a positive normalizer for any distances and sigma > 0.
  """
  e = jnp.exp(-shift_to_nearest(dist)[None, :] / bandwidth(sigmas)[:, None])  # (S, K)
  prefix = (jnp.arange(dist.shape[0])[None, :] < jnp.asarray(ks)[:, None])  # (n_k, K)
  e = jnp.where(prefix[None], e[:, None, :], 0.0)
  return e / jnp.sum(e, axis=-1, keepdims=True)


def _correct_and_log_loss(scores, label):
  """Accuracy and clipped log-loss of (..., C) scores for one true label.

  argmax(scores) == label (first maximum on ties) holds iff no earlier class reaches
  the label's score and no later class exceeds it: a plain compare-and-reduce, much
  cheaper on CPU than a variadic argmax over the large grid of settings.
  """
  p_true = scores[..., label]
  classes = jnp.arange(scores.shape[-1]).reshape((1,) * (scores.ndim - 1) + (-1,))
  # The label's own column is excluded rather than compared with itself: XLA may
  # recompute `scores` inside fusions with different rounding (e.g. an FMA).
  beats = jnp.where(classes < label, scores >= p_true[..., None], scores > p_true[..., None])
  beats = beats & (classes != label)
  # A NaN compares False with everything, so a NaN row would "win"; it counts as wrong.
  correct = jnp.where(jnp.isnan(p_true), 0.0,
                      1.0 - jnp.max(beats, axis=-1).astype(jnp.float32))
  return correct, -jnp.log(jnp.clip(p_true, LOG_LOSS_EPS, 1.0))


def _classification_scores(dist, idx, zq, yq, mem_logits, mem_labels, sigmas, lams, *,
                           ks, temperatures):
  """One query's (correct, log-loss) for every method and setting.

  Shapes: knn (S, n_k), resmem (S, n_k, T), knn_lm (S, n_k, T, L), deepnet (T,).
  """
  n_classes = zq.shape[-1]
  temps = safe_scale(temperatures)
  weights = _prefix_weights(dist, sigmas, ks)  # (S, n_k, K)
  onehot = jax.nn.one_hot(mem_labels[idx], n_classes, dtype=jnp.float32)  # (K, C)
  neigh = tempered_softmax(mem_logits[idx][None], temps[:, None, None])  # (T, K, C)
  rows = jnp.concatenate([onehot[None], neigh]).transpose(1, 0, 2)  # (K, 1 + T, C)
  # One matmul gives every prefix average of the labels and of the neighbours'
  # softmaxes; sum_j w_j r_j(T) = p_knn - sum_j w_j softmax(z_j / T).
  avg = jnp.einsum("snk,ktc->sntc", weights, rows, precision=HIGHEST)
  p_knn, neigh_avg = avg[:, :, 0], avg[:, :, 1:]  # (S, n_k, C), (S, n_k, T, C)
  base = tempered_softmax(zq[None], temps[:, None])  # (T, C)
  resmem = base[None, None] + p_knn[:, :, None] - neigh_avg
  lam = lams.reshape(1, 1, 1, -1, 1)
  knn_lm = lam * p_knn[:, :, None, None] + (1.0 - lam) * base[None, None, :, None]  # (S, n_k, T, L, C)
  return {"knn": _correct_and_log_loss(p_knn, yq),
          "resmem": _correct_and_log_loss(resmem, yq),
          "knn_lm": _correct_and_log_loss(knn_lm, yq),
          "deepnet": _correct_and_log_loss(base, yq)}


def _scaled_square_mean(err):
  """mean(err^2) over the last axis as (m, e), the value m * 4^e: e is the exponent of
  the largest |err| (so m lies in [1/(4 M), 1)), and neither the squares nor their sums
  over- or underflow float32, whatever the errors' magnitude. An all-zero row is
  (0, NO_EXPONENT)."""
  top = jnp.max(jnp.abs(err), axis=-1)
  _, e = jnp.frexp(top)
  e = jnp.where(top > 0, e, NO_EXPONENT)
  return jnp.mean(jnp.square(jnp.ldexp(err, -e[..., None])), axis=-1), e


def _regression_scores(dist, idx, fq, yq, mem_residuals, mem_targets, sigmas, lams, *, ks):
  """One query's squared errors (mean over outputs) for every method and setting, each
  as a mantissa and a power of 4 (`_scaled_square_mean`): an error of 1e-30 next to a
  target of 1e30 elsewhere is still measured.

  ResMem averages the stored residuals, as `predict` does: f(x) + sum_j w_j r_j. (The
  same value as f(x) + sum_j w_j y_j - sum_j w_j f(x_j), but that form rounds both
  averages at the scale of the targets and loses a small residual under a large
  offset.)

  Shapes: knn (S, n_k), resmem (S, n_k, 1), knn_lm (S, n_k, 1, L), deepnet (1,): the
  unit axis stands for the temperature, which regression does not have.
  """
  weights = _prefix_weights(dist, sigmas, ks)
  rows = jnp.stack([mem_targets[idx], mem_residuals[idx]], axis=1)  # (K, 2, M)
  avg = jnp.einsum("snk,ktm->sntm", weights, rows, precision=HIGHEST)
  knn_pred, res_avg = avg[:, :, 0], avg[:, :, 1]  # (S, n_k, M)
  resmem = fq[None, None] + res_avg
  lam = lams.reshape(1, 1, -1, 1)
  knn_lm = lam * knn_pred[:, :, None] + (1.0 - lam) * fq[None, None, None]  # (S, n_k, L, M)

  def sq_err(pred, new_axis=()):
    err = pred - yq.reshape((1,) * (pred.ndim - 1) + (-1,))
    return tuple(jnp.expand_dims(x, new_axis) for x in _scaled_square_mean(err))

  return {"knn": sq_err(knn_pred), "resmem": sq_err(resmem, 2),
          "knn_lm": sq_err(knn_lm, 2), "deepnet": sq_err(fq[None])}


@functools.partial(jax.jit, static_argnames=("task", "ks", "temperatures", "batch",
                                             "placement"))
def _grid_sums(dist, idx, q_outputs, q_targets, valid, mem_values, mem_targets, sigmas,
               lams, *, task, ks, temperatures, batch, placement):
  """Sums over the valid queries of one chunk of every per-query metric, per block of
  queries (regression: each block's sum as (m, e), the value m * 4^e).

  `mem_values` are the memory's logits (classification: the residuals at each T come
  from them) or its residuals (regression).
  """
  if task == "classification":
    fn = functools.partial(_classification_scores, ks=ks, temperatures=temperatures)
  else:
    fn = functools.partial(_regression_scores, ks=ks)
  if placement is None:
    one = lambda a: fn(*a, mem_values, mem_targets, sigmas, lams)  # noqa: E731
  else:
    # Row-sharded memory: a query's k_max neighbour rows come from their owners (one
    # psum per batch of queries, so the budget bounds them too), then it is scored
    # against them as if they were a memory of k_max rows.
    local_idx = jnp.arange(idx.shape[1], dtype=idx.dtype)

    def one(a):
      d, i, o, t = a
      rows = [sharded.gather_rows(m, i, placement=placement) for m in (mem_values, mem_targets)]
      return fn(d, local_idx, o, t, *rows, sigmas, lams)
  per_query = jax.lax.map(one, (dist, idx, q_outputs, q_targets), batch_size=batch)
  # float32 sums over blocks of at most 256 queries; the host adds the blocks in
  # float64 (one float32 sum over a 32768-query chunk drifted by ~1e-4 relative).
  n_rows = valid.shape[0]
  block = math.gcd(n_rows, SUM_BLOCK)

  def blocks(x):
    return x.reshape((n_rows // block, block) + x.shape[1:])

  def mask(x, fill):  # a select, not a product: 0 * inf of a padding row would be NaN
    return jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x, fill)

  def block_sums(x):
    return blocks(mask(x, 0.0)).sum(axis=1)

  def scaled_block_sums(m, e):  # terms brought to the block's largest power of 4
    e = blocks(mask(e, NO_EXPONENT))
    top = jnp.max(e, axis=1)
    shift = jnp.maximum(2 * (e - top[:, None]), -300)  # 2^-300: 0 in float32
    return jnp.ldexp(blocks(mask(m, 0.0)), shift).sum(axis=1), top

  if task == "classification":
    return jax.tree.map(block_sums, per_query)
  return {name: scaled_block_sums(*me) for name, me in per_query.items()}


def sweep(mem_or_parts: Memory | tuple, embeddings, base_outputs, targets, *,
          ks: Sequence[int], sigmas: Sequence[float],
          temperatures: Sequence[float] | None = None,
          lams: Sequence[float] = DEFAULT_LAMS, exclude=None, task: str | None = None,
          implementation: str | None = None,
          query_chunk: int = DEFAULT_QUERY_CHUNK) -> SweepResult:
  r"""Scores every (k, sigma, T) of ResMem and its baselines from one kNN search.

  The held-out points' max(ks) nearest memory points are found once; every setting
  reuses them (the k nearest are a prefix), and the residuals at a temperature T are
  recomputed from the memory's stored logits, r_j(T) = onehot(y_j) - softmax(z_j / T).
  So for classification `mem.residuals` is not read: a memory whose residuals were
  edited or learned afterwards is scored as `build_memory` made it (`predict` uses
  them; regression sweeps use the stored residuals too).

    resmem:  softmax(z / T) + sum_{j<k} w_j r_j(T)        w = softmax(-d_{<k} / sigma)
    deepnet: softmax(z / T)
    knn:     sum_{j<k} w_j onehot(y_j)
    knn_lm:  lam * knn + (1 - lam) * softmax(z / T)

  (regression: f(x) in place of softmax(z / T), y_j in place of onehot(y_j), no T.)
  Metrics: accuracy of the argmax and log-loss -log(clip(p_y, 1e-7, 1)) (the clip
  because ResMem and kNN scores can leave [0, 1]); mean squared error for regression.

  Args:
    mem_or_parts: a `Memory`, or the (embeddings, targets, base_outputs) of the
      training set to build one from (with `task`).
    embeddings: (Q, D) held-out embeddings (a validation split, never the test split).
    base_outputs: (Q, C) held-out logits, or regression outputs.
    targets: (Q,) int labels, or regression targets shaped like `base_outputs`.
    ks: neighbour counts to try, each in [1, N] (N - 1 with `exclude`), no repeats.
    sigmas: bandwidths > 0.
    temperatures: T > 0 to try (classification); None uses the memory's T. Must be
      None for regression.
    lams: kNN-LM interpolation weights in [0, 1].
    exclude: optional (Q,) memory indices each query must not use (leave-one-out
      tuning on the training set itself).
    task: with parts, the task to build ("classification" if None); with a memory,
      checked against it when given.
    implementation: kNN implementation (see `rm.knn`).
    query_chunk: held-out points per search call.

  Returns:
    A `SweepResult`; `result.best["resmem"]` holds the chosen k, sigma, temperature.

  Raises:
    TypeError / ValueError: as `predict` for the inputs, plus empty, repeated or
      out-of-range grid values and labels outside [0, C).

  Example:
    >>> res = rm.sweep(mem, val_emb, val_logits, val_labels, ks=(1, 5, 10, 20, 50),
    ...                sigmas=(0.1, 0.3, 1.0, 3.0), temperatures=(0.5, 1.0, 2.0))
    >>> best = res.best["resmem"]
    >>> scores = rm.predict(rm.build_memory(emb, y, z, temperature=best["temperature"]),
    ...                     test_emb, test_logits, k=best["k"], sigma=best["sigma"])

  References:
    Yang et al., "ResMem: Learn what you can and memorize the rest", NeurIPS 2023.
  """
  keys = (mem_or_parts.keys if isinstance(mem_or_parts, Memory) else
          mem_or_parts[0] if isinstance(mem_or_parts, (tuple, list)) and mem_or_parts else None)
  if sharded.spans_processes(keys):  # before any check a process could fail alone
    sharded.check_same_on_every_process(
        "rm.sweep's inputs or grids",
        mem_or_parts if not isinstance(mem_or_parts, Memory) else None, embeddings,
        base_outputs, targets, ks, sigmas, temperatures, lams, exclude, task,
        implementation, query_chunk)
  if isinstance(mem_or_parts, Memory):
    mem = check_memory(mem_or_parts, task=task)
  elif isinstance(mem_or_parts, (tuple, list)) and len(mem_or_parts) == 3:
    if task == "regression":  # before building the memory: building it compiles
      _check_no_temperatures(temperatures)
    mem = build_memory(*mem_or_parts, task=task or "classification")
  else:
    raise TypeError(f"mem_or_parts must be a rm.Memory or an (embeddings, targets, "
                    f"base_outputs) tuple, got {type(mem_or_parts).__name__}")
  meta = mem.meta
  embeddings, base_outputs = check_queries(mem, embeddings, base_outputs)
  n_q = embeddings.shape[0]
  if n_q == 0:
    raise ValueError(f"embeddings must hold at least one held-out point, got "
                     f"embeddings.shape={tuple(embeddings.shape)}")
  targets = _check_query_targets(mem, targets, base_outputs)
  ks = tuple(sorted(check_grid("ks", ks, lambda name, k: check_k_exclude(
      mem, n_q, k, exclude, k_name=name)[0])))
  _, exclude = check_k_exclude(mem, n_q, ks[-1], exclude)
  sigmas = check_grid("sigmas", sigmas, check_sigma)
  lams = check_grid("lams", lams, _check_lam)
  if meta.task == "regression":
    _check_no_temperatures(temperatures)
    temperatures = (None,)
  elif temperatures is None:
    temperatures = (meta.temperature,)
  else:
    temperatures = check_grid("temperatures", temperatures, check_temperature)
  query_chunk = v.check_int("query_chunk", query_chunk, low=1)

  k_max = ks[-1]
  n_out = meta.n_outputs
  n_t, per_setting = len(temperatures), len(sigmas) * len(ks) * n_out
  per_query = max(k_max * (1 + n_t) * n_out, per_setting * n_t * (1 + len(lams)))
  batch = int(max(1, min(256, GRID_BUDGET // per_query)))
  outputs = base_outputs.reshape(n_q, n_out)
  targets = targets if meta.task == "classification" else targets.reshape(n_q, n_out)
  valid = np.ones(n_q, bool)
  sigma_arr = bandwidth(sigmas)
  lam_arr = jnp.asarray(lams, jnp.float32)
  regression = meta.task == "regression"
  totals = None
  for _, res, (q_out, q_y, q_valid) in search_chunks(
      mem, embeddings, k_max, exclude, implementation=implementation,
      query_chunk=query_chunk, extra=(outputs, targets, valid)):
    sums = _grid_sums(res.distances, res.indices, q_out, q_y, q_valid,
                      mem.residuals if regression else mem.outputs, mem.targets, sigma_arr,
                      lam_arr, task=meta.task, ks=ks,
                      temperatures=None if regression else temperatures,
                      batch=batch, placement=sharded.placement(mem.outputs))
    if regression:  # m * 4^e per block, in float64 (2^-2000 to 2^256 are all in range)
      sums = {name: np.ldexp(np.asarray(m, np.float64), 2 * np.asarray(e, np.int64))
              for name, (m, e) in sums.items()}
    sums = jax.tree.map(lambda x: np.asarray(x, np.float64).sum(axis=0), sums)
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  means = jax.tree.map(lambda x: x / n_q, totals)  # float64
  table = _table(means, meta.task, ks=ks, sigmas=sigmas, temperatures=temperatures,
                 lams=lams)
  best = {m: min((r for r in table if r["method"] == m), key=_rank_key) for m in METHODS}
  return SweepResult(table=tuple(table), best=best,
                     metric="accuracy" if meta.task == "classification" else "mse",
                     n_queries=n_q)


def _check_query_targets(mem: Memory, targets, base_outputs):
  targets = v.as_array("targets", targets)
  if mem.meta.task == "classification":
    v.check_integer("targets", targets)
    if tuple(targets.shape) != (base_outputs.shape[0],):
      raise ValueError(f"targets must be a (Q,) = ({base_outputs.shape[0]},) vector of "
                       f"labels, got targets.shape={tuple(targets.shape)}")
    check_labels("targets", targets, mem.meta.n_outputs)
  else:
    v.check_floating("targets", targets)
    if tuple(targets.shape) != tuple(base_outputs.shape):
      raise ValueError(f"targets must have the shape of base_outputs "
                       f"{tuple(base_outputs.shape)}, got targets.shape={tuple(targets.shape)}")
    v.check_finite32("targets", targets)
  return targets


def _check_no_temperatures(temperatures) -> None:
  if temperatures is not None:
    raise ValueError(f"temperatures apply to classification only; the memory is for "
                     f"regression, got temperatures={temperatures!r}")


def _table(means: dict[str, Any], task: str, *, ks, sigmas, temperatures, lams) -> list[dict]:
  """Rows from the metric arrays: resmem (S, k, T), deepnet (T,), knn (S, k), knn_lm (S, k, T, L)."""

  def row(method, metric_values, **knobs):
    r = {"method": method, "k": None, "sigma": None, "temperature": None, "lam": None}
    r.update(knobs)
    if task == "classification":
      correct, log_loss = metric_values
      r.update(accuracy=float(correct), log_loss=float(log_loss))
    else:
      r.update(mse=float(metric_values))
    return r

  def at(name, *index):
    return jax.tree.map(lambda x: x[index], means[name])

  rows = []
  for t_i, t in enumerate(temperatures):
    for s_i, s in enumerate(sigmas):
      for k_i, k in enumerate(ks):
        rows.append(row("resmem", at("resmem", s_i, k_i, t_i), k=k, sigma=s, temperature=t))
  for t_i, t in enumerate(temperatures):
    rows.append(row("deepnet", at("deepnet", t_i), temperature=t))
  for s_i, s in enumerate(sigmas):
    for k_i, k in enumerate(ks):
      rows.append(row("knn", at("knn", s_i, k_i), k=k, sigma=s))
  for t_i, t in enumerate(temperatures):
    for l_i, lam in enumerate(lams):
      for s_i, s in enumerate(sigmas):
        for k_i, k in enumerate(ks):
          rows.append(row("knn_lm", at("knn_lm", s_i, k_i, t_i, l_i), k=k, sigma=s,
                          temperature=t, lam=lam))
  return rows

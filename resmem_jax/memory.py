"""The ResMem memory: training embeddings and the residuals the base model left behind.

`build_memory` turns a trained base model's training-set embeddings, targets and
outputs into a `Memory` pytree; `predict` (predict.py) adds the soft kNN average of
the residuals to the base prediction of new points.

Reference: Yang et al., "ResMem: Learn what you can and memorize the rest",
NeurIPS 2023 (arXiv 2302.01576), section 3.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from resmem_jax import _validation as v
from resmem_jax.kernels import sharded

TASKS = ("classification", "regression")
# Scales (T, sigma) are clamped to float32 normals whose reciprocals are normal too:
# XLA may divide as x * (1 / scale), and a flushed reciprocal would give 0 or NaN.
SCALE_RANGE = (2.0 ** -126, 2.0 ** 126)


def safe_scale(scale):
  """Temperatures or bandwidths > 0 as float32, clamped to SCALE_RANGE (host values,
  numbers or sequences, are clamped before the cast: 1e300 would warn and become inf)."""
  if not isinstance(scale, jax.Array):
    scale = np.clip(np.asarray(scale, np.float64), *SCALE_RANGE)
  return jnp.clip(jnp.asarray(scale, jnp.float32), *SCALE_RANGE)


@dataclasses.dataclass(frozen=True)
class MemoryMeta:
  """Static facts about a memory, checked on every use (pytree aux data, so static under jit).

  Attributes:
    task: "classification" or "regression".
    temperature: T of the stored residuals, onehot(y) - softmax(z / T); always 1.0 for
      regression, which has no temperature (`build_memory` checks the T it is given
      and stores 1.0).
    dim: embedding dimension D of the keys; queries must match it.
    n_outputs: number of classes C, or of regression outputs M (1 for scalar targets).
    output_shape: per-example shape of the base outputs the memory expects: (C,) for
      classification, () for scalar regression, (M,) otherwise.
    dtype: dtype of the keys, as a string.
    fingerprint: optional hash of the base model that produced the outputs (see
      `model_fingerprint`); checked by `predict` and `load_memory` when given.
  """

  task: str
  temperature: float
  dim: int
  n_outputs: int
  output_shape: tuple[int, ...]
  dtype: str
  fingerprint: str | None = None


# Leafless pytree node whose value is part of the treedef: a jitted function taking a
# Memory retraces only when its metadata changes, never on its values.
jax.tree_util.register_static(MemoryMeta)


class Memory(NamedTuple):
  """What ResMem memorizes about the training set (a pytree; `meta` is static).

  Searches centre keys and queries by the key mean (inside `rm.knn`), so the memory
  stores the keys as given and needs no centring state: the mean is recomputed from
  the keys (an O(N D) reduction, also across shards of a sharded memory).

  Attributes:
    keys: (N, D) floating, the training embeddings phi(x_i).
    residuals: (N, C) float32 at `meta.temperature`; (N, M) for regression.
    outputs: (N, C) float32 base logits (or regression outputs), kept so that `sweep`
      can recompute the residuals at another temperature without a new search.
    targets: (N,) int32 labels, or (N, M) float32 regression targets.
    meta: `MemoryMeta`, static.
  """

  keys: Float[Array, "N D"]
  residuals: Float[Array, "N C"]
  outputs: Float[Array, "N C"]
  targets: Int[Array, "N"] | Float[Array, "N C"]
  meta: MemoryMeta

  @property
  def size(self) -> int:
    """Number of memorized points N."""
    return self.keys.shape[0]


def tempered_softmax(logits: Float[Array, "... C"], temperature) -> Float[Array, "... C"]:
  r"""softmax(z / T) along the last axis, computed as softmax((z - max z) / T).

  The shift comes before the division, so the largest exponent is exactly 0 and the
  others are <= 0 for any T > 0: a T small next to the logits gives the one-hot of the
  argmax (split evenly between tied maxima) instead of inf / inf. (With the shift
  after the division, XLA may compute z / T in two fused places with different
  roundings, and a tiny T then turns that difference into exp(+huge).)

  T is taken in float32 and clamped to [2^-126, 2^126] (~1.2e-38 to ~8.5e37), as
  `predict.bandwidth` clamps sigma: a smaller T would be flushed to 0 and give the
  largest logit 0 / 0, and at the smallest normal the result is already the T -> 0
  limit for any logits float32 tells apart; XLA may compute z / T as z * (1 / T), and
  beyond 2^126 that reciprocal is flushed to 0 (-inf * 0 = NaN), while at 2^126 the
  result is already the uniform T -> inf limit unless logits differ by more than
  ~1e31. -inf logits get weight 0, and where the maximum itself is infinite
  (inf - inf) the entries equal to it are shifted to 0, so they share the weight
  instead of giving NaN.

  Args:
    logits: (..., C) logits z.
    temperature: T > 0, a float or an array broadcasting against `logits` (traced
      values pass unchecked).

  Returns:
    float32 probabilities shaped like `logits`.
  """
  z = logits.astype(jnp.float32)
  top = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  # z - top is exactly 0 at a finite maximum and keeps the gradient in z there; only an
  # infinite maximum needs the explicit 0.
  shifted = jnp.where((z == top) & ~jnp.isfinite(top), 0.0, z - top)
  e = jnp.exp(shifted / safe_scale(temperature))
  return e / jnp.sum(e, axis=-1, keepdims=True)


def base_prediction(base_outputs: Float[Array, "Q C"], *, task: str,
                    temperature: float = 1.0) -> Float[Array, "Q C"]:
  """The base model's own prediction: softmax(z / T) (classification) or f(x).

  Raises ValueError for an unknown task or a concrete T <= 0 or not finite (a traced
  T, inside jit, passes unchecked, as in `tempered_softmax`).
  """
  v.check_choice("task", task, TASKS)
  if not v.is_traced(temperature):
    check_temperature("temperature", temperature)
  if task == "classification":
    return tempered_softmax(base_outputs, temperature)
  return base_outputs.astype(jnp.float32)


def residuals_unchecked(targets, base_outputs, *, task: str, temperature=1.0):
  """`residuals` without host checks, for use inside jit (temperature may be traced)."""
  base = base_prediction(base_outputs, task=task, temperature=temperature)
  if task == "classification":
    # A label outside [0, C) (unchecked under jit) would one-hot to zeros, a plausible
    # residual -softmax(z / T): NaN instead.
    c = base_outputs.shape[-1]
    valid = ((targets >= 0) & (targets < c))[..., None]
    return jnp.where(valid, jax.nn.one_hot(targets, c, dtype=base.dtype) - base, jnp.nan)
  return targets.astype(base.dtype) - base


def residuals(targets: Int[Array, "N"] | Float[Array, "N ..."],
              base_outputs: Float[Array, "N ..."], *, task: str = "classification",
              temperature: float = 1.0) -> Float[Array, "N ..."]:
  r"""What the base model failed to fit on each training point.

    classification:  r_i = onehot(y_i) - softmax(z_i / T)
    regression:      r_i = y_i - f(x_i)

  Args:
    targets: (N,) int labels in [0, C) for classification; (N,) or (N, M) floats of
      the same shape as `base_outputs` for regression.
    base_outputs: (N, C) logits z_i, or regression outputs f(x_i).
    task: "classification" or "regression".
    temperature: T > 0 (classification only).

  Returns:
    float32 residuals shaped like `base_outputs`.

  Raises:
    TypeError: wrong dtypes (integer labels, floating outputs/targets).
    ValueError: bad shapes, non-finite values, labels outside [0, C), T <= 0.

  Example:
    >>> rm.residuals(jnp.array([1]), jnp.zeros((1, 2)))
    Array([[-0.5,  0.5]], dtype=float32)

  References:
    Yang et al., "ResMem: Learn what you can and memorize the rest", NeurIPS 2023, eq. (2).
  """
  targets, base_outputs, temperature = _check_targets_outputs(
      targets, base_outputs, task=task, temperature=temperature, n=None)
  res = residuals_unchecked(jnp.asarray(targets), jnp.asarray(base_outputs), task=task,
                            temperature=temperature)
  _check_regression_residuals(res, task)
  return res


def build_memory(embeddings: Float[Array, "N D"],
                 targets: Int[Array, "N"] | Float[Array, "N ..."],
                 base_outputs: Float[Array, "N ..."], *, task: str = "classification",
                 temperature: float = 1.0, fingerprint: str | None = None) -> Memory:
  r"""The ResMem memory of a training set: keys phi(x_i) and residuals r_i.

    classification:  r_i = onehot(y_i) - softmax(z(x_i) / T)
    regression:      r_i = y_i - f(x_i)

  The memory lives where the embeddings are. Embeddings given as a `jax.Array` whose
  `NamedSharding` splits rows give a memory split the same way: targets, outputs and
  residuals are put on the embeddings' mesh with the same row axes (wherever the
  labels and logits were, NumPy included); embeddings committed to one device, or
  replicated over a mesh, put them there. Uncommitted embeddings (NumPy, or an array
  on the default device) leave them where JAX puts them; place a memory later with
  `rm.shard_memory`.

  Args:
    embeddings: (N, D) floating, the base model's penultimate features of the
      training points, N >= 1.
    targets: (N,) int labels in [0, C) (classification); (N,) or (N, M) floats
      (regression).
    base_outputs: (N, C) logits (classification); regression outputs with the shape of
      `targets`.
    task: "classification" or "regression".
    temperature: T > 0 of the classification residuals, a float or a concrete 0-d
      array (stored). Unused for regression, whose memory stores 1.0: a T > 0 is
      checked, and None (`rm.sweep`'s best temperature for regression) is taken.
    fingerprint: optional string identifying the base model, e.g.
      `model_fingerprint({"params": ..., "batch_stats": ...})` of the variables the
      embeddings came from; stored and checked later by `predict` / `load_memory` when
      they are given one.

  Returns:
    A `Memory`.

  Raises:
    TypeError: wrong dtypes.
    ValueError: empty or mismatched inputs, non-finite values, labels outside [0, C),
      T <= 0, unknown task.

  Example:
    >>> mem = rm.build_memory(emb, labels, logits, task="classification", temperature=1.0)
    >>> scores = rm.predict(mem, test_emb, test_logits, k=10, sigma=0.5)

  References:
    Yang et al., "ResMem: Learn what you can and memorize the rest", NeurIPS 2023.
  """
  if sharded.spans_processes(embeddings):  # before any check a process could fail alone
    sharded.check_same_on_every_process(
        "rm.build_memory's targets, base_outputs, task or temperature", targets,
        base_outputs, task, temperature, fingerprint)
  embeddings = v.as_array("embeddings", embeddings)
  v.check_floating("embeddings", embeddings)
  v.check_ndim("embeddings", embeddings, (2,), "an (N, D) matrix")
  n, dim = embeddings.shape
  if n == 0:
    raise ValueError(f"embeddings must hold at least one row (the memory would be empty), "
                     f"got embeddings.shape={tuple(embeddings.shape)}")
  if dim == 0:
    raise ValueError(f"embeddings must have D >= 1 features, got "
                     f"embeddings.shape={tuple(embeddings.shape)}")
  v.check_finite32("embeddings", embeddings)
  targets, base_outputs, temperature = _check_targets_outputs(
      targets, base_outputs, task=task, temperature=temperature, n=n)
  if fingerprint is not None and not isinstance(fingerprint, str):
    raise TypeError(f"fingerprint must be a str (see rm.model_fingerprint), got "
                    f"fingerprint={fingerprint!r}")

  output_shape = tuple(base_outputs.shape[1:])
  keys = jnp.asarray(embeddings)
  targets = jnp.asarray(targets)
  outputs = jnp.asarray(base_outputs).astype(jnp.float32)
  if task == "classification":
    targets = targets.astype(jnp.int32)
  else:
    # Regression rows are stored as (N, M) so every task aggregates (N, C) rows.
    targets = targets.astype(jnp.float32).reshape(n, -1)
    outputs = outputs.reshape(n, -1)
  if task == "regression":
    temperature = 1.0  # No temperature: one meta (and one jit trace) for any T given.
  meta = MemoryMeta(task=task, temperature=temperature, dim=int(dim),
                    n_outputs=int(outputs.shape[1]), output_shape=output_shape,
                    dtype=str(keys.dtype), fingerprint=fingerprint)
  # Labels and logits often come as NumPy; left alone they (and so the residuals)
  # would sit whole on the default device, away from keys placed elsewhere.
  # Row-split keys (also under jit, where their type carries the split) or keys
  # committed to their devices: the rest of the memory joins them.
  placed = sharded.row_axes(keys) is not None or sharded.committed(keys)
  where = sharded.rows_like(keys) if placed else None
  if where is not None:
    targets, outputs = (sharded.put(x, where) for x in (targets, outputs))
  res = _residuals_jit(targets, outputs, task=task, temperature=temperature)
  _check_regression_residuals(res, task)
  if where is not None:
    res = sharded.put(res, where)
  return Memory(keys=keys, residuals=res, outputs=outputs, targets=targets, meta=meta)


def _check_regression_residuals(res, task: str) -> None:
  """y - f(x) of finite float32 values can still overflow (3e38 - (-3e38)): raise
  rather than memorize inf. Classification residuals lie in [-1, 1]."""
  if task == "regression" and not v.is_traced(res) and not bool(jnp.all(jnp.isfinite(res))):
    raise ValueError("targets - base_outputs must be finite in float32, the regression "
                     "residuals' dtype, but overflows (|difference| > 3.4e38); rescale "
                     "the targets")


def _put_rows(x, mesh: jax.sharding.Mesh, axes: tuple[str, ...]):
  """`x` with its rows split over mesh axes `axes`, trailing axes replicated."""
  spec = jax.sharding.PartitionSpec(axes, *([None] * (x.ndim - 1)))
  return sharded.put(x, jax.sharding.NamedSharding(mesh, spec))


@functools.partial(jax.jit, static_argnames=("task", "temperature"))
def _residuals_jit(targets, outputs, *, task, temperature):
  return residuals_unchecked(targets, outputs, task=task, temperature=temperature)


def shard_memory(mem: Memory, mesh: jax.sharding.Mesh,
                 axis: str | tuple[str, ...] = "data") -> Memory:
  """Places the memory's rows over the devices of `mesh` axis (or axes) `axis`.

  Keys, residuals, outputs and targets are split by rows with
  `NamedSharding(mesh, P(axis, ...))`; `rm.knn` and `rm.predict` then search each
  shard locally and merge the candidates (kernels/sharded.py), with the same result
  as one device. On a TPU pod slice, call `jax.distributed.initialize()` on every host
  first and use `mesh = jax.make_mesh((jax.device_count(),), ("data",))`; every host
  passes the same memory and keeps its own rows.

  Args:
    mem: a `Memory`.
    mesh: the device mesh, e.g. `jax.make_mesh((8,), ("data",))`.
    axis: the mesh axis name (or a tuple of names) that splits the rows.

  Returns:
    The same memory, placed.

  Raises:
    ValueError: unknown axis, or N not a multiple of the number of shards.

  Example:
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> mem = rm.shard_memory(rm.build_memory(emb, y, logits), mesh)
  """
  if (isinstance(mem, Memory) and not jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()).is_fully_addressable):
    # The mesh spans processes: every process must hold the same memory.
    sharded.check_same_on_every_process("rm.shard_memory's memories", repr(mem.meta),
                                        mem.keys, mem.residuals, mem.outputs, mem.targets)
  check_memory(mem)
  axes = (axis,) if isinstance(axis, str) else tuple(axis)
  for name in axes:
    if name not in mesh.shape:
      raise ValueError(f"axis must name axes of the mesh {tuple(mesh.shape)}, got axis={axis!r}")
  shards = int(np.prod([mesh.shape[a] for a in axes]))
  if mem.size % shards:
    raise ValueError(f"the memory's N={mem.size} rows must split evenly over the {shards} "
                     f"devices of mesh axis {axis!r}; pad or trim it to a multiple of {shards}")

  return mem._replace(**{name: _put_rows(getattr(mem, name), mesh, axes)
                         for name in ("keys", "residuals", "outputs", "targets")})


def model_fingerprint(variables: Any) -> str:
  """A short hash of a pytree of arrays: its key paths, shapes, dtypes and values.

  Store it with `build_memory(..., fingerprint=...)`; `predict` and `load_memory`
  compare it with the one they are given, so a memory is not used with residuals of
  another base model by mistake.

  Hash everything the embedding depends on: for a model with BatchNorm that is the
  running statistics as well as the parameters, so fingerprint the variables
  `{"params": state.params, "batch_stats": state.batch_stats}`, not `state.params`
  alone. Only arrays are hashed: architecture attributes (a module's `embed_act`, its
  `dtype`, ...) and other static data are not covered, and two models that differ
  only there share a fingerprint.

  The hash reads each leaf's key path (`jax.tree_util.keystr`), never the treedef's
  text, so it is the same in every process (a TrainState's static `apply_fn` and `tx`
  do not enter it) and for a dict and a `FrozenDict` of the same arrays (likewise a
  list and a tuple). None leaves are empty subtrees and do not count.

  Args:
    variables: a pytree of arrays (NumPy, JAX, or Python scalars), e.g. a Flax
      variables dict.

  Returns:
    16 hex digits.

  Example:
    >>> fp = rm.model_fingerprint({"params": state.params,
    ...                            "batch_stats": state.batch_stats})
    >>> mem = rm.build_memory(emb, labels, logits, fingerprint=fp)
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(variables)
  digest = hashlib.sha256(f"{len(leaves)} leaves\n".encode())
  for path, leaf in leaves:
    arr = np.ascontiguousarray(np.asarray(leaf))
    # The byte count ends the header, so neither a key nor the values can run into the
    # next leaf's fields and collide.
    digest.update(f"{jax.tree_util.keystr(path)!r}|{arr.shape}|{arr.dtype.name}|"
                  f"{arr.nbytes}\n".encode())
    digest.update(arr.tobytes())
  return digest.hexdigest()[:16]


def check_memory(mem: Any, *, task: str | None = None,
                 fingerprint: str | None = None) -> Memory:
  """Raises unless `mem` is a non-empty Memory whose arrays are what its meta says (of
  `task`, with `fingerprint`, when given).

  A `Memory` is a NamedTuple: `mem._replace(residuals=...)` or a `jax.tree.map` can
  leave a meta behind that no longer describes the arrays. A search over such keys, or
  a gather from residuals with fewer rows than keys (which JAX clamps silently), would
  return garbage; shapes and dtype kinds are static, so this check is free.
  """
  if not isinstance(mem, Memory):
    raise TypeError(f"mem must be a rm.Memory (from rm.build_memory or rm.load_memory), "
                    f"got {type(mem).__name__}")
  check_meta(mem.meta)
  _check_arrays_match_meta(mem)
  if task is not None:
    v.check_choice("task", task, TASKS)
    if task != mem.meta.task:
      raise ValueError(f"mem was built for task={mem.meta.task!r}, got task={task!r}")
  if fingerprint is not None and fingerprint != mem.meta.fingerprint:
    raise ValueError(f"mem was built from a base model with fingerprint="
                     f"{mem.meta.fingerprint!r}, got fingerprint={fingerprint!r}")
  return mem


def check_meta(meta: Any) -> None:
  """Raises ValueError (TypeError for a wrong type) unless `meta` is a MemoryMeta that
  `build_memory` could have written: a `dataclasses.replace` or an edited saved memory
  may hold a T <= 0 (which `tempered_softmax` would clamp to the one-hot limit) or an
  unknown task."""
  if not isinstance(meta, MemoryMeta):
    raise TypeError(f"mem.meta must be a rm.MemoryMeta, got {type(meta).__name__}")
  v.check_choice("mem.meta.task", meta.task, TASKS)
  check_temperature("mem.meta.temperature", meta.temperature)
  v.check_int("mem.meta.dim", meta.dim, low=1)
  c = v.check_int("mem.meta.n_outputs", meta.n_outputs, low=1)
  if not isinstance(meta.output_shape, tuple):
    raise TypeError(f"mem.meta.output_shape must be a tuple, got "
                    f"mem.meta.output_shape={meta.output_shape!r}")
  for i, size in enumerate(meta.output_shape):  # (True,) == (1,) and (2.0,) == (2,)
    v.check_int(f"mem.meta.output_shape[{i}]", size, low=1)
  if not isinstance(meta.dtype, str):
    raise TypeError(f"mem.meta.dtype must be a str, got mem.meta.dtype={meta.dtype!r}")
  shapes = [(c,)] if meta.task == "classification" else ([(), (1,)] if c == 1 else [(c,)])
  if meta.output_shape not in shapes:
    raise ValueError(f"mem.meta.output_shape must be one of {shapes} for task="
                     f"{meta.task!r} and n_outputs={c}, got "
                     f"mem.meta.output_shape={meta.output_shape!r}")
  if meta.fingerprint is not None and not isinstance(meta.fingerprint, str):
    raise ValueError(f"mem.meta.fingerprint must be a str or None, got "
                     f"mem.meta.fingerprint={meta.fingerprint!r}")


def _check_arrays_match_meta(mem: Memory) -> None:
  meta, c = mem.meta, mem.meta.n_outputs
  n = mem.keys.shape[0] if mem.keys.ndim else 0
  want = {"keys": ((n, meta.dim), "floating"), "residuals": ((n, c), "floating"),
          "outputs": ((n, c), "floating"),
          "targets": (((n,), "integer") if meta.task == "classification"
                      else ((n, c), "floating"))}
  for name, (shape, kind) in want.items():
    arr = getattr(mem, name)
    if tuple(arr.shape) != shape:
      raise ValueError(f"mem.{name} must be shaped {shape} as mem.meta describes (N={n}, "
                       f"dim={meta.dim}, n_outputs={c}, task={meta.task!r}), got "
                       f"mem.{name}.shape={tuple(arr.shape)}; rebuild it with "
                       f"rm.build_memory")
    family = jnp.floating if kind == "floating" else jnp.integer
    if not jnp.issubdtype(arr.dtype, family):
      raise ValueError(f"mem.{name} must have {'a' if kind == 'floating' else 'an'} {kind} "
                       f"dtype as mem.meta.task={meta.task!r} requires, got "
                       f"mem.{name}.dtype={arr.dtype}")
  if n == 0:
    raise ValueError("mem is empty (N=0 rows): a memory needs at least one point; "
                     "rebuild it with rm.build_memory")


def check_queries(mem: Memory, embeddings, base_outputs, *, emb_name: str = "embeddings",
                  out_name: str = "base_outputs"):
  """Host checks that queries and their base outputs fit the memory; returns arrays."""
  embeddings = v.as_array(emb_name, embeddings)
  base_outputs = v.as_array(out_name, base_outputs)
  v.check_floating(emb_name, embeddings)
  v.check_floating(out_name, base_outputs)
  v.check_ndim(emb_name, embeddings, (2,), "a (Q, D) matrix")
  if embeddings.shape[1] != mem.meta.dim:
    raise ValueError(f"{emb_name} must have the memory's dimension D={mem.meta.dim}, got "
                     f"{emb_name}.shape={tuple(embeddings.shape)}")
  expected = (embeddings.shape[0],) + mem.meta.output_shape
  if tuple(base_outputs.shape) != expected:
    what = ("C=%d classes" % mem.meta.n_outputs if mem.meta.task == "classification"
            else f"per-example shape {mem.meta.output_shape}")
    raise ValueError(f"{out_name} must be shaped {expected} (one row per query, {what} "
                     f"as in the memory), got {out_name}.shape={tuple(base_outputs.shape)}")
  v.check_finite32(emb_name, embeddings)
  v.check_finite32(out_name, base_outputs)
  return embeddings, base_outputs


def check_temperature(name: str, temperature) -> float:
  """A finite real T > 0 (a Python or NumPy scalar, or a concrete 0-d array) as a float."""
  temperature = v.concrete_scalar(temperature)
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)):
    raise TypeError(f"{name} must be a float or a concrete 0-d array, got "
                    f"{name}={temperature!r}")
  v.check_positive(name, temperature)
  return float(temperature)


def _check_targets_outputs(targets, base_outputs, *, task, temperature, n,
                           targets_name="targets", outputs_name="base_outputs"):
  v.check_choice("task", task, TASKS)
  if temperature is None and task == "regression":
    temperature = 1.0  # what `rm.sweep`'s best settings hold for regression: unused
  temperature = check_temperature("temperature", temperature)
  targets = v.as_array(targets_name, targets)
  base_outputs = v.as_array(outputs_name, base_outputs)
  v.check_floating(outputs_name, base_outputs)
  if task == "classification":
    if jnp.issubdtype(targets.dtype, jnp.floating):
      raise TypeError(f"{targets_name} must have an integer dtype for task='classification' "
                      f"(the default), got {targets_name}.dtype={targets.dtype}; pass "
                      f"task='regression' for real-valued targets")
    v.check_integer(targets_name, targets)
    v.check_ndim(targets_name, targets, (1,), "an (N,) vector of int labels")
    v.check_ndim(outputs_name, base_outputs, (2,), "an (N, C) matrix of logits")
    if base_outputs.shape[1] == 0:
      raise ValueError(f"{outputs_name} must have C >= 1 classes, got "
                       f"{outputs_name}.shape={tuple(base_outputs.shape)}")
  else:
    v.check_floating(targets_name, targets)
    v.check_ndim(targets_name, targets, (1, 2), "an (N,) or (N, M) array")
    if tuple(base_outputs.shape) != tuple(targets.shape):
      raise ValueError(f"{outputs_name} must have the shape of {targets_name}, got "
                       f"{outputs_name}.shape={tuple(base_outputs.shape)}, "
                       f"{targets_name}.shape={tuple(targets.shape)}")
    if targets.ndim == 2 and targets.shape[1] == 0:
      raise ValueError(f"{targets_name} must have M >= 1 outputs, got "
                       f"{targets_name}.shape={tuple(targets.shape)}")
  rows = targets.shape[0]
  if base_outputs.shape[0] != rows or (n is not None and rows != n):
    expect = f"N={n} rows like embeddings" if n is not None else "the same number of rows"
    raise ValueError(f"{targets_name} and {outputs_name} must have {expect}, got "
                     f"{targets_name}.shape={tuple(targets.shape)}, "
                     f"{outputs_name}.shape={tuple(base_outputs.shape)}")
  if task == "classification":
    check_labels(targets_name, targets, base_outputs.shape[1])
  else:
    v.check_finite32(targets_name, targets)
  v.check_finite32(outputs_name, base_outputs)
  return targets, base_outputs, temperature


def check_labels(name: str, labels, n_classes: int) -> None:
  """Raises ValueError unless every label lies in [0, n_classes).

  The range is reduced where the labels live (their rows may be split over devices or
  hosts); only when a label is out of range, and the array is all on this host, are
  they copied here to name the first bad one. NumPy labels are measured as they are:
  JAX, with 64-bit mode off, would wrap int64 labels to 32 bits on the way in, and
  -2^63 (a "no label" marker) would pass as class 0."""
  if v.is_traced(labels) or labels.size == 0:
    return
  if isinstance(labels, np.ndarray):
    low, high = int(labels.min()), int(labels.max())
  else:
    with jax.ensure_compile_time_eval():  # concrete labels closed over by an outer jit
      low, high = (int(x) for x in jax.device_get(_label_range(labels)))
  if 0 <= low and high < n_classes:
    return
  first = ""
  if getattr(labels, "is_fully_addressable", True):
    host = np.asarray(labels)
    bad = np.flatnonzero((host < 0) | (host >= n_classes))[0]
    first = f"; first {name}[{bad}]={host.reshape(-1)[bad]}"
  raise ValueError(f"{name} must be labels in [0, C={n_classes}), got labels from {low} "
                   f"to {high}{first}")


@jax.jit
def _label_range(labels):
  return jnp.min(labels), jnp.max(labels)

"""Exact kNN over keys whose rows are split across devices, with `jax.shard_map`.

Every shard runs the same exact search on its own rows (centred by the GLOBAL key
mean, so ranking stays exact for offset data), re-scores its k local winners as exact
distances, and shifts their indices by the shard's offset. The (Q, shards * k)
candidates are then merged by (distance, global index): the k nearest of the union of
the local k nearest are the global k nearest, and equal distances keep the lower
global index first, exactly as on one device. Only Q * k candidates per shard cross
devices; the keys never move. A row the certificate proves has the bits of one
device's search, for both metrics: one device ranks on its matmul scores and the merge
on the re-scored distances, which may differ in the last bit, but two keys that tie
that closely at the k-th place fail the certificate on both (`api.search_certified`),
and both recompute the row with the direct search. That search is exact too, but its
sums may round differently on a shard's key tiles than on one device's
(`kernels/direct.py`): where distances tie within float32 rounding (inner products of
data far from the origin, say), a re-searched row may keep another of the tied keys at
the k-th place than one device does.

Placing a memory over the devices of a TPU pod slice (or GPUs, or fake CPU devices):

    # Multi-host only: every host runs the same program after
    jax.distributed.initialize()
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    keys = jax.device_put(keys, NamedSharding(mesh, P("data", None)))   # or rm.shard_memory
    res = rm.knn(queries, keys, k=10)           # dispatches here; result replicated

On several hosts, build the global array from each host's rows with
`jax.make_array_from_process_local_data(NamedSharding(mesh, P("data", None)), local_rows)`
instead of `device_put`, and give every host the same queries (NumPy, or on any of its
own devices: `put` places them, and `rm.knn` first checks that every process holds
the same values); tests/multihost_check.py runs this on two processes.
The row count must be a multiple of the number of shards (JAX refuses uneven row
shardings; pad or trim the memory). A mesh with more axes works too: split the rows over any
of its axes (`P(("data", "model"), None)`); the other axes hold replicas.

With the keys on no particular device and several CPU devices in the process, `knn`
instead splits a large batch of QUERIES over the CPU devices (`query_mesh`), so that
the single-threaded top-k selections of XLA:CPU run on every core at once.

Reference: the multi-device kNN of jax/_src/lax/ann.py (local top-k, offsets, one
final top-k), written with `jax.shard_map` instead of `pmap`.
"""

from __future__ import annotations

import functools
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

QUERY_AXIS = "queries"
# Fewer queries per CPU device than this stay on one device: there the matmul already
# keeps every core busy, and a second copy of the keys costs memory for nothing
# (C3 of the benchmark, 1000 queries over 1M keys, ran 7% slower split over 2 devices
# and held 2x the memory; 10k queries ran 9% and 25% faster at k = 10 and 100).
MIN_QUERIES_PER_DEVICE = 1024
# Bound on the extra memory of a query split: every further device holds a copy of the
# keys (the search itself adds no copy of them). Larger memories use fewer devices (or
# stay on one); `rm.shard_memory` splits the rows instead and copies nothing.
MAX_EXTRA_KEY_BYTES = 1 << 30


def _sharding(x):
  """The sharding of `x`; under jit, the one its type carries (explicit mesh axes only:
  under an Auto mesh a tracer's type holds no split, and XLA partitions the plain
  search itself)."""
  if isinstance(x, jax.core.Tracer):
    return jax.typeof(x).sharding
  return getattr(x, "sharding", None)


def row_axes(x) -> tuple[str, ...] | None:
  """Mesh axes that split the rows of `x`, when it is a row-sharded array, else None."""
  sharding = _sharding(x)
  if not isinstance(sharding, NamedSharding) or not sharding.spec:
    return None
  axes = sharding.spec[0]
  if axes is None:
    return None
  # A one-device axis still goes through shard_map: under an Explicit mesh the plain
  # path would have to top-k over a (trivially) sharded axis, which JAX refuses.
  return (axes,) if isinstance(axes, str) else tuple(axes)


def searchable(x, *, rows_split_ok: bool = False):
  """`x` in a layout the search takes: splits over Explicit mesh axes made Auto.

  Under an Explicit mesh (`jax.make_mesh`'s default) every op must say how it treats
  the split axes, and `lax.map` over split rows or a matmul over a split D is
  refused. The search's own sharded path handles keys split by rows
  (`rows_split_ok`); any other split array is put on the same devices and layout
  with Auto axes, where XLA partitions the search itself. Under jit (a tracer typed
  with Explicit splits) it is gathered (replicated) instead.
  """
  sharding = _sharding(x)
  if (not isinstance(sharding, NamedSharding) or not any(sharding.spec)
      or (rows_split_ok and row_axes(x) is not None)):
    return x
  mesh = sharding.mesh
  explicit = {name for name, kind in zip(mesh.axis_names, mesh.axis_types)
              if kind == jax.sharding.AxisType.Explicit}
  split = {a for entry in sharding.spec if entry is not None
           for a in ((entry,) if isinstance(entry, str) else entry)}
  if not split & explicit:
    return x
  if isinstance(x, jax.core.Tracer):
    return jax.sharding.reshard(x, NamedSharding(mesh, P()))
  auto = Mesh(mesh.devices, mesh.axis_names,
              axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
  return jax.device_put(x, NamedSharding(auto, sharding.spec))


def _concrete(x) -> bool:
  return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def committed(x) -> bool:
  """`x` is a concrete array committed to its devices (`jax.device_put`, or computed
  from such arrays)."""
  return _concrete(x) and x.committed


def _mix(h):
  """MurmurHash3's 32-bit finalizer: a bijection of uint32 that spreads every bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


@jax.jit
def _fingerprint(x) -> jax.Array:
  """Two 32-bit sums (wrapping) of every element's bits mixed with its position: equal
  on equal arrays, and on unequal ones of one shape and dtype with probability about
  2^-64. The mixing is what makes it so: a plain weighted sum lets two sign flips
  cancel (2^31 times two odd weights is 0 mod 2^32), so x and -x agreed."""
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif x.dtype.itemsize < 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    bits = bits.astype(jnp.uint32)
  else:  # 4 bytes: one uint32 each; 8 bytes: two (a trailing axis)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  bits = bits.reshape(-1)
  position = jnp.arange(bits.size, dtype=jnp.uint32)
  return jnp.stack([jnp.sum(_mix(bits ^ _mix(position * jnp.uint32(2) + jnp.uint32(salt))),
                            dtype=jnp.uint32) for salt in (0x9E3779B9, 0x85EBCA6C)])


def _hash_leaf(digest, leaf) -> None:
  """Feeds `digest` what stands for one input: an array on this process's devices by
  its fingerprint (on the device, no copy to the host), a NumPy array by its bytes,
  either with its shape and dtype; an array over every process by its shape and dtype
  (its values are one array already); anything else by its repr."""
  if isinstance(leaf, jax.Array) and leaf.is_fully_addressable:
    digest.update(np.asarray(_fingerprint(leaf)).tobytes() if leaf.size else b"")
  elif isinstance(leaf, np.ndarray):
    digest.update(np.ascontiguousarray(leaf).data)
  if isinstance(leaf, (np.ndarray, jax.Array)):
    digest.update(f"{tuple(leaf.shape)}{leaf.dtype}".encode())
  else:
    digest.update(repr(leaf).encode())


def spans_processes(x) -> bool:
  """Whether `x` is a concrete array over the devices of several processes."""
  return (jax.process_count() > 1 and isinstance(x, jax.Array)
          and not isinstance(x, jax.core.Tracer) and not x.is_fully_addressable)


def check_same_on_every_process(what: str, *values) -> None:
  """Raises ValueError, on every process alike, unless all processes pass the same
  `values` (arrays, settings).

  A computation over arrays that span processes runs as one program on all of them:
  an input that one process holds alone must have one value everywhere, or the
  global arrays built from it are neither copy and the search silently wrong; and a
  process whose input fails a check that the others' pass raises alone while the
  others wait in a collective. So the public calls compare their inputs first, before
  any check of their values: each process hashes its own (`_hash_leaf`) into 8 bytes
  and every process gathers every process's.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  digest = hashlib.blake2b(digest_size=8)
  for leaf in jax.tree.leaves(values, is_leaf=lambda x: x is None):
    _hash_leaf(digest, leaf)
    digest.update(b"|")
  mine = np.frombuffer(digest.digest(), np.uint32)
  prints = np.asarray(multihost_utils.process_allgather(mine))
  differ = [i for i in range(len(prints)) if not np.array_equal(prints[i], prints[0])]
  if differ:
    raise ValueError(
        f"{what} differ between processes: processes {differ} hold others than process 0. "
        f"Every process must pass the same values for an input it holds alone when the "
        f"computation spans processes (JAX's rule for replicated inputs), or build a "
        f"global array from each process's rows with jax.make_array_from_process_local_data.")


def put(x, sharding: NamedSharding):
  """`jax.device_put(x, sharding)`, also where `sharding` spans several processes and
  `x` is held by this process alone, committed to one of its devices (a model's
  output, say), which device_put refuses (it would be a transfer between hosts).
  Every process then places its own parts of `x`, so every process must pass the same
  values (JAX's multi-process rule for replicated inputs): the public calls check that
  on entry (`check_same_on_every_process`)."""
  if _concrete(x) and x.is_fully_addressable and not sharding.is_fully_addressable:
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.device_put(x, sharding)


def rows_like(x) -> jax.sharding.Sharding | None:
  """A sharding for arrays of `x`'s row count that splits their rows as `x`'s are
  (trailing axes whole): `x`'s mesh with only its rows' split (under jit, the mesh
  its type carries), or its device. None for NumPy `x`, or a sharding of another
  kind."""
  sharding = _sharding(x)
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, P(*sharding.spec[:1]))
  if _concrete(x) and len(x.devices()) == 1:
    return jax.sharding.make_single_device_sharding(next(iter(x.devices())))
  return None


def to_keys(queries, keys):
  """`queries`, moved to the keys' devices when both are committed to different ones.

  JAX refuses one computation on arrays committed to different devices; the search
  runs where the keys are (the memory, usually far larger than a batch of queries),
  so the queries go there: to the keys' device, or replicated over their mesh (keys
  whose rows are not split). Row-split keys are left to `knn_sharded`, which places
  the queries itself.
  """
  if (not (committed(queries) and committed(keys)) or queries.devices() == keys.devices()
      or row_axes(keys) is not None):
    return queries
  where = rows_like(keys)
  return queries if where is None else put(queries, where)


def n_shards(mesh, axes: tuple[str, ...]) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def knn_sharded(queries, keys, k: int, *, metric: str, implementation: str, block_sizes,
                magnitude=None):
  """(distances, indices, certified) of the k nearest keys, `keys` row-sharded (module doc).

  `queries` are replicated over the mesh; the result is replicated too. The caller
  (`rm.knn`) has validated the inputs and padded the queries to a size bucket.
  """
  # JAX itself refuses a NamedSharding that splits N unevenly, so the shards are equal.
  mesh = _sharding(keys).mesh  # an AbstractMesh under jit
  axes = row_axes(keys)
  if isinstance(keys, jax.core.Tracer):  # typed as split already: replicate the queries
    queries = jax.sharding.reshard(queries, NamedSharding(mesh, P()))
  else:
    keys = put(keys, NamedSharding(mesh, P(axes, None)))
    queries = put(queries, NamedSharding(mesh, P()))
  return _knn_sharded(queries, keys, magnitude, k=k, metric=metric,
                      implementation=implementation, block_sizes=block_sizes, mesh=mesh,
                      axes=axes)


@functools.partial(jax.jit, static_argnames=("k", "metric", "implementation", "block_sizes",
                                             "mesh", "axes"))
def _knn_sharded(queries, keys, magnitude, *, k, metric, implementation, block_sizes, mesh,
                 axes):
  # The registry and the re-scoring live in api.py, which imports this module.
  from resmem_jax.kernels import api  # pylint: disable=g-import-not-at-top

  queries, keys = api._promote(queries, keys)  # pylint: disable=protected-access
  n_local = keys.shape[0] // n_shards(mesh, axes)
  k_local = min(k, n_local)
  # One global scale and mean (all-reduces) keep every shard's ranking on the same
  # scaled, centred coordinates as a single-device search.
  scale, mean = api.scale_and_mean(queries, keys, magnitude, metric)

  # Re-score as many columns as one device would, so the distances are the same bits.
  width = api.n_candidates(k, keys.shape[0])

  def local(q, x, mu, s):
    dist, idx, certified = api.search_certified(
        q, x, mu, k_local, metric=metric, implementation=implementation,
        block_sizes=block_sizes, width=width, scale=s)
    if k_local < k:
      # Fewer rows than k on this shard: pad with entries that sort last.
      dist = jnp.pad(dist, ((0, 0), (0, k - k_local)), constant_values=jnp.inf)
      idx = jnp.pad(idx, ((0, 0), (0, k - k_local)), constant_values=n_local)
    real = idx < n_local
    offset = jax.lax.axis_index(axes) * n_local
    idx = jnp.where(real, idx + offset.astype(jnp.int32), n_local * n_shards(mesh, axes))
    # (Q, shards * k) candidates in shard order, the same on every device; the
    # k smallest by (distance, global index) are the global k nearest, exact when
    # every shard's local search is certified.
    dist, idx = jax.lax.all_gather((dist, idx), axes, axis=1, tiled=True)
    dist, idx = jax.lax.sort((dist, idx), dimension=1, num_keys=2)
    certified = jax.lax.pmin(certified.astype(jnp.int32), axes).astype(bool)
    return dist[:, :k], idx[:, :k], certified

  # check_vma=False: the single-device backends (scans with replicated initial carries)
  # are not annotated for varying manual axes. The outputs are replicated by
  # construction: every device sorts the same all-gathered candidates.
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes, None), P(), P()),
                       out_specs=(P(), P(), P()), check_vma=False)(queries, keys, mean, scale)


def query_mesh(queries, keys) -> Mesh | None:
  """A mesh over the CPU devices to split the queries over, or None to stay on one device.

  XLA:CPU runs a device's program one operation at a time: a matmul uses every core,
  but the `top_k` selection runs on one, so at large k most cores wait for it. A
  process with several CPU devices (`jax.config.update("jax_num_cpu_devices",
  os.cpu_count())` before JAX starts) runs one program per device at once, so `knn`
  splits the queries over them; the keys are replicated (one copy per device) and
  every query sees the same program as on one device, so the result has the same
  bits. Inputs placed explicitly (committed) or traced stay where they are. The mesh
  takes as many devices as give each at least `MIN_QUERIES_PER_DEVICE` queries and
  keep the copies of the keys within `MAX_EXTRA_KEY_BYTES`; fewer than two: None.
  """
  if jax.default_backend() != "cpu" or any(
      isinstance(x, jax.core.Tracer) or committed(x) for x in (queries, keys)):
    return None
  devices = jax.local_devices(backend="cpu")
  key_bytes = max(1, math.prod(keys.shape) * np.dtype(keys.dtype).itemsize)
  n = min(len(devices), queries.shape[0] // MIN_QUERIES_PER_DEVICE,
          1 + MAX_EXTRA_KEY_BYTES // key_bytes)
  return Mesh(np.asarray(devices[:n]), (QUERY_AXIS,)) if n >= 2 else None


def knn_query_parallel(queries, keys, k: int, *, metric: str, implementation: str,
                       block_sizes, mesh: Mesh, magnitude: float):
  """(distances, indices, certified): `queries` split over `mesh`, keys replicated.

  The number of queries must be a multiple of the mesh size; `magnitude` is max |value|
  of the whole batch (measured on the host: `query_mesh` never splits traced inputs).
  The result comes back to the device the queries came from.
  """
  home = (next(iter(queries.devices())) if isinstance(queries, jax.Array)
          else jax.local_devices()[0])
  queries = jax.device_put(queries, NamedSharding(mesh, P(QUERY_AXIS, None)))
  keys = jax.device_put(keys, NamedSharding(mesh, P()))
  out = _knn_query_parallel(queries, keys, magnitude, k=k, metric=metric,
                            implementation=implementation, block_sizes=block_sizes,
                            mesh=mesh)
  return jax.device_put(out, home)


@functools.partial(jax.jit, static_argnames=("k", "metric", "implementation", "block_sizes",
                                             "mesh"))
def _knn_query_parallel(queries, keys, magnitude, *, k, metric, implementation, block_sizes,
                        mesh):
  from resmem_jax.kernels import api  # pylint: disable=g-import-not-at-top

  # Each device runs the single-device search on its share of the queries, at the scale
  # of the whole batch, so every row gets the bits one device would give it.
  local = functools.partial(api._knn_padded, k=k, metric=metric,  # pylint: disable=protected-access
                            implementation=implementation, block_sizes=block_sizes)
  rows = P(QUERY_AXIS)
  return jax.shard_map(local, mesh=mesh, in_specs=(P(QUERY_AXIS, None), P(), P()),
                       out_specs=(rows, rows, rows), check_vma=False)(queries, keys, magnitude)


def placement(x) -> tuple | None:
  """(mesh, row axes) of a row-sharded array, else None: a static jit argument."""
  axes = row_axes(x)
  return None if axes is None else (_sharding(x).mesh, axes)


def _row_spec(ndim: int, axes) -> P:
  return P(axes, *([None] * (ndim - 1)))


def _local_rows(table, idx, n_local, axes):
  """This shard's rows of `table` at global `idx`, zeros where another shard owns them."""
  local = idx - jax.lax.axis_index(axes).astype(idx.dtype) * n_local
  own = (local >= 0) & (local < n_local)
  rows = table[jnp.clip(local, 0, n_local - 1)]
  return jnp.where(own.reshape(own.shape + (1,) * (rows.ndim - own.ndim)), rows, 0)


def gather_rows(table, idx, *, placement):
  """`table[idx]` for a row-sharded `table` (inside jit): each row comes from its owner.

  Every shard contributes the rows it owns and zeros elsewhere; one psum assembles
  them exactly (x + 0 = x), replicated on every device.
  """
  mesh, axes = placement
  n_local = table.shape[0] // n_shards(mesh, axes)
  return jax.shard_map(
      lambda t, i: jax.lax.psum(_local_rows(t, i, n_local, axes), axes),
      mesh=mesh, in_specs=(_row_spec(table.ndim, axes), P()), out_specs=P(),
      check_vma=False)(table, idx)


def weighted_row_sum(table, idx, weights, *, placement, batch_size: int):
  """sum_j weights[q, j] table[idx[q, j]] for a row-sharded (N, C) `table` (inside jit).

  Each shard sums the rows it owns; one psum of (Q, C) partial sums adds the shards,
  so only Q * C values cross devices whatever k is.
  """
  mesh, axes = placement
  n_local = table.shape[0] // n_shards(mesh, axes)
  hp = jax.lax.Precision.HIGHEST

  def local(t, i, w):
    def one(args):
      i_q, w_q = args
      return jnp.dot(w_q, _local_rows(t, i_q, n_local, axes).astype(jnp.float32), precision=hp)
    partial = jax.lax.map(one, (i, w), batch_size=min(batch_size, i.shape[0]))
    return jax.lax.psum(partial, axes)

  return jax.shard_map(local, mesh=mesh, in_specs=(_row_spec(2, axes), P(), P()),
                       out_specs=P(), check_vma=False)(table, idx, weights)

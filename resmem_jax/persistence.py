"""Saving and loading a `Memory` with Orbax: arrays and metadata side by side.

A saved memory is one Orbax checkpoint directory with two items: `arrays` (keys,
residuals, outputs, targets; written shard by shard from wherever they live) and
`meta` (JSON: the `MemoryMeta`, N, each array's shape and dtype, and a format
version). Loading reads the JSON first, so the arrays can be restored straight into
any layout, e.g. split by rows over the devices of a mesh, without a full copy on one
device, and each comes back in the dtype it was saved in.

Paths are local paths (`~` expanded, made absolute) or cloud URLs such as
`gs://bucket/memory`, handled by `etils.epath`.

On several processes (a TPU pod slice, after `jax.distributed.initialize()`), every
process calls `save_memory` and `load_memory` alike, on a path all of them reach (a
shared file system or a bucket). A saved memory is made of global arrays, each
process writing the rows it holds; a memory loaded with a row `sharding` over the
global mesh comes back the same way, and one loaded without lands whole on every
process's first local device. `tests/multihost_check.py` runs this on two processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import uuid
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from resmem_jax import _validation as v
from resmem_jax.memory import TASKS, Memory, MemoryMeta, check_labels, check_meta, check_memory

# 2: each array's shape and dtype in the metadata (1 assumed float32 residuals and
# outputs). Both are read.
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_ARRAYS = ("keys", "residuals", "outputs", "targets")
# How long a failed save waits for Orbax's background writes before cleaning up.
_CLEANUP_TIMEOUT_S = 10.0


def _checkpointer() -> ocp.Checkpointer:
  # Directories created before the items are written, not in the background: a save
  # that fails then leaves no write pending that could recreate what `save_memory`
  # cleans up.
  options = ocp.AsyncOptions(create_directories_asynchronously=False)
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      composite_options=ocp.CompositeOptions(async_options=options)))


def _stored_arrays(path: epath.Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{name: (shape, dtype)} of the arrays as Orbax recorded writing them ({} where it
  has no such record: the restore that follows then says what is wrong)."""
  try:
    tree = ocp.StandardCheckpointHandler().metadata(path / "arrays").tree
    return {name: (tuple(int(d) for d in meta.shape), np.dtype(meta.dtype))
            for name, meta in tree.items()}
  except Exception:  # noqa: BLE001 - Orbax raises several types for a foreign directory
    return {}


def _resolve(path: str | os.PathLike) -> epath.Path:
  """A cloud URL as it is; a local path with `~` expanded, made absolute."""
  text = os.fspath(path)
  if "://" in text:
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def _saved_meta(path: epath.Path) -> dict | None:
  """The metadata of the memory saved at `path`, or None if it holds none."""
  try:
    raw = json.loads((path / "meta" / "metadata").read_text())
  except Exception:  # Missing, unreadable or not JSON: not a saved memory.
    return None
  if not isinstance(raw, dict) or not isinstance(raw.get("format_version"), int):
    return None
  return raw


def _check_keys_dtype(mem: Memory) -> None:
  """Raises ValueError when the keys' dtype is not the one `mem.meta` records (the
  saved metadata is what `load_memory` restores the keys as)."""
  meta = mem.meta
  if str(mem.keys.dtype) != meta.dtype:
    raise ValueError(f"mem.keys.dtype must be mem.meta.dtype={meta.dtype!r}, got "
                     f"mem.keys.dtype={mem.keys.dtype}; rebuild the memory with "
                     f"rm.build_memory, or update the meta with dataclasses.replace")


def _unique_suffix() -> str:
  """A random suffix, the same on every process (they all save to one directory)."""
  token = np.frombuffer(uuid.uuid4().bytes[:8], np.uint32)
  if jax.process_count() > 1:
    token = np.asarray(multihost_utils.broadcast_one_to_all(token))
  return "".join(f"{int(t):08x}" for t in token)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _check_global(mem: Memory) -> None:
  """On several processes, raises ValueError unless every array of `mem` spans them (a
  global `jax.Array`): Orbax writes each process's shards of such an array, and
  refuses an array one process holds alone, which would be that process's copy only."""
  if jax.process_count() == 1:
    return
  for name in _ARRAYS:
    x = getattr(mem, name)
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      raise ValueError(
          f"on {jax.process_count()} processes, save_memory writes global arrays, and "
          f"mem.{name} is held by this process alone; place the memory over every "
          f"process's devices first: rm.shard_memory(mem, jax.make_mesh(("
          f"jax.device_count(),), ('data',))) when every process holds the same rows, "
          f"or build it from global embeddings (jax.make_array_from_process_local_data)")


def save_memory(path: str | os.PathLike, mem: Memory, *, overwrite: bool = False) -> str:
  """Writes `mem` to the directory `path` (Orbax arrays + JSON metadata).

  The memory is written to a sibling temporary directory first and renamed into
  place, so a save that fails leaves nothing at `path`, and with `overwrite=True`
  leaves the memory that was there before intact. Overwriting replaces only a
  directory that holds a memory saved by `save_memory`: any other directory (or a
  file) at `path` raises instead of being deleted.

  Args:
    path: a directory that does not exist yet (or holds a saved memory, with
      `overwrite=True`): a local path (`~` is expanded) or a cloud URL
      (`gs://bucket/memory`). Missing parent directories are created.
    mem: the `Memory` to save; sharded arrays are written shard by shard. On several
      processes its arrays must span them all (module docstring).
    overwrite: replace a memory already saved at `path`.

  Returns:
    The path written: absolute for a local path, the URL as given for a cloud one.

  Raises:
    TypeError: `mem` is not a Memory.
    ValueError: the arrays of `mem` disagree with `mem.meta` (shapes, keys dtype), or
      (on several processes) one of them is held by one process alone; `path`
      exists and `overwrite` is False; `path` is a file, or a directory that does
      not hold a saved memory.

  Example:
    >>> rm.save_memory("/tmp/cifar_memory", mem)
    >>> mem = rm.load_memory("/tmp/cifar_memory", task="classification")
  """
  check_memory(mem)  # also: arrays shaped as mem.meta says
  _check_keys_dtype(mem)
  _check_global(mem)
  path = _resolve(path)
  exists = path.exists()
  if exists and not overwrite:
    raise ValueError(f"path already exists (pass overwrite=True to replace a saved "
                     f"memory), got path={os.fspath(path)!r}")
  if exists and (not path.is_dir() or _saved_meta(path) is None):
    what = ("a directory without one (no meta/metadata with a format_version)"
            if path.is_dir() else "a file")
    raise ValueError(f"overwrite=True replaces only a memory written by rm.save_memory, "
                     f"and path is {what}; it is left alone: path={os.fspath(path)!r}")

  meta = dataclasses.asdict(mem.meta)
  # check_meta accepts NumPy scalars (e.g. a dataclasses.replace with np.float32(0.5));
  # JSON holds only Python's.
  meta.update(temperature=float(meta["temperature"]), dim=int(meta["dim"]),
              n_outputs=int(meta["n_outputs"]),
              output_shape=[int(d) for d in meta["output_shape"]])
  meta.update(format_version=FORMAT_VERSION, size=int(mem.size),
              targets_dtype=str(mem.targets.dtype),
              arrays={name: {"shape": list(getattr(mem, name).shape),
                             "dtype": str(getattr(mem, name).dtype)} for name in _ARRAYS})
  arrays = {name: getattr(mem, name) for name in _ARRAYS}
  suffix = _unique_suffix()
  tmp = path.parent / f"{path.name}.tmp-{suffix}"
  ckptr = _checkpointer()
  threads_before = set(threading.enumerate())
  try:
    ckptr.save(tmp, args=ocp.args.Composite(
        arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)))
  except BaseException:
    # When one item fails, Orbax does not wait for the writes of the others, which go
    # on in background threads; wait for them before removing the partial checkpoint
    # (Orbax writes `<tmp>.orbax-checkpoint-tmp*` and renames it to `tmp` last).
    ckptr.close()
    _join_new_threads(threads_before, timeout=_CLEANUP_TIMEOUT_S)
    if jax.process_index() == 0:
      _remove_quietly([tmp, *path.parent.glob(f"{tmp.name}.orbax-checkpoint-tmp*")])
    raise
  ckptr.close()
  if jax.process_index() == 0:
    try:
      _move_into_place(tmp, path, old=path.parent / f"{path.name}.old-{suffix}")
    except BaseException:
      _remove_quietly([tmp])  # the finished copy that could not be renamed into place
      raise
  _sync(f"resmem_save_memory_{suffix}")
  return os.fspath(path)


def _join_new_threads(before: set[threading.Thread], *, timeout: float) -> None:
  """Waits (up to `timeout` seconds in all) for threads started since `before`."""
  deadline = time.monotonic() + timeout
  for thread in set(threading.enumerate()) - before:
    thread.join(max(0.0, deadline - time.monotonic()))


def _remove_quietly(paths) -> None:
  """Deletes what exists of `paths`; a failure warns instead of hiding the save's error."""
  for p in paths:
    try:
      if p.exists():
        p.rmtree()
    except Exception as e:  # pylint: disable=broad-except
      warnings.warn(f"could not remove the partial save at {os.fspath(p)!r}: {e}")


def _move_into_place(tmp: epath.Path, path: epath.Path, *, old: epath.Path) -> None:
  """Renames `tmp` to `path`; a memory already at `path` is moved aside, then deleted."""
  if not path.exists():
    tmp.rename(path)
    return
  path.rename(old)
  try:
    tmp.rename(path)
  except BaseException:
    old.rename(path)  # Put the previous memory back.
    raise
  try:
    old.rmtree()
  except Exception as e:  # The new memory is in place; only the cleanup failed.
    warnings.warn(f"the new memory is saved at {os.fspath(path)!r}, but the previous "
                  f"one could not be deleted from {os.fspath(old)!r}: {e}")


def load_memory(path: str | os.PathLike, *, sharding: NamedSharding | None = None,
                task: str | None = None, dim: int | None = None,
                n_outputs: int | None = None, fingerprint: str | None = None) -> Memory:
  """Reads a memory written by `save_memory`, optionally straight into a sharded layout.

  Every array comes back with the shape and dtype it was saved with (bfloat16 keys stay
  bfloat16). A float64 (or int64) array needs 64-bit JAX: loading one with
  `jax_enable_x64` off raises rather than silently rounding it to 32 bits.

  Args:
    path: the directory given to `save_memory` (a local path or a cloud URL).
    sharding: optional `NamedSharding` whose spec splits rows, e.g.
      `NamedSharding(mesh, P("data"))`; every array is restored with its rows split
      that way (trailing axes replicated). None restores onto the default device
      (on several processes: each process's first local device, a whole copy each).
    task, dim, n_outputs, fingerprint: optional expectations; a saved memory that
      differs raises ValueError before any array is read.

  Returns:
    The `Memory`.

  Raises:
    ValueError: missing or foreign directory, an unknown format version, an
      expectation that does not hold, a dtype JAX cannot hold in its current mode, a
      sharding whose spec does not split rows evenly, arrays that disagree with the
      metadata or hold NaN, inf or labels outside [0, C).

  Example:
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> mem = rm.load_memory(path, sharding=NamedSharding(mesh, P("data")),
    ...                      fingerprint=rm.model_fingerprint(variables))
  """
  path = _resolve(path)
  shown = os.fspath(path)
  if not path.is_dir():
    raise ValueError(f"path must be a directory written by rm.save_memory, got path={shown!r}")
  ckptr = _checkpointer()
  try:
    raw = ckptr.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # Orbax raises several types for a foreign directory.
    raise ValueError(f"path does not hold a saved rm.Memory, got path={shown!r}: {e}") from None
  version = raw.get("format_version") if isinstance(raw, dict) else None
  if type(version) is not int or version not in _READABLE_VERSIONS:  # not True, not 1.0
    raise ValueError(f"path holds format_version={version!r}, this version reads "
                     f"{_READABLE_VERSIONS}: path={shown!r}")
  meta = _parse_meta(raw, shown)
  if task is not None and task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got task={task!r}")
  for name, want, have in (("task", task, meta.task), ("dim", dim, meta.dim),
                           ("n_outputs", n_outputs, meta.n_outputs),
                           ("fingerprint", fingerprint, meta.fingerprint)):
    if want is not None and want != have:
      raise ValueError(f"the memory at {shown!r} has {name}={have!r}, got {name}={want!r}")

  try:
    n, c = int(raw["size"]), meta.n_outputs
    if "arrays" in raw:
      specs = {name: (tuple(int(d) for d in raw["arrays"][name]["shape"]),
                      jnp.dtype(raw["arrays"][name]["dtype"])) for name in _ARRAYS}
    else:  # format_version 1: residuals and outputs were always float32.
      specs = {"keys": ((n, meta.dim), jnp.dtype(meta.dtype)),
               "residuals": ((n, c), jnp.dtype("float32")),
               "outputs": ((n, c), jnp.dtype("float32")),
               "targets": ((n,) if meta.task == "classification" else (n, c),
                           jnp.dtype(raw["targets_dtype"]))}
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"the memory at {shown!r} has unreadable array metadata "
                     f"({type(e).__name__}: {e}); save it again with rm.save_memory") from None
  # Orbax restores an array as the dtype asked for, converting silently: an edited
  # metadata file could turn int32 labels into uint8 (wrapping at 256) or float32 keys
  # into bfloat16. Its own record of what it wrote is the check.
  for name, (shape, dtype) in _stored_arrays(path).items():
    if name in specs and specs[name] != (shape, dtype):
      want_shape, want_dtype = specs[name]
      raise ValueError(f"the memory at {shown!r} disagrees with its metadata: {name} is "
                       f"stored as {dtype.name}{list(shape)}, the metadata says "
                       f"{want_dtype.name}{list(want_shape)}")
  target = {}
  for name, (shape, dtype) in specs.items():
    if jax.dtypes.canonicalize_dtype(dtype) != dtype:
      raise ValueError(
          f"the memory at {shown!r} stores {name} as {dtype.name}, which JAX holds only "
          f"with 64-bit mode on; call jax.config.update('jax_enable_x64', True) before "
          f"loading it (or save a {jax.dtypes.canonicalize_dtype(dtype).name} copy)")
    target[name] = jax.ShapeDtypeStruct(shape, dtype,
                                        sharding=_row_sharding(sharding, len(shape), n))
  try:
    arrays = ckptr.restore(path, args=ocp.args.Composite(
        arrays=ocp.args.StandardRestore(target)))["arrays"]
  except KeyError as e:  # Orbax's word for a missing item or array
    raise ValueError(f"the memory at {shown!r} is incomplete (KeyError: {e}); save it "
                     f"again with rm.save_memory") from None
  mem = Memory(meta=meta, **{name: arrays[name] for name in _ARRAYS})
  try:  # the arrays are what the metadata says
    check_memory(mem)
    _check_keys_dtype(mem)
    if mem.size != n:
      raise ValueError(f"size={n} but the arrays hold N={mem.size} rows")
  except (TypeError, ValueError) as e:
    raise ValueError(f"the memory at {shown!r} disagrees with its metadata: {e}") from None
  try:  # and hold values build_memory could have made (predict does not look again)
    regression = meta.task == "regression"
    for name in ("keys", "residuals", "outputs") + (("targets",) * regression):
      v.finite_magnitude(f"mem.{name}", getattr(mem, name))
    if not regression:
      check_labels("mem.targets", mem.targets, meta.n_outputs)
  except ValueError as e:
    raise ValueError(f"the memory at {shown!r} is damaged: {e}") from None
  return mem


def _parse_meta(raw: dict, shown: str) -> MemoryMeta:
  """The `MemoryMeta` of saved metadata, checked like any memory's (`check_memory`)."""
  try:
    task = raw["task"]
    # No float() or int() here: they would read true as 1.0 and 2.7 as 2; check_meta
    # judges the values as JSON gave them.
    meta = MemoryMeta(
        task=task, temperature=1.0 if task == "regression" else raw["temperature"],
        dim=raw["dim"], n_outputs=raw["n_outputs"],
        output_shape=tuple(raw["output_shape"]), dtype=raw["dtype"],
        fingerprint=raw["fingerprint"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"the memory at {shown!r} has unreadable metadata "
                     f"({type(e).__name__}: {e}); save it again with rm.save_memory") from None
  try:
    check_meta(meta)
  except (TypeError, ValueError) as e:
    raise ValueError(f"the memory at {shown!r} has invalid metadata: {e}") from None
  return dataclasses.replace(meta, temperature=float(meta.temperature))


def _row_sharding(sharding, ndim: int, n: int):
  if sharding is None:
    return jax.sharding.make_single_device_sharding(jax.local_devices()[0])
  if not isinstance(sharding, NamedSharding) or not sharding.spec or sharding.spec[0] is None:
    raise ValueError(f"sharding must be a NamedSharding whose spec splits rows, e.g. "
                     f"NamedSharding(mesh, P('data')), got sharding={sharding!r}")
  axes = sharding.spec[0]
  names = (axes,) if isinstance(axes, str) else tuple(axes)
  shards = 1
  for name in names:
    shards *= sharding.mesh.shape[name]
  if n % shards:
    raise ValueError(f"the memory's N={n} rows must split evenly over the {shards} devices "
                     f"of sharding={sharding!r}")
  return NamedSharding(sharding.mesh, P(axes, *([None] * (ndim - 1))))

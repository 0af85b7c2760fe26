"""Saving and loading a `Memory` with Orbax: arrays and metadata side by side.

A saved memory is one Orbax checkpoint directory with two items: `arrays` (keys,
residuals, outputs, targets; written shard by shard from wherever they live) and
`meta` (JSON: the `MemoryMeta`, N and a format version). Loading reads the JSON
first, so the arrays can be restored straight into any layout, e.g. split by rows
over the devices of a mesh, without a full copy on one device.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from resmem_jax.memory import TASKS, Memory, MemoryMeta, check_memory

FORMAT_VERSION = 1
_ARRAYS = ("keys", "residuals", "outputs", "targets")


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_memory(path: str | os.PathLike, mem: Memory, *, overwrite: bool = False) -> str:
  """Writes `mem` to the directory `path` (Orbax arrays + JSON metadata).

  Args:
    path: a directory that does not exist yet (or `overwrite=True`).
    mem: the `Memory` to save; sharded arrays are written shard by shard.
    overwrite: replace an existing directory.

  Returns:
    The absolute path written.

  Raises:
    TypeError: `mem` is not a Memory.
    ValueError: `path` exists and `overwrite` is False.

  Example:
    >>> rm.save_memory("/tmp/cifar_memory", mem)
    >>> mem = rm.load_memory("/tmp/cifar_memory", task="classification")
  """
  check_memory(mem)
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise ValueError(f"path already exists (pass overwrite=True to replace it), got "
                     f"path={path!r}")
  meta = dataclasses.asdict(mem.meta)
  meta["output_shape"] = list(meta["output_shape"])
  meta.update(format_version=FORMAT_VERSION, size=int(mem.size),
              targets_dtype=str(mem.targets.dtype))
  arrays = {name: getattr(mem, name) for name in _ARRAYS}
  _checkpointer().save(path, args=ocp.args.Composite(
      arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=overwrite)
  return path


def load_memory(path: str | os.PathLike, *, sharding: NamedSharding | None = None,
                task: str | None = None, dim: int | None = None,
                n_outputs: int | None = None, fingerprint: str | None = None) -> Memory:
  """Reads a memory written by `save_memory`, optionally straight into a sharded layout.

  Args:
    path: the directory given to `save_memory`.
    sharding: optional `NamedSharding` whose spec splits rows, e.g.
      `NamedSharding(mesh, P("data"))`; every array is restored with its rows split
      that way (trailing axes replicated). None restores onto the default device.
    task, dim, n_outputs, fingerprint: optional expectations; a saved memory that
      differs raises ValueError before any array is read.

  Returns:
    The `Memory`.

  Raises:
    ValueError: missing or foreign directory, an expectation that does not hold, a
      sharding whose spec does not split rows evenly.

  Example:
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> mem = rm.load_memory(path, sharding=NamedSharding(mesh, P("data")),
    ...                      fingerprint=rm.model_fingerprint(params))
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise ValueError(f"path must be a directory written by rm.save_memory, got path={path!r}")
  ckptr = _checkpointer()
  try:
    raw = ckptr.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # Orbax raises several types for a foreign directory.
    raise ValueError(f"path does not hold a saved rm.Memory, got path={path!r}: {e}") from None
  if raw.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"path holds format_version={raw.get('format_version')!r}, this "
                     f"version reads {FORMAT_VERSION}: path={path!r}")
  meta = MemoryMeta(task=raw["task"], temperature=float(raw["temperature"]), dim=int(raw["dim"]),
                    n_outputs=int(raw["n_outputs"]), output_shape=tuple(raw["output_shape"]),
                    dtype=raw["dtype"], fingerprint=raw["fingerprint"])
  if task is not None and task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got task={task!r}")
  for name, want, have in (("task", task, meta.task), ("dim", dim, meta.dim),
                           ("n_outputs", n_outputs, meta.n_outputs),
                           ("fingerprint", fingerprint, meta.fingerprint)):
    if want is not None and want != have:
      raise ValueError(f"the memory at {path!r} has {name}={have!r}, got {name}={want!r}")

  n, c = int(raw["size"]), meta.n_outputs
  shapes = {"keys": ((n, meta.dim), meta.dtype), "residuals": ((n, c), "float32"),
            "outputs": ((n, c), "float32"),
            "targets": ((n,) if meta.task == "classification" else (n, c),
                        raw["targets_dtype"])}
  target = {name: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype),
                                       sharding=_row_sharding(sharding, len(shape), n))
            for name, (shape, dtype) in shapes.items()}
  arrays = ckptr.restore(path, args=ocp.args.Composite(
      arrays=ocp.args.StandardRestore(target)))["arrays"]
  return Memory(meta=meta, **{name: arrays[name] for name in _ARRAYS})


def _row_sharding(sharding, ndim: int, n: int):
  if sharding is None:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
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

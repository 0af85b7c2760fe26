"""One of several processes of a multi-host run: sharded kNN, memory and Orbax I/O.

Run by tests/test_multihost.py, which starts every process on this machine: each
calls `jax.distributed.initialize` with 2 CPU devices of its own (CPU collectives
over Gloo), as every host of a TPU pod slice would with its chips. Global arrays
then span devices that this process cannot read, which is what a pod slice does
and the one-process checks of tests/sharded_check.py cannot show. Every result is
compared with this process's own one-device search. Exits non-zero on a mismatch.

Usage: python tests/multihost_check.py PROCESS_ID N_PROCESSES PORT SHARED_DIR
"""

from __future__ import annotations

import os
import sys
import types
import warnings

import jax

jax.config.update("jax_num_cpu_devices", 2)

import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import resmem_jax as rm  # noqa: E402
from resmem_jax.kernels import IMPLEMENTATIONS, api  # noqa: E402
from resmem_jax.kernels.xla import knn_xla  # noqa: E402


def same(a, b, what):
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape or not np.array_equal(a, b):
    diff = np.argwhere(a != b) if a.shape == b.shape else (a.shape, b.shape)
    raise AssertionError(f"{what}: multi-host differs from one device at {diff[:5]}")


def close(a, b, what):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6, err_msg=what)


def local(x):
  """Committed to this process's first device: the one-device search to compare with."""
  return jax.device_put(x, jax.local_devices()[0])


def main():
  process_id, n_processes, port, shared = sys.argv[1:5]
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=int(n_processes),
                             process_id=int(process_id))
  assert jax.process_count() == int(n_processes), jax.process_count()
  assert jax.device_count() == 2 * jax.process_count(), jax.devices()
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  rows = NamedSharding(mesh, P("data", None))

  rng = np.random.default_rng(0)  # the same data on every process
  n, dim, n_q, n_classes = 512, 16, 37, 5
  keys = rng.normal(size=(n, dim)).astype(np.float32)
  queries = rng.normal(size=(n_q, dim)).astype(np.float32)
  keys[[150, 330, 460]] = keys[3]  # exact ties in other shards, and so other processes
  queries[5] = keys[3]
  labels = rng.integers(0, n_classes, n)
  logits = rng.normal(size=(n, n_classes)).astype(np.float32)
  q_logits = rng.normal(size=(n_q, n_classes)).astype(np.float32)

  # Keys over every process, placed from the whole array or from each process's rows.
  per_process = n // jax.process_count()
  own = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
  from_rows = jax.make_array_from_process_local_data(rows, keys[own])
  assert not from_rows.is_fully_addressable
  for placed, how in ((jax.device_put(keys, rows), "device_put"),
                      (from_rows, "make_array_from_process_local_data")):
    for k, metric, implementation in ((1, "l2", "xla"), (9, "l2", None), (40, "l2", "xla"),
                                      (9, "ip", "xla")):
      res = rm.knn(queries, placed, k, metric=metric, implementation=implementation)
      want = rm.knn(local(queries), local(keys), k, metric=metric,
                    implementation=implementation)
      what = f"knn {how} k={k} {metric} {implementation}"
      same(res.indices, want.indices, f"{what} indices")
      same(res.distances, want.distances, f"{what} distances")
  same(rm.knn(queries[5:6], from_rows, 4).indices, [[3, 150, 330, 460]],
       "ties across processes keep the lower global index first")
  # Inner products that tie within rounding (strong keys and their one-ulp neighbours):
  # the certificate cannot separate them, and the direct re-search of those rows runs
  # over the global mesh too.
  near = keys.copy()
  strong = rng.choice(n, 8, replace=False)
  for b in strong:
    for j in rng.choice(n, 6, replace=False):
      near[j] = np.nextafter(4 * keys[b], np.inf if j % 2 else -np.inf)
  near[strong] = 4 * keys[strong]
  redone = []
  redo = api._redo_uncertified  # pylint: disable=protected-access

  def counting(queries, keys, k, metric, distances, indices, certified, *rest):
    redone.append(int(np.sum(~np.asarray(certified))))
    return redo(queries, keys, k, metric, distances, indices, certified, *rest)

  api._redo_uncertified = counting  # pylint: disable=protected-access
  res = rm.knn(queries, jax.device_put(near, rows), 5, metric="ip")
  api._redo_uncertified = redo  # pylint: disable=protected-access
  assert sum(redone) > 0, redone
  want = rm.knn(local(queries), local(near), 5, metric="ip")
  same(res.indices, want.indices, "ip near-ties indices")
  same(res.distances, want.distances, "ip near-ties distances")
  jit_knn = jax.jit(lambda q, x: rm.knn(q, x, 9).indices)
  same(jit_knn(queries, from_rows), rm.knn(local(queries), local(keys), 9).indices,
       "knn under jit")

  # NumPy inputs large enough to split the queries over this process's 2 devices:
  # the result comes back to a device of this process.
  many = rng.normal(size=(2048, dim)).astype(np.float32)
  res = rm.knn(many, keys, 5)
  assert res.indices.is_fully_addressable, res.indices.sharding
  same(res.indices, rm.knn(local(many), local(keys), 5).indices, "query-parallel knn")

  # A memory built from global embeddings is split like them; it predicts, sweeps and
  # leaves one out like one device's.
  mem = rm.build_memory(local(keys), labels, logits, temperature=1.5)
  spread = rm.build_memory(from_rows, labels, logits, temperature=1.5)
  assert spread.residuals.sharding.spec[0] == "data", spread.residuals.sharding
  for kwargs in (dict(k=9, sigma=0.5), dict(k=9, sigma=0.5, exclude=np.arange(n_q))):
    want = rm.predict(mem, local(queries), local(q_logits), **kwargs)
    close(rm.predict(spread, queries, q_logits, **kwargs), want, f"predict {kwargs}")
    # Queries on one of this process's devices (a model's output, say), too.
    close(rm.predict(spread, local(queries), local(q_logits), **kwargs), want,
          f"predict, committed queries {kwargs}")
    close(rm.predict(rm.shard_memory(mem, mesh), queries, q_logits, **kwargs), want,
          f"predict after shard_memory {kwargs}")
  got = rm.sweep(spread, queries, q_logits, labels[:n_q], ks=(1, 4), sigmas=(0.5,))
  want = rm.sweep(mem, local(queries), local(q_logits), labels[:n_q], ks=(1, 4),
                  sigmas=(0.5,))
  assert got.table == want.table, (got.table, want.table)

  # Orbax: every process writes its rows of one saved memory, on a shared path.
  path = os.path.join(shared, "memory")
  assert rm.save_memory(path, spread) == path
  rm.save_memory(path, spread, overwrite=True)
  loaded = rm.load_memory(path, sharding=NamedSharding(mesh, P("data")), task="classification")
  assert loaded.keys.sharding.spec[0] == "data" and not loaded.keys.is_fully_addressable
  assert loaded.meta == spread.meta, (loaded.meta, spread.meta)
  whole = rm.load_memory(path)  # a whole copy on this process's first device
  assert whole.keys.devices() == {jax.local_devices()[0]}, whole.keys.devices()
  same(whole.keys, keys, "loaded keys")
  same(whole.targets, labels, "loaded labels")
  want = rm.predict(mem, local(queries), local(q_logits), k=9, sigma=0.5)
  close(rm.predict(loaded, queries, q_logits, k=9, sigma=0.5), want, "predict, loaded sharded")
  close(rm.predict(whole, queries, q_logits, k=9, sigma=0.5), want, "predict, loaded whole")
  # A memory this process holds alone cannot be saved by all: a clear error, no files.
  try:
    rm.save_memory(os.path.join(shared, "local"), mem)
  except ValueError as e:
    assert "held by this process alone" in str(e) and "rm.shard_memory" in str(e), e
  else:
    raise AssertionError("a process-local memory must not save on several processes")
  assert sorted(os.listdir(shared)) == ["memory"], os.listdir(shared)

  # Inputs that differ between processes would build global arrays that are neither,
  # or make one process fail a check alone while the others wait in a collective:
  # every process raises alike, before any other check, for NumPy input and for arrays
  # on one of this process's devices. (Before: silently placed, or a hang.)
  first = jax.process_index() == 0
  other = queries + np.float32(jax.process_index())
  negated = queries if first else -queries  # a plain weighted sum of bits missed this
  nan = queries.copy()
  nan[0, 0] = 0.5 if first else np.nan
  bad_labels = labels.copy()
  bad_labels[7] = 0 if first else n_classes
  longer = queries if first else np.concatenate([queries, queries[:20]])
  for call, how in (
      (lambda: rm.knn(other, from_rows, 3), "NumPy queries"),
      (lambda: rm.knn(local(negated), from_rows, 3), "committed negated queries"),
      (lambda: rm.knn(nan, from_rows, 3), "a NaN on one process"),
      (lambda: rm.predict(spread, queries, local(q_logits + other[:, :5]), k=3, sigma=0.5),
       "committed logits"),
      (lambda: rm.predict(spread, longer, np.zeros((len(longer), n_classes), np.float32), k=3,
                          sigma=0.5, query_chunk=16), "more queries on one process"),
      (lambda: rm.predict(spread, queries, q_logits, k=3 if first else 4, sigma=0.5),
       "another k"),
      (lambda: rm.build_memory(from_rows, labels, logits if first else -logits),
       "negated NumPy logits"),
      (lambda: rm.build_memory(from_rows, bad_labels, logits), "a bad label on one process"),
      (lambda: rm.shard_memory(rm.build_memory(local(keys), labels,
                                               logits if first else -logits), mesh),
       "another memory to shard"),
      (lambda: rm.sweep(spread, queries, q_logits, labels[:n_q], ks=(1, 4),
                        sigmas=(0.5,) if first else (0.7,)), "another sweep grid")):
    try:
      call()
    except ValueError as e:
      assert "differ between processes: processes [1] hold" in str(e), (how, e)
    else:
      raise AssertionError(f"{how} that differ between processes must raise")

  # The default kernel's check gives one verdict on every process: here the kernel
  # fails on process 1 only (a chip of its own, say), and both take the XLA path
  # (with a verdict each, process 0 would run the kernel and wait for process 1).
  def kernel_failing_on_process_1(queries, keys, k, *, metric, block_sizes, centring):
    del block_sizes
    if jax.process_index() == 1:
      raise NotImplementedError("no lowering for this op on this chip")
    return knn_xla(queries, keys, k, metric=metric, centring=centring)

  saved = api._platform, api._pallas_knn, IMPLEMENTATIONS.get("pallas")  # pylint: disable=protected-access
  api._platform = lambda: "tpu"  # pylint: disable=protected-access
  api._pallas_knn = types.SimpleNamespace(  # pylint: disable=protected-access
      is_supported=lambda **_: True, backend_for=lambda platform: "tpu",
      max_k=lambda backend, metric: 256, uses_pairs=lambda *_: False)
  IMPLEMENTATIONS["pallas"] = kernel_failing_on_process_1
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      res = rm.knn(queries, from_rows, 5)
    assert api._PALLAS_FAILED == {"tpu"}, api._PALLAS_FAILED  # pylint: disable=protected-access
    assert any("using the XLA path" in str(w.message) for w in caught), caught
    same(res.indices, rm.knn(local(queries), local(keys), 5).indices,
         "knn after a kernel check that failed on one process")
  finally:
    api._platform, api._pallas_knn = saved[:2]  # pylint: disable=protected-access
    if saved[2] is not None:
      IMPLEMENTATIONS["pallas"] = saved[2]
  print(f"MULTIHOST OK {jax.process_index()}")


if __name__ == "__main__":
  main()

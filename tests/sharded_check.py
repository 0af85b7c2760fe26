"""Sharded kNN and memory on 8 fake CPU devices must equal one device exactly.

Run by tests/test_sharded.py in its own process: the device count is fixed when JAX
starts, so XLA_FLAGS is set here before `import jax`. Exits non-zero on any mismatch.
Usage: python tests/sharded_check.py [orbax_dir]
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import resmem_jax as rm  # noqa: E402
from resmem_jax.kernels import IMPLEMENTATIONS, sharded  # noqa: E402
from resmem_jax.sweep import _grid_sums  # noqa: E402


def same(a, b, what):
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape or not np.array_equal(a, b):
    diff = np.argwhere(a != b) if a.shape == b.shape else a.shape
    raise AssertionError(f"{what}: sharded differs from one device at {diff[:5]}")


def on_device_0(x):
  """Committed to one device: `knn` then stays there instead of splitting the queries."""
  return jax.device_put(x, jax.devices()[0])


def check_knn(mesh, spec, keys, queries, k, metric, implementation, what):
  single = rm.knn(on_device_0(queries), on_device_0(keys), k, metric=metric,
                  implementation=implementation)
  assert len(single.indices.devices()) == 1
  placed = jax.device_put(keys, NamedSharding(mesh, spec))
  res = rm.knn(queries, placed, k, metric=metric, implementation=implementation)
  same(res.indices, single.indices, f"{what} indices")
  same(res.distances, single.distances, f"{what} distances")
  # Uncommitted inputs: the queries are split over the 8 CPU devices, the keys copied.
  split = rm.knn(queries, keys, k, metric=metric, implementation=implementation)
  assert split.indices.devices() == {jax.devices()[0]}, split.indices.sharding
  same(split.indices, single.indices, f"{what} query-parallel indices")
  same(split.distances, single.distances, f"{what} query-parallel distances")


def check_placement(keys, queries, labels, logits, q_logits):
  """Inputs committed to different devices meet where the keys are: JAX alone refuses
  one computation on them. Same answers as one device."""
  dev = jax.devices()
  want = rm.knn(on_device_0(queries), on_device_0(keys), 5)
  res = rm.knn(jax.device_put(queries, dev[1]), jax.device_put(keys, dev[2]), 5)
  assert res.indices.devices() == {dev[2]}, res.indices.devices()
  same(res.indices, want.indices, "queries on device 1, keys on device 2: indices")
  same(res.distances, want.distances, "queries on device 1, keys on device 2: distances")
  # Queries not placed (NumPy) and keys committed to device 2: the search stays with
  # the keys (`query_mesh` never splits a placed input over the CPU devices).
  res = rm.knn(queries, jax.device_put(keys, dev[2]), 5)
  assert res.indices.devices() == {dev[2]}, res.indices.devices()
  same(res.indices, want.indices, "NumPy queries, keys on device 2")
  # Queries split over a mesh (a data-parallel model's output), keys on one device.
  mesh = jax.make_mesh((8,), ("batch",))
  split = lambda x: jax.device_put(x, NamedSharding(mesh, P("batch")))
  same(rm.knn(split(queries[:32]), jax.device_put(keys, dev[2]), 5).indices,
       want.indices[:32], "queries split over a mesh, keys on device 2")

  mem = rm.build_memory(on_device_0(keys), labels, logits, temperature=1.5)
  moved = rm.build_memory(jax.device_put(keys, dev[2]), labels, logits, temperature=1.5)
  for name in ("keys", "residuals", "outputs", "targets"):
    assert getattr(moved, name).devices() == {dev[2]}, (name, getattr(moved, name).devices())
  exclude = np.arange(len(queries))
  want = rm.predict(mem, queries, q_logits, k=9, sigma=0.5, exclude=exclude)
  got = rm.predict(moved, jax.device_put(queries, dev[1]), jax.device_put(q_logits, dev[3]),
                   k=9, sigma=0.5, exclude=jax.device_put(exclude, dev[4]))
  assert got.devices() == {dev[2]}, got.devices()
  same(got, want, "predict, memory on device 2, inputs on devices 1, 3 and 4")
  got = rm.sweep(moved, jax.device_put(queries, dev[1]), jax.device_put(q_logits, dev[3]),
                 labels[:len(queries)], ks=(1, 4), sigmas=(0.5,))
  assert got.table == rm.sweep(mem, queries, q_logits, labels[:len(queries)], ks=(1, 4),
                               sigmas=(0.5,)).table
  # Queries and logits split over an Explicit mesh, the memory on the default device:
  # the search runs on the queries' split (XLA partitions it), and so does the rest.
  plain = rm.build_memory(keys, labels, logits, temperature=1.5)
  np.testing.assert_allclose(
      rm.predict(plain, split(queries[:32]), split(q_logits[:32]), k=9, sigma=0.5),
      rm.predict(mem, queries[:32], q_logits[:32], k=9, sigma=0.5), rtol=0, atol=1e-6)


def check_every_shard_certifies(mesh):
  """A row is exact only if every shard's local search is: one shard failing its
  certificate sends the whole row to the direct search, whatever the others say. A
  kernel double that misses the nearest key and leaves its last slot unfilled (inf,
  which the certificate catches) on the shard holding a marker key, and only there,
  must still give one device's answer."""
  xla = IMPLEMENTATIONS["xla"]
  rng = np.random.default_rng(4)
  keys = rng.normal(size=(256, 8)).astype(np.float32)  # shapes no other check searches
  keys[200, 0] = 1e3  # the marker, in shard 6 (rows 192-223), far from every query
  queries = keys[208:224] + np.float32(1e-2) * rng.normal(size=(16, 8)).astype(np.float32)
  want = rm.knn(on_device_0(queries), on_device_0(keys), 3, implementation="xla")

  def misses_on_the_marked_shard(queries, keys, k, **kwargs):
    scores, idx = xla(queries, keys, k + 1, **kwargs)
    marked = jnp.any(keys[:, 0] > 100)
    missed = scores[:, 1:].at[:, -1].set(jnp.inf)
    return (jnp.where(marked, missed, scores[:, :k]), jnp.where(marked, idx[:, 1:], idx[:, :k]))

  IMPLEMENTATIONS["xla"] = misses_on_the_marked_shard
  try:
    res = rm.knn(queries, jax.device_put(keys, NamedSharding(mesh, P("data", None))), 3,
                 implementation="xla")
  finally:
    IMPLEMENTATIONS["xla"] = xla
  same(res.indices, want.indices, "one shard uncertified: indices")
  same(res.distances, want.distances, "one shard uncertified: distances")


def check_sweep_scratch(mesh):
  """A sweep over a row-sharded memory gathers its neighbour rows per batch of queries,
  within the grid budget, as one device does: it gathered a whole chunk's (Q, k, C)
  rows at once (12 GiB of scratch per device at Q = 32768, k = 50, C = 1000)."""
  rng = np.random.default_rng(3)
  n, c, q, k = 128, 1000, 32768, 50
  mem = rm.build_memory(rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, c, n),
                        rng.normal(size=(n, c)).astype(np.float32))
  sds = jax.ShapeDtypeStruct
  scratch = {}
  for name, m in (("one device", mem), ("sharded", rm.shard_memory(mem, mesh))):
    compiled = _grid_sums.lower(
        sds((q, k), jnp.float32), sds((q, k), jnp.int32), sds((q, c), jnp.float32),
        sds((q,), jnp.int32), sds((q,), jnp.bool_), m.outputs, m.targets,
        jnp.ones(3, jnp.float32), jnp.ones(5, jnp.float32), task="classification",
        ks=(1, 10, 50), temperatures=(1.0,), batch=16,
        placement=sharded.placement(m.outputs)).compile()
    scratch[name] = compiled.memory_analysis().temp_size_in_bytes
  assert scratch["sharded"] < 2 * scratch["one device"] + (64 << 20), scratch


def main():
  assert jax.device_count() == 8, jax.devices()
  # Small enough inputs to split over 8 devices here; the production threshold
  # (1024 queries per device) leaves them on one.
  sharded.MIN_QUERIES_PER_DEVICE = 1
  rng = np.random.default_rng(0)
  mesh = jax.make_mesh((8,), ("data",))
  mesh2 = jax.make_mesh((4, 2), ("data", "model"))
  keys = rng.normal(size=(512, 16)).astype(np.float32)
  queries = rng.normal(size=(37, 16)).astype(np.float32)
  # Exact ties across shards: duplicates of row 3 in shards 2, 5 and 7 (64 rows each).
  keys[[150, 330, 460]] = keys[3]
  queries[5] = keys[3]
  offset = keys + 1e4  # far from the origin: needs the global-mean centring

  # The reference search is the XLA one's oracle elsewhere: here it runs the merge on a
  # few cases, the XLA search (the default) on all of them.
  cases = {"reference": ((1, "l2"), (100, "ip")),
           "xla": ((1, "l2"), (10, "ip"), (64, "l2"), (100, "l2"), (100, "ip"))}
  for implementation in ("reference", "xla"):
    # 100 > 64 rows per shard: every local row is a candidate.
    for k, metric in cases[implementation]:
      check_knn(mesh, P("data", None), keys, queries, k, metric, implementation,
                f"knn {implementation} k={k} {metric}")
    check_knn(mesh, P("data", None), offset, offset[:20] + 0.1, 5, "l2", implementation,
              f"offset {implementation}")
    # Inner products that tie within float32 rounding, on different shards: a few
    # strong keys and one-ulp neighbours of them. One device and the merge used to
    # keep different ones (203 of 3072 rows in a sweep like this) before ip had the
    # certificate's margin; such near-ties now fail it on both and go to the fallback.
    near = keys.copy()
    strong = rng.choice(512, 8, replace=False)
    for b in strong:
      for j in rng.choice(512, 6, replace=False):
        near[j] = np.nextafter(4 * keys[b], np.inf if j % 2 else -np.inf)
    near[strong] = 4 * keys[strong]
    for k in (1, 5, 10) if implementation == "xla" else (5,):
      check_knn(mesh, P("data", None), near, queries, k, "ip", implementation,
                f"ip near-ties {implementation} k={k}")
  # All k nearest in one shard: sorted by norm, shard 0 holds the 64 keys nearest to a
  # query at the origin, so at k = 64 (its row count) it must give all of them.
  by_norm = keys[np.argsort(np.linalg.norm(keys, axis=1), kind="stable")]
  origin = queries.copy()
  origin[0] = 0
  check_knn(mesh, P("data", None), by_norm, origin, 64, "l2", "xla", "all 64 nearest in shard 0")
  # Inner products of data offset by 1e4 all tie within float32 rounding: every row
  # fails the certificate and is searched directly. Its key tiles shrank to N (200 on
  # one device, 25 on a shard), which rounded the sums over D differently: 42 of 64
  # rows kept another key at k = 3 than one device. Tiles of one shape: the same bits.
  tied = (1e4 + 1e-2 * np.random.default_rng(1).standard_normal((264, 4))).astype(np.float32)
  check_knn(mesh, P("data", None), tied[:200], tied[200:], 3, "ip", "xla", "ip offset 1e4")
  check_knn(mesh2, P("data", None), keys, queries, 7, "l2", "xla", "2-D mesh, rows on 'data'")
  check_knn(mesh2, P(("data", "model"), None), keys, queries, 7, "l2", "xla",
            "2-D mesh, rows on ('data', 'model')")
  # A query count that is no multiple of 8 (the bucket of 37 is 40 = 8 x 5) and one
  # that gives a device two rows (9 pads to 16), through the query-parallel path.
  for n_q in (37, 9):
    assert sharded.query_mesh(queries[:n_q], keys) is not None
    same(rm.knn(queries[:n_q], keys, 5).indices,
         rm.knn(on_device_0(queries[:n_q]), on_device_0(keys), 5).indices,
         f"query-parallel, {n_q} queries")
  assert sharded.query_mesh(on_device_0(queries), keys) is None
  # As many devices as get 64 queries each (the production rule with 64 for 1024),
  # and as the key copies allow.
  sharded.MIN_QUERIES_PER_DEVICE = 64
  assert sharded.query_mesh(queries[:8].repeat(16, 0)[:127], keys) is None  # 127 < 2 x 64
  assert sharded.query_mesh(queries[:8].repeat(40, 0), keys).size == 5  # 320 // 64
  assert sharded.query_mesh(queries[:8].repeat(64, 0), keys).size == 8
  sharded.MAX_EXTRA_KEY_BYTES = 3 * keys.nbytes  # room for 3 more copies: 4 devices
  mesh4 = sharded.query_mesh(queries[:8].repeat(64, 0), keys)
  assert mesh4.size == 4, mesh4
  same(rm.knn(queries[:8].repeat(40, 0), keys, 5).indices,
       rm.knn(on_device_0(queries[:8].repeat(40, 0)), on_device_0(keys), 5).indices,
       "query-parallel over 4 of 8 devices")
  sharded.MAX_EXTRA_KEY_BYTES = keys.nbytes - 1  # not even one copy: one device
  assert sharded.query_mesh(queries[:8].repeat(64, 0), keys) is None
  sharded.MIN_QUERIES_PER_DEVICE, sharded.MAX_EXTRA_KEY_BYTES = 1, 1 << 30

  tied = rm.knn(queries[5:6], jax.device_put(keys, NamedSharding(mesh, P("data", None))), 4)
  same(tied.indices, [[3, 150, 330, 460]], "ties order by global index")

  # The sharded result is replicated over the mesh.
  res = rm.knn(queries, jax.device_put(keys, NamedSharding(mesh, P("data", None))), 3)
  assert res.indices.sharding.is_fully_replicated, res.indices.sharding

  check_placement(keys, queries, rng.integers(0, 5, 512),
                  rng.normal(size=(512, 5)).astype(np.float32),
                  rng.normal(size=(37, 5)).astype(np.float32))

  # A row-sharded memory predicts (and leaves one out) exactly like one device.
  labels = rng.integers(0, 5, 512)
  logits = rng.normal(size=(512, 5)).astype(np.float32)
  q_logits = rng.normal(size=(37, 5)).astype(np.float32)
  mem = rm.build_memory(keys, labels, logits, task="classification", temperature=1.5)
  placed = rm.shard_memory(mem, mesh)
  assert placed.residuals.sharding.spec[0] == "data"
  for exclude in (None, np.arange(37)):
    want = rm.predict(mem, queries, q_logits, k=9, sigma=0.5, exclude=exclude)
    np.testing.assert_allclose(
        rm.predict(placed, queries, q_logits, k=9, sigma=0.5, exclude=exclude), want,
        rtol=0, atol=1e-6)
    # Inputs committed to one device (a model's output, say) meet the memory's mesh too.
    np.testing.assert_allclose(
        rm.predict(placed, on_device_0(queries), on_device_0(q_logits), k=9, sigma=0.5,
                   exclude=None if exclude is None else on_device_0(exclude)), want,
        rtol=0, atol=1e-6)
  # A memory split over a 2-D mesh, by "data" alone (the "model" axis holds replicas)
  # and by both axes: a device owns the rows at its index along the row axes only,
  # N / (devices along them) of them.
  want = rm.predict(mem, queries, q_logits, k=9, sigma=0.5)
  for axis in ("data", ("data", "model")):
    np.testing.assert_allclose(
        rm.predict(rm.shard_memory(mem, mesh2, axis), queries, q_logits, k=9, sigma=0.5),
        want, rtol=0, atol=1e-6, err_msg=f"predict, memory on mesh2 split by {axis}")
  # Under an outer jit, as an argument: `jax.make_mesh` gives Explicit axes, whose split
  # the tracers' types carry (the sharded search then runs as eagerly); under Auto axes
  # the types carry none and XLA partitions the plain search.
  auto = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  jit_predict = jax.jit(lambda m, e, z: rm.predict(m, e, z, k=9, sigma=0.5))
  jit_knn = jax.jit(lambda q, x: rm.knn(q, x, 9))
  for axes_mesh in (mesh, auto):
    placed_jit = rm.shard_memory(mem, axes_mesh)
    np.testing.assert_allclose(jit_predict(placed_jit, queries, q_logits),
                               rm.predict(mem, queries, q_logits, k=9, sigma=0.5),
                               rtol=0, atol=1e-6)
    same(jit_knn(queries, placed_jit.keys).indices, rm.knn(queries, keys, 9).indices,
         f"knn under jit, keys sharded over {axes_mesh.axis_types}")
  # Other splits on an Explicit mesh (data-parallel queries, keys split along D) are
  # searched too, eagerly and under jit, with the one-device neighbours.
  want = rm.knn(queries[:32], keys, 6).indices
  split_queries = jax.device_put(queries[:32], NamedSharding(mesh, P("data", None)))
  split_dims = jax.device_put(keys, NamedSharding(mesh, P(None, "data")))
  for q_in, x_in, what in ((split_queries, keys, "queries split by rows"),
                           (queries[:32], split_dims, "keys split along D"),
                           (split_queries, split_dims, "both")):
    same(rm.knn(q_in, x_in, 6).indices, want, f"{what} on an Explicit mesh")
    same(jit_knn(q_in, x_in).indices[:, :6], want, f"{what} on an Explicit mesh, under jit")
  got = rm.sweep(placed, queries, q_logits, labels[:37], ks=(1, 4), sigmas=(0.5,))
  want = rm.sweep(mem, queries, q_logits, labels[:37], ks=(1, 4), sigmas=(0.5,))
  assert got.table == want.table, (got.table, want.table)
  # Regression: the residuals are gathered from their owners, as the logits above.
  targets, outputs = rng.normal(size=(2, 512, 2)).astype(np.float32)
  reg = rm.build_memory(keys, targets, outputs, task="regression")
  q_out, q_y = rng.normal(size=(2, 37, 2)).astype(np.float32)
  got = rm.sweep(rm.shard_memory(reg, mesh), queries, q_out, q_y, ks=(1, 4), sigmas=(0.5,))
  want = rm.sweep(reg, queries, q_out, q_y, ks=(1, 4), sigmas=(0.5,))
  assert got.table == want.table, (got.table, want.table)
  check_sweep_scratch(mesh)
  check_every_shard_certifies(mesh)
  try:
    rm.shard_memory(rm.build_memory(keys[:500], labels[:500], logits[:500]), mesh)
  except ValueError as e:
    assert "N=500" in str(e), e
  else:
    raise AssertionError("an uneven memory must not shard")

  if len(sys.argv) > 1:  # Orbax round trip straight into the sharded layout.
    path = os.path.join(sys.argv[1], "memory")
    rm.save_memory(path, mem)
    loaded = rm.load_memory(path, sharding=NamedSharding(mesh, P("data")))
    assert loaded.keys.sharding.spec[0] == "data", loaded.keys.sharding
    assert loaded.meta == mem.meta
    same(loaded.keys, mem.keys, "loaded keys")
    np.testing.assert_allclose(rm.predict(loaded, queries, q_logits, k=9, sigma=0.5),
                               rm.predict(mem, queries, q_logits, k=9, sigma=0.5), atol=1e-7)
  print("SHARDED OK")


if __name__ == "__main__":
  main()

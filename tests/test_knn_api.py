"""The public `knn` wrapper: input validation, query buckets, and compile-cache reuse."""

from __future__ import annotations

import functools
import math
import re
import types
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resmem_jax
from resmem_jax.kernels import IMPLEMENTATIONS, BlockSizes, query_bucket
from resmem_jax.kernels import api
from resmem_jax.kernels.xla import knn_xla


def _data(n_q=5, n=20, dim=3, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n_q, dim)).astype(np.float32),
          rng.standard_normal((n, dim)).astype(np.float32))


def _raises(error, *fragments):
  """pytest.raises whose message must contain every fragment (argument name, value)."""
  return pytest.raises(error, match=".*".join(re.escape(f) for f in fragments))


# --------------------------------------------------------------------------------------
# Bad input: every case names the argument and the offending value.


@pytest.mark.parametrize("name", ["queries", "keys"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(name, bad):
  queries, keys = _data()
  arrays = {"queries": queries, "keys": keys}
  arrays[name][2, 1] = bad
  with _raises(ValueError, f"{name} must be finite", f"{name}[2, 1]={bad}"):
    resmem_jax.knn(arrays["queries"], arrays["keys"], 3)


def test_non_finite_jax_array():
  queries, keys = _data()
  keys = jnp.asarray(keys).at[4, 0].set(jnp.nan)
  with _raises(ValueError, "keys", "keys[4, 0]=nan"):
    resmem_jax.knn(queries, keys, 3)


def test_float64_beyond_float32_range():
  """float64 values JAX computes in float32 (x64 off) must fit it, or they become inf."""
  queries, keys = _data()
  keys = keys.astype(np.float64)
  keys[6, 2] = -4e38
  with _raises(ValueError, "keys must be finite in float32", "keys[6, 2]=-4e+38"):
    resmem_jax.knn(queries, keys, 3)


def test_closed_over_keys_under_jit_are_checked_and_searched():
  queries, keys = _data()
  device_keys = jnp.asarray(keys)
  got = jax.jit(lambda q: resmem_jax.knn(q, device_keys, 4))(queries)
  want = resmem_jax.knn(queries, keys, 4)
  np.testing.assert_array_equal(got.indices, want.indices)
  bad = device_keys.at[1, 1].set(jnp.inf)
  with _raises(ValueError, "keys must be finite", "keys[1, 1]=inf"):
    jax.jit(lambda q: resmem_jax.knn(q, bad, 4))(queries)


@pytest.mark.parametrize("k", [0, -1, 21])
def test_k_out_of_range(k):
  queries, keys = _data(n=20)
  with _raises(ValueError, "k", "<= 20", f"k={k}"):
    resmem_jax.knn(queries, keys, k)


@pytest.mark.parametrize("k", [2.0, "3", None, True, np.float32(2)])
def test_k_not_int(k):
  queries, keys = _data()
  with _raises(TypeError, "k must be an int", f"k={k!r}"):
    resmem_jax.knn(queries, keys, k)


def test_numpy_int_k_is_accepted():
  queries, keys = _data()
  assert resmem_jax.knn(queries, keys, np.int64(3)).indices.shape == (5, 3)


def test_mismatched_dimension():
  queries, keys = _data(dim=3)
  with _raises(ValueError, "queries.shape=(5, 3)", "keys.shape=(20, 4)"):
    resmem_jax.knn(queries, np.zeros((20, 4), np.float32), 3)


@pytest.mark.parametrize("name", ["queries", "keys"])
@pytest.mark.parametrize("shape", [(6,), (2, 3, 4), ()])
def test_wrong_rank(name, shape):
  queries, keys = _data()
  arrays = {"queries": queries, "keys": keys}
  arrays[name] = np.zeros(shape, np.float32)
  with _raises(ValueError, f"{name} must be", f"{name}.shape={shape}"):
    resmem_jax.knn(arrays["queries"], arrays["keys"], 1)


def test_empty_keys():
  queries, _ = _data()
  with _raises(ValueError, "keys", "keys.shape=(0, 3)"):
    resmem_jax.knn(queries, np.zeros((0, 3), np.float32), 1)


@pytest.mark.parametrize("name", ["queries", "keys"])
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.uint8])
def test_non_floating_dtype(name, dtype):
  queries, keys = _data()
  arrays = {"queries": queries, "keys": keys}
  arrays[name] = arrays[name].astype(dtype)
  with _raises(TypeError, f"{name} must have a floating dtype", f"{name}.dtype={np.dtype(dtype)}"):
    resmem_jax.knn(arrays["queries"], arrays["keys"], 1)


def test_ragged_list_input():
  _, keys = _data()
  with _raises(TypeError, "queries must be an array"):
    resmem_jax.knn([[1.0, 2.0, 3.0], [1.0]], keys, 1)


@pytest.mark.parametrize("metric", ["cosine", "L2", None])
def test_unknown_metric(metric):
  queries, keys = _data()
  with _raises(ValueError, "metric must be one of", "'l2'", "'ip'", f"metric={metric!r}"):
    resmem_jax.knn(queries, keys, 1, metric=metric)


@pytest.mark.parametrize("implementation", ["faiss", "XLA", ""])
def test_unknown_implementation(implementation):
  queries, keys = _data()
  with _raises(ValueError, "implementation must be one of", "'xla'",
               f"implementation={implementation!r}"):
    resmem_jax.knn(queries, keys, 1, implementation=implementation)


@pytest.mark.skipif("pallas" in IMPLEMENTATIONS, reason="the Pallas kernel is installed here")
def test_unavailable_pallas_names_the_alternatives():
  queries, keys = _data()
  with _raises(ValueError, "implementation='pallas'", "not available", "'reference'", "'xla'"):
    resmem_jax.knn(queries, keys, 1, implementation="pallas")


def test_block_sizes_type():
  queries, keys = _data()
  with _raises(TypeError, "block_sizes must be a BlockSizes", "(8, 64)"):
    resmem_jax.knn(queries, keys, 1, block_sizes=(8, 64))


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(block_q=0), "BlockSizes.block_q must be a positive int, got 0"),
    (dict(block_n=2.5), "BlockSizes.block_n must be a positive int, got 2.5"),
    (dict(chunk=-1), "BlockSizes.chunk must be a non-negative int, got -1"),
    (dict(block_n=100, chunk=32), "BlockSizes.block_n=100 must be a multiple of chunk=32"),
])
def test_bad_block_sizes(kwargs, fragment):
  with _raises(ValueError, fragment):
    BlockSizes(**kwargs)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_input_under_jit_is_marked(bad):
  """Under jit values cannot be checked: a bad query row, or any bad key, comes back
  as NaN distances and index -1 (an inf query used to return index N, past the keys)."""
  queries, keys = _data(n_q=12, n=50, dim=4)
  want = resmem_jax.knn(queries, keys, 3)
  search = jax.jit(lambda q, x: resmem_jax.knn(q, x, 3))
  got = search(_set(queries, (3, 1), bad), keys)
  assert np.all(np.isnan(got.distances[3])) and np.all(got.indices[3] == -1)
  rest = np.arange(12) != 3
  np.testing.assert_array_equal(got.indices[rest], want.indices[rest])
  np.testing.assert_array_equal(got.distances[rest], want.distances[rest])
  got = search(queries, _set(keys, (7, 0), bad))
  assert np.all(np.isnan(got.distances)) and np.all(got.indices == -1)


def _set(x, where, value):
  x = x.copy()
  x[where] = value
  return x


def test_zero_columns_named():
  """D = 0 reached math.log2(0) in the search scale: 'math domain error'."""
  with _raises(ValueError, "at least one column", "(2, 0)", "(3, 0)"):
    resmem_jax.knn(np.zeros((2, 0), np.float32), np.zeros((3, 0), np.float32), 2)


def test_the_default_is_chosen_for_the_promoted_dtype(monkeypatch):
  """With x64 on, float32 queries and float64 keys are searched in float64, which the
  kernel does not take: the default was picked from the queries' dtype alone, so the
  kernel was tried, failed, and was switched off for every later float32 search."""
  if "pallas" not in IMPLEMENTATIONS:
    pytest.skip("the Pallas kernel is not installed here")
  monkeypatch.setattr(api, "_platform", lambda: "gpu")
  monkeypatch.setattr(api, "_PALLAS_FAILED", set())
  assert api.default_implementation(300, 700, 5, 6, jnp.float32) == "pallas"
  queries, keys = _data(n_q=300, n=700, dim=6)
  with jax.enable_x64(True), warnings.catch_warnings():
    warnings.simplefilter("error")
    res = resmem_jax.knn(queries, keys.astype(np.float64), 5)
    empty = resmem_jax.knn(queries[:0].astype(np.float64), keys.astype(np.float64), 5)
  assert not api._PALLAS_FAILED
  assert res.distances.dtype == jnp.float64
  assert empty.distances.dtype == jnp.float64 and empty.distances.shape == (0, 5)


def test_bad_input_raises_before_compiling(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("the search ran on bad input")

  monkeypatch.setitem(IMPLEMENTATIONS, "xla", fail)
  queries, keys = _data()
  keys[0, 0] = np.nan
  with pytest.raises(ValueError):
    resmem_jax.knn(queries, keys, 1, implementation="xla")


# --------------------------------------------------------------------------------------
# A default kernel that fails on the user's chip: the XLA path takes over, once.


def _kernel_that_does_not_compile(calls):
  def knn_pallas(queries, keys, k, *, metric, block_sizes, centring):
    calls.append(k)
    raise NotImplementedError("no Mosaic lowering for this op on this chip\n(long log)")
  return knn_pallas


@pytest.fixture
def broken_default_kernel(monkeypatch):
  """A TPU whose Pallas kernel, the default, fails to compile; returns its call log."""
  calls = []
  monkeypatch.setattr(api, "_platform", lambda: "tpu")
  monkeypatch.setattr(api, "_pallas_knn", types.SimpleNamespace(
      is_supported=lambda **_: True, backend_for=lambda platform: "tpu",
      max_k=lambda backend, metric: 256, uses_pairs=lambda *_: False))
  monkeypatch.setattr(api, "_PALLAS_FAILED", set())
  monkeypatch.setattr(api, "_PALLAS_CHECKED", set())
  monkeypatch.setitem(IMPLEMENTATIONS, "pallas", _kernel_that_does_not_compile(calls))
  return calls


def test_a_failing_default_kernel_falls_back_to_xla_once(broken_default_kernel):
  queries, keys = _data(n_q=300, n=700, dim=6, seed=1)
  assert api.default_implementation(300, 700, 5, 6, jnp.float32) == "pallas"
  with pytest.warns(UserWarning, match="Pallas kernel, the default on tpu, failed "
                    r"\(NotImplementedError: no Mosaic lowering .*XLA path"):
    result = resmem_jax.knn(queries, keys, 5)
  expected = resmem_jax.knn(queries, keys, 5, implementation="xla")
  np.testing.assert_array_equal(np.asarray(result.indices), np.asarray(expected.indices))
  np.testing.assert_array_equal(np.asarray(result.distances), np.asarray(expected.distances))
  assert len(broken_default_kernel) == 1
  # From now on the default is the XLA path: no second try, no second warning.
  assert api.default_implementation(300, 700, 5, 6, jnp.float32) == "xla"
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    again = resmem_jax.knn(queries, keys, 5)
  np.testing.assert_array_equal(np.asarray(again.indices), np.asarray(expected.indices))
  assert len(broken_default_kernel) == 1


def _kernel_that_raises(error, calls):
  def knn_pallas(queries, keys, k, *, metric, block_sizes, centring):
    calls.append(k)
    raise error
  return knn_pallas


@pytest.mark.parametrize("jit", [False, True])
def test_the_check_runs_under_the_callers_mesh(broken_default_kernel, monkeypatch, jit):
  """`jax.set_mesh` holds per thread, and the check runs in a thread of its own. A
  kernel that fails under the caller's mesh alone (Pallas's interpreter does under
  an Explicit one) passed the check, then failed in the caller's search, raised
  under jit. The check now runs under the caller's mesh and sees it fail."""
  xla, meshes = IMPLEMENTATIONS["xla"], []

  def fails_under_a_mesh(queries, keys, k, **kwargs):
    meshes.append(jax.sharding.get_abstract_mesh())
    if not meshes[-1].empty:
      raise NotImplementedError("not under a mesh")
    return xla(queries, keys, k, **kwargs)

  monkeypatch.setitem(IMPLEMENTATIONS, "pallas", fails_under_a_mesh)
  queries, keys = _data(n_q=300, n=700, dim=6, seed=3)
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  search = lambda q, x: resmem_jax.knn(q, x, 5).indices  # noqa: E731
  with jax.set_mesh(mesh):
    with pytest.warns(UserWarning, match="failed \\(NotImplementedError: not under a mesh"):
      got = (jax.jit(search) if jit else search)(queries, keys)
  assert len(meshes) == 1 and meshes[0].axis_names == ("data",), meshes
  assert not api._PALLAS_CHECKED and api._PALLAS_FAILED == {"tpu"}
  np.testing.assert_array_equal(got, resmem_jax.knn(queries, keys, 5, implementation="xla").indices)


def test_a_kernel_checked_without_a_mesh_is_checked_again_under_one(broken_default_kernel,
                                                                   monkeypatch):
  """A configuration that passed the check without a mesh skipped it under one, and a
  kernel failing there alone was then raised under jit."""
  xla = IMPLEMENTATIONS["xla"]

  def fails_under_a_mesh(queries, keys, k, **kwargs):
    if not jax.sharding.get_abstract_mesh().empty:
      raise NotImplementedError("not under a mesh")
    return xla(queries, keys, k, **kwargs)

  monkeypatch.setitem(IMPLEMENTATIONS, "pallas", fails_under_a_mesh)
  # Shapes no other test searches: a kernel double that runs is compiled into the
  # search's jit cache, whose key does not hold IMPLEMENTATIONS.
  queries, keys = _data(n_q=300, n=640, dim=5, seed=4)
  want = resmem_jax.knn(queries, keys, 5, implementation="xla").indices
  np.testing.assert_array_equal(resmem_jax.knn(queries, keys, 5).indices, want)
  assert len(api._PALLAS_CHECKED) == 1 and not api._PALLAS_FAILED
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    with pytest.warns(UserWarning, match="NotImplementedError: not under a mesh"):
      got = jax.jit(lambda q, x: resmem_jax.knn(q, x, 5).indices)(queries, keys)
  np.testing.assert_array_equal(got, want)
  assert len(api._PALLAS_CHECKED) == 1 and api._PALLAS_FAILED == {"tpu"}


def test_the_device_running_out_of_memory_is_raised_and_keeps_the_kernel(
    broken_default_kernel, monkeypatch):
  """Out of device memory depends on what else the process holds, not on the kernel:
  the error reaches the caller and the kernel stays the default."""
  calls = []
  oom = jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1073741824 bytes.")
  monkeypatch.setitem(IMPLEMENTATIONS, "pallas", _kernel_that_raises(oom, calls))
  queries, keys = _data(n_q=300, n=700, dim=6)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with pytest.raises(jax.errors.JaxRuntimeError, match="Out of memory"):
      resmem_jax.knn(queries, keys, 5)
  assert calls and not api._PALLAS_FAILED
  assert api.default_implementation(300, 700, 5, 6, jnp.float32) == "pallas"


def test_a_kernel_over_the_chips_shared_memory_falls_back(broken_default_kernel, monkeypatch):
  """Triton's "Shared memory size limit exceeded" is also RESOURCE_EXHAUSTED, but it is
  the kernel's own tiles that do not fit on this chip: the XLA path takes over."""
  calls = []
  too_big = jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Shared memory size limit exceeded: requested 4194304, "
      "available: 101376")
  monkeypatch.setitem(IMPLEMENTATIONS, "pallas", _kernel_that_raises(too_big, calls))
  queries, keys = _data(n_q=300, n=700, dim=6)
  with pytest.warns(UserWarning, match="Shared memory size limit exceeded"):
    result = resmem_jax.knn(queries, keys, 5)
  expected = resmem_jax.knn(queries, keys, 5, implementation="xla")
  np.testing.assert_array_equal(np.asarray(result.indices), np.asarray(expected.indices))
  assert api._PALLAS_FAILED == {"tpu"}


def test_a_kernel_asked_for_by_name_raises_its_error(broken_default_kernel):
  queries, keys = _data(n_q=300, n=700, dim=6)
  with pytest.raises(NotImplementedError, match="no Mosaic lowering"):
    resmem_jax.knn(queries, keys, 5, implementation="pallas")
  assert not api._PALLAS_FAILED


def test_under_an_outer_jit_the_check_problem_still_catches_the_kernel(broken_default_kernel):
  """The check runs eagerly on its own data while jit traces the caller: a kernel
  that does not compile fails there, and the caller's program gets the XLA path."""
  queries, keys = _data(n_q=300, n=700, dim=6)
  search = jax.jit(lambda q, x: resmem_jax.knn(q, x, 5).indices)
  with pytest.warns(UserWarning, match="NotImplementedError: no Mosaic lowering"):
    got = search(queries, keys)
  np.testing.assert_array_equal(
      got, resmem_jax.knn(queries, keys, 5, implementation="xla").indices)
  assert api._PALLAS_FAILED == {"tpu"} and len(broken_default_kernel) == 1


def test_under_an_outer_jit_an_error_of_the_callers_program_is_raised(
    broken_default_kernel, monkeypatch):
  """A kernel that passes the check problem but fails to compile in the caller's own
  program fails when the caller compiles, out of the wrapper's reach: raised as is."""
  calls = []

  def fails_beyond_the_check(queries, keys, k, *, metric, block_sizes, centring):
    calls.append(keys.shape[0])
    if keys.shape[0] != api._CHECK_KEYS:
      raise NotImplementedError("no Mosaic lowering for this shape")
    return knn_xla(queries, keys, k, metric=metric, centring=centring)

  monkeypatch.setitem(IMPLEMENTATIONS, "pallas", fails_beyond_the_check)
  queries, keys = _data(n_q=300, n=700, dim=6)
  search = jax.jit(lambda q, x: resmem_jax.knn(q, x, 5).indices)
  with pytest.raises(NotImplementedError, match="for this shape"):
    search(queries, keys)
  assert calls == [api._CHECK_KEYS, 700] and not api._PALLAS_FAILED


def test_a_kernel_that_disagrees_with_xla_on_the_check_problem_is_not_used(
    broken_default_kernel, monkeypatch):
  """A kernel that compiles and runs but skips keys (with their true scores, which the
  certificate cannot see) is caught by the exact check problem before it answers."""
  calls = []

  def skips_the_last_keys(queries, keys, k, *, metric, block_sizes, centring):
    calls.append(keys.shape[0])
    return knn_xla(queries, keys[:-100], k, metric=metric, centring=centring)

  monkeypatch.setitem(IMPLEMENTATIONS, "pallas", skips_the_last_keys)
  queries, keys = _data(n_q=300, n=700, dim=6)
  with pytest.warns(UserWarning, match=r"KernelMismatch: \d+ of 131 rows of a check problem"):
    got = resmem_jax.knn(queries, keys, 5, metric="ip")
  want = resmem_jax.knn(queries, keys, 5, metric="ip", implementation="xla")
  np.testing.assert_array_equal(got.indices, want.indices)
  np.testing.assert_array_equal(got.distances, want.distances)
  assert calls == [api._CHECK_KEYS] and api._PALLAS_FAILED == {"tpu"}


def test_a_kernel_that_agrees_is_checked_once_per_configuration(broken_default_kernel,
                                                                   monkeypatch):
  """The real kernel (interpreted) passes the check; a second call with the same k, D
  and metric is not checked again, another k is."""
  if "pallas" not in api.KNOWN_IMPLEMENTATIONS or api._pallas_knn is None:
    pytest.skip("the Pallas kernel is not installed here")
  from resmem_jax.kernels import pallas_knn  # pylint: disable=g-import-not-at-top
  traced, checked = [], []  # keys of each kernel trace; k of each check
  check = api._check_kernel

  def counted(queries, keys, k, **kwargs):
    traced.append(keys.shape[0])
    return pallas_knn.knn_pallas(queries, keys, k, **kwargs)

  def counted_check(k, *args):
    checked.append(k)
    return check(k, *args)

  monkeypatch.setitem(IMPLEMENTATIONS, "pallas", counted)
  monkeypatch.setattr(api, "_check_kernel", counted_check)
  queries, keys = _data(n_q=40, n=700, dim=6)
  want = {k: resmem_jax.knn(queries, keys, k, implementation="xla") for k in (3, 4)}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for k in (3, 3, 4):
      got = resmem_jax.knn(queries, keys, k)
      np.testing.assert_array_equal(got.indices, want[k].indices)
  assert checked == [api.n_candidates(k, 700) for k in (3, 4)], checked
  assert traced == [api._CHECK_KEYS, 700] * 2, traced
  assert not api._PALLAS_FAILED and len(api._PALLAS_CHECKED) == 2
  # Under an outer jit the check runs eagerly all the same (in a thread of its own: a
  # check staged into the caller's trace could not read its results, and would fail).
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = jax.jit(lambda q, x: resmem_jax.knn(q, x, 5).indices)(queries, keys)
  np.testing.assert_array_equal(
      got, resmem_jax.knn(queries, keys, 5, implementation="xla").indices)
  assert checked == [api.n_candidates(k, 700) for k in (3, 4, 5)]
  assert not api._PALLAS_FAILED and len(api._PALLAS_CHECKED) == 3


@pytest.mark.parametrize("candidates", [40, 106])
def test_the_check_problem_runs_the_gpu_pairs_kernel(monkeypatch, candidates):
  """With 1061 keys and chunks of 16, the GPU pairs kernel hands any search of 63 or
  more candidates to the XLA path (too few keys to prune): the check compared XLA with
  XLA there. Its keys now grow with the candidates, so the kernel itself runs."""
  if api._pallas_knn is None:
    pytest.skip("the Pallas kernel is not installed here")
  from resmem_jax.kernels import pallas_knn  # pylint: disable=g-import-not-at-top
  calls = []

  def pairs_kernel_that_does_not_compile(*args, **kwargs):
    calls.append(args[0].shape)
    raise NotImplementedError("Triton lowering failed")

  monkeypatch.setattr(api, "_platform", lambda: "gpu")
  monkeypatch.setitem(IMPLEMENTATIONS, "pallas",
                      functools.partial(pallas_knn.knn_pallas, backend="triton"))
  monkeypatch.setattr(pallas_knn, "triton_chunk_pairs", pairs_kernel_that_does_not_compile)
  with pytest.raises(NotImplementedError, match="Triton lowering failed"):
    api._check_kernel(candidates, 8, "l2", None)
  assert calls


# --------------------------------------------------------------------------------------
# Shapes and dispatch.


@pytest.mark.parametrize("implementation", [None, "reference", "xla"])
def test_zero_queries(implementation):
  _, keys = _data()
  result = resmem_jax.knn(np.zeros((0, 3), np.float32), keys, 4, implementation=implementation)
  assert result.distances.shape == (0, 4) and result.distances.dtype == jnp.float32
  assert result.indices.shape == (0, 4) and result.indices.dtype == jnp.int32


@pytest.mark.parametrize("n_q,n", [(5, 20), (300, 700)])
def test_default_implementation_agrees_with_explicit_ones(n_q, n):
  queries, keys = _data(n_q=n_q, n=n, dim=6, seed=n)
  default = resmem_jax.knn(queries, keys, 5)
  for implementation in ("reference", "xla"):
    explicit = resmem_jax.knn(queries, keys, 5, implementation=implementation)
    np.testing.assert_array_equal(np.asarray(default.indices), np.asarray(explicit.indices))
    np.testing.assert_allclose(np.asarray(default.distances), np.asarray(explicit.distances),
                               rtol=1e-6)


def test_accepts_lists_and_jax_arrays():
  queries, keys = _data()
  from_lists = resmem_jax.knn(queries.tolist(), keys.tolist(), 2)
  from_jax = resmem_jax.knn(jnp.asarray(queries), jnp.asarray(keys), 2)
  np.testing.assert_array_equal(np.asarray(from_lists.indices), np.asarray(from_jax.indices))


# --------------------------------------------------------------------------------------
# Query buckets and the compile cache.


def test_query_bucket_properties():
  sizes = np.arange(1, 1 << 15)
  buckets = np.array([query_bucket(int(n)) for n in sizes])
  assert np.all(buckets >= sizes)
  assert np.all(np.diff(buckets) >= 0), "query_bucket is not monotone"
  assert np.all(buckets % 8 == 0)
  small = sizes <= 8
  assert np.all(buckets[small] == 8)
  # At most 25% padding, or fewer than 8 rows: buckets are multiples of 8 so that
  # query tiles of 8 rows divide them.
  padding = buckets - sizes
  assert np.all((padding <= 0.25 * sizes) | (padding < 8))
  assert np.all(padding[sizes >= 32] <= 0.25 * sizes[sizes >= 32])
  # Few distinct compiled shapes: at most 4 per doubling of Q.
  assert len(np.unique(buckets)) <= 4 * 15 + 1
  # A bucket is its own bucket: a padded batch never pads again.
  assert all(query_bucket(int(b)) == b for b in np.unique(buckets))


def test_no_recompilation_within_a_bucket(monkeypatch):
  traced = chex.assert_max_traces(knn_xla, n=1)
  monkeypatch.setitem(IMPLEMENTATIONS, "xla", traced)
  # A BlockSizes value no other test uses: the jit cache starts cold for it.
  block_sizes = BlockSizes(block_q=8, block_n=72, chunk=9)
  rng = np.random.default_rng(0)
  keys = rng.standard_normal((300, 4)).astype(np.float32)
  for n_q in (9, 12, 16):  # all pad to query_bucket(...) == 16
    assert query_bucket(n_q) == 16
    queries = rng.standard_normal((n_q, 4)).astype(np.float32)
    result = resmem_jax.knn(queries, keys, 3, implementation="xla", block_sizes=block_sizes)
    expected = resmem_jax.knn(queries, keys, 3, implementation="reference")
    np.testing.assert_array_equal(np.asarray(result.indices), np.asarray(expected.indices))
  # The counter has teeth: the next bucket is a new shape and must trace again.
  with pytest.raises(AssertionError, match="traced > 1"):
    resmem_jax.knn(rng.standard_normal((17, 4)).astype(np.float32), keys, 3,
                   implementation="xla", block_sizes=block_sizes)


# --------------------------------------------------------------------------------------
# Data far from magnitude 1: float32 squares would underflow or overflow.


def _oracle(queries, keys, k, metric):
  q, x = queries.astype(np.float64), keys.astype(np.float64)
  scores = ((q[:, None] - x[None]) ** 2).sum(-1) if metric == "l2" else -(q @ x.T)
  order = np.argsort(scores, axis=1, kind="stable")[:, :k]
  want = np.take_along_axis(scores, order, axis=1)
  return order, np.sqrt(want) if metric == "l2" else want


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("metric,scale", [
    ("l2", 1e-30), ("l2", 1e-20), ("l2", 1e20), ("l2", 1e30),  # ~1e-19 / 1e19: all tie
    ("ip", 1e-12), ("ip", 1e12)])
def test_tiny_and_huge_data_are_searched_at_their_own_scale(metric, scale, jit):
  rng = np.random.default_rng(3)
  queries = (rng.standard_normal((40, 8)) * scale).astype(np.float32)
  keys = (rng.standard_normal((600, 8)) * scale).astype(np.float32)
  search = lambda q, x: resmem_jax.knn(q, x, 5, metric=metric)  # noqa: E731
  result = (jax.jit(search) if jit else search)(queries, keys)  # under jit: scaled in-graph
  order, want = _oracle(queries, keys, 5, metric)
  np.testing.assert_array_equal(np.asarray(result.indices), order)
  np.testing.assert_allclose(np.asarray(result.distances), want, rtol=2e-6)


@pytest.mark.parametrize("big,small", [(1e30, 1e-3), (1e20, 1e-2), (1e10, 1e-10),
                                       (5e9, 1e-9), (1e4, 1e-17), (1.0, 1e-20)])
def test_mixed_magnitudes(big, small):
  """A small cluster and two far keys: the cluster's squared differences must survive."""
  rng = np.random.default_rng(1)
  keys = (small * rng.standard_normal((200, 4))).astype(np.float32)
  keys[[3, 50]] = big
  queries = (small * rng.standard_normal((5, 4))).astype(np.float32)
  result = resmem_jax.knn(queries, keys, 4)
  order, want = _oracle(queries, keys, 4, "l2")
  np.testing.assert_array_equal(np.asarray(result.indices), order)
  np.testing.assert_allclose(np.asarray(result.distances), want, rtol=2e-6)


def test_search_scale_is_a_power_of_two_at_the_top_of_the_safe_range():
  for dim in (1, 3, 128, 4096):
    top = api.target_exponent(dim)
    # The largest intermediates, ~8 D (2 max)^2, stay below float32's 2^128.
    assert 5 + math.ceil(math.log2(dim)) + 2 * top < 125
    for magnitude in (0.0, 3e-30, 1e-3, 1.0, 3.0, 7e25, 3e38):
      scale = float(api.search_scale(magnitude, dim))
      assert np.frexp(scale)[0] == 0.5  # a power of two
      if magnitude:  # s itself stays within 2^+-126
        assert magnitude * scale < 2.0 ** top
        assert magnitude * scale >= 2.0 ** (top - 1) or scale == 2.0 ** 126
  traced = jax.jit(lambda m: api.search_scale(m, 8))(np.float32(3.0))
  assert float(traced) == float(api.search_scale(3.0, 8))


@pytest.mark.parametrize("implementation", ["reference", "xla", "direct", None])
def test_ip_zero_products_tie_by_index(implementation):
  """0 * x is +0 or -0 by the sign of x; both are the same distance, lower index first."""
  keys = np.array([[1.0], [-1.0], [2.0], [-2.0], [3.0]], np.float32)
  res = resmem_jax.knn(np.zeros((1, 1), np.float32), keys, 2, metric="ip",
                       implementation=implementation)
  np.testing.assert_array_equal(res.indices, [[0, 1]])
  signed = np.array([[0.0], [-0.0], [0.0], [-0.0], [-1.0]], np.float32)
  res = resmem_jax.knn(np.ones((1, 1), np.float32), signed, 2, metric="ip",
                       implementation=implementation)
  np.testing.assert_array_equal(res.indices, [[0, 1]])


@pytest.mark.parametrize("implementation", ["xla", "direct", None])
def test_runs_with_64_bit_jax(implementation):
  """Index arithmetic stays int32 when jax_enable_x64 makes jnp.arange int64."""
  rng = np.random.default_rng(3)
  queries = rng.normal(size=(30, 4))
  keys = rng.normal(size=(200, 4))
  want = np.argsort(((queries[:, None] - keys[None]) ** 2).sum(-1), axis=1, kind="stable")
  with jax.enable_x64(True):
    # k * chunk >= N: the unpruned running top-k, the path the fallback uses too.
    res = resmem_jax.knn(queries, keys, 150, implementation=implementation)
  assert res.indices.dtype == jnp.int32
  assert res.distances.dtype == jnp.float64  # float64 data stay float64 under x64
  np.testing.assert_array_equal(res.indices, want[:, :150])


def test_pallas_k_limit_is_stated_in_the_callers_k():
  queries, keys = _data(n=300)
  with _raises(ValueError, "k=250 needs 265", "use k <= 241"):
    resmem_jax.knn(queries, keys, 250, implementation="pallas")


def test_k_as_a_0d_integer_array():
  queries, keys = _data(n=20)
  want = resmem_jax.knn(queries, keys, 3).indices
  for k in (np.int64(3), np.array(3), jnp.int32(3)):
    np.testing.assert_array_equal(resmem_jax.knn(queries, keys, k).indices, want)


@pytest.mark.parametrize("m", [1, 2, 3, 8, 106])
def test_sort_nearly_sorted_equals_a_full_sort(m):
  """The re-score's sort: transposition passes for nearly sorted rows (ties in the
  distance ordered by index, padding (inf, N) pairs last), the full sort otherwise."""
  rng = np.random.default_rng(m)
  n_rows = 16
  for case in ("sorted", "adjacent swaps", "shuffled", "ties and padding"):
    dist = np.sort(rng.integers(0, 6, (n_rows, m)).astype(np.float32), axis=1)
    idx = np.stack([rng.permutation(500)[:m] for _ in range(n_rows)]).astype(np.int32)
    if case == "adjacent swaps" and m > 1:
      for row in range(n_rows):
        j = rng.integers(0, m - 1)
        dist[row, [j, j + 1]] = dist[row, [j + 1, j]]
    elif case == "shuffled":
      dist = rng.permutation(dist.T).T.copy()
    elif case == "ties and padding":
      dist[:, m // 2:] = np.inf
      idx[:, m // 2:] = 500
    got = api.sort_nearly_sorted(jnp.asarray(dist), jnp.asarray(idx))
    want = jax.lax.sort((jnp.asarray(dist), jnp.asarray(idx)), num_keys=2)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=case)


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_64_bit_data_beyond_float32_range_are_searched_exactly(scale):
  """With x64 on, float64 data may lie beyond float32's range; the search scale came
  from a float32 magnitude (inf at 1e200) and returned wrong neighbours."""
  rng = np.random.default_rng(4)
  unit_q, unit_x = rng.normal(size=(20, 8)), rng.normal(size=(300, 8))
  want = np.argsort(((unit_q[:, None] - unit_x[None]) ** 2).sum(-1), axis=1, kind="stable")
  with jax.enable_x64(True):
    res = resmem_jax.knn(unit_q * scale, unit_x * scale, 5)
  np.testing.assert_array_equal(res.indices, want[:, :5])
  direct = np.sqrt(((unit_q[:, None] - unit_x[want[:, :5]]) ** 2).sum(-1)) * scale
  np.testing.assert_allclose(np.asarray(res.distances), direct, rtol=1e-12)

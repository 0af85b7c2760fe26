"""The Pallas kNN kernel: contract suite in interpret mode, selection invariants,
the TPU interpreter, the Triton kernel bodies (rounds, and chunk pairs with the
public wrapper as on a GPU), lowering for TPU and GPU, and compiled-mode checks that
only run on an accelerator.

Interpret mode is slow by design, so tiles are small (which also makes every search
cross several key tiles with a ragged last one) and the heavier interpreters (the
TPU interpreter, the Triton body) run a handful of direct cases, not the whole suite.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from knn_contract import KnnContract, check_result, integer_data, oracle, random_data

import resmem_jax
from resmem_jax.kernels import BlockSizes, api
from resmem_jax.kernels import pallas_knn as pk
from resmem_jax.kernels import xla
from resmem_jax.kernels.base import Centring

pltpu = pk.pltpu

# Several query tiles and key tiles on the contract's shapes, within the (8, 128) layout.
SMALL = BlockSizes(block_q=16, block_n=256, chunk=0)


def expected_order(queries, keys, metric="l2"):
  """float64 oracle order (equal scores lower index first) and the rounding tolerance."""
  ref = oracle(queries, keys, metric)
  return ref.order, np.take_along_axis(ref.scores, ref.order, axis=1), ref.tol


def centred(queries, keys, metric):
  if metric == "ip":
    return jnp.asarray(queries), jnp.asarray(keys)
  mean = keys.mean(axis=0)
  return jnp.asarray(queries - mean), jnp.asarray(keys - mean)


def assert_kernel_exact(indices, queries, keys, k, metric="l2", exact_ties=False):
  """Raw kernel indices against the float64 order (separated ranks, or all on ties)."""
  order, sorted_scores, tol = expected_order(queries, keys, metric)
  indices = np.asarray(indices)
  assert indices.shape == (queries.shape[0], k) and indices.dtype == np.int32
  if exact_ties:
    np.testing.assert_array_equal(indices, order[:, :k])
    return
  gaps = np.diff(sorted_scores, axis=1)
  sep = np.ones((queries.shape[0], k), bool)
  sep[:, 1:] &= gaps[:, :k - 1] > tol
  sep[:, :min(k, keys.shape[0] - 1)] &= gaps[:, :min(k, keys.shape[0] - 1)] > tol
  assert sep.mean() > 0.5, "test data too degenerate to check indices"
  np.testing.assert_array_equal(np.where(sep, indices, -1), np.where(sep, order[:, :k], -1))


# --------------------------------------------------------------------------------------
# The contract suite, Mosaic-TPU kernel in interpret mode on CPU.


class TestPallasInterpret(KnnContract):
  IMPLEMENTATION = "pallas"
  BLOCK_SIZES = SMALL


@pytest.mark.parametrize("k", [5, 70])  # one case per selection path
def test_default_tiles(k):
  """Default tiles: one key tile larger than N (padded, not ragged)."""
  queries, keys = random_data(20, 30, 700, 9)
  check_result(resmem_jax.knn(queries, keys, k, implementation="pallas"), queries, keys, k)


@pytest.mark.parametrize("dim", [1, 64, 700, 1024, 2048, 4096])
@pytest.mark.parametrize("k", [1, 32, 33, 256])
def test_default_tpu_tiles_fit_the_vmem_budget(dim, k):
  """Default TPU tiles follow the (8, 128) layout and keep the kernel's estimated VMEM
  within budget, below v5e's 16 MiB default scoped limit, up to TPU_MAX_DIM."""
  tiles = pk.default_block_sizes("tpu", k, dim)
  assert tiles.block_q % 8 == 0 and tiles.block_n % 128 == 0, tiles
  assert pk.tpu_vmem_bytes(tiles.block_q, tiles.block_n, dim, k) <= pk.TPU_VMEM_BUDGET
  assert pk.TPU_VMEM_BUDGET < 16 << 20


# --------------------------------------------------------------------------------------
# The selection helpers on plain arrays (no Pallas): exact against a sort.


def lexsorted(values, indices, k):
  order = np.lexsort((indices, values), axis=1)[:, :k]
  return np.take_along_axis(values, order, axis=1), np.take_along_axis(indices, order, axis=1)


@pytest.mark.parametrize("k", [1, 4, 13])
def test_merge_rounds_then_extract_equals_sort(k):
  rng = np.random.default_rng(k)
  rows, block_n, n_tiles = 8, 32, 5
  # Few distinct values: many ties across and within tiles.
  scores = rng.integers(0, 6, size=(rows, block_n * n_tiles)).astype(np.float32)
  best, best_idx = pk._empty_slots(rows, 16, k)
  for t in range(n_tiles):
    cols = t * block_n + jnp.arange(block_n, dtype=jnp.int32)[None, :]
    best, best_idx = pk.merge_rounds(jnp.asarray(scores[:, t * block_n:(t + 1) * block_n]),
                                     cols, best, best_idx)
  lane = jnp.arange(16)[None, :]
  out, out_idx = pk.extract_sorted(jnp.where(lane < k, best, jnp.inf), best_idx, k, 16)
  want, want_idx = lexsorted(scores, np.broadcast_to(np.arange(scores.shape[1]), scores.shape), k)
  np.testing.assert_array_equal(np.asarray(out)[:, :k], want)
  np.testing.assert_array_equal(np.asarray(out_idx)[:, :k], want_idx)
  np.testing.assert_array_equal(np.asarray(out_idx)[:, k:], -1)


@pytest.mark.parametrize("spread", [True, False])
def test_bins_certificate_is_sound(spread):
  """Certified rows hold exactly the k best; clustering the best in one lane breaks
  the certificate (and must be reported, not hidden)."""
  rng = np.random.default_rng(0)
  rows, n, k, depth = 8, 128 * 20, 40, pk.binned_depth(40)
  scores = rng.standard_normal((rows, n)).astype(np.float32)
  if not spread:  # the 40 best of every row sit in lane 3
    scores[:, 3::128] -= 100.0
  regs = [jnp.full((rows, 128), jnp.inf)] * depth
  regs_idx = [jnp.full((rows, 128), np.iinfo(np.int32).max, jnp.int32)] * depth
  for c in range(n // 128):
    cols = jnp.broadcast_to(c * 128 + jnp.arange(128, dtype=jnp.int32), (rows, 128))
    regs, regs_idx = pk.sink_into_bins(jnp.asarray(scores[:, c * 128:(c + 1) * 128]), cols,
                                       list(regs), list(regs_idx))
  out, out_idx, ok = pk.certify_and_extract(regs, regs_idx, k, 128)
  ok = np.asarray(ok)[:, 0] > 0
  want, want_idx = lexsorted(scores, np.broadcast_to(np.arange(n), scores.shape), k)
  assert ok.all() == spread and (spread or not ok.any())
  np.testing.assert_array_equal(np.asarray(out_idx)[ok, :k], want_idx[ok])
  np.testing.assert_array_equal(np.asarray(out)[ok, :k], want[ok])


def test_binned_kernel_certifies_random_data_and_falls_back_exactly():
  """The fast path is what runs on ordinary data; the fallback is exact when it runs."""
  queries, keys = random_data(21, 24, 1500, 6)
  q, x = centred(queries, keys, "l2")
  _, idx, ok = pk._knn_tpu(q, x, 64, "l2", SMALL, interpret=True)
  assert np.asarray(ok).all()
  assert_kernel_exact(idx, queries, keys, 64)

  # Keys 0, 128, 256, ... are the nearest to every query: lane 0 holds 12 of the 64
  # best, more than its depth - 1 registers, so no row can be certified.
  queries = 1e-2 * queries
  keys = keys.copy()
  keys[::128] = 1e-3 * keys[::128]
  q, x = centred(queries, keys, "l2")
  _, _, ok = pk._knn_tpu(q, x, 64, "l2", SMALL, interpret=True)
  assert not np.asarray(ok).any()
  _, idx = jax.jit(functools.partial(pk.knn_pallas, k=64, metric="l2", block_sizes=SMALL))(q, x)
  assert_kernel_exact(idx, queries, keys, 64)


# 48 keys at |x| = 1 + n 2^-23, n = 0..47 (signs: _NEAR_SIGNS), the first 10 in lane 0 of their
# chunks, so the binned kernel cannot certify k = 33 for a query at 0; the other 5456 keys
# lie further out. Distances from 0 are exact in float32, and the 33rd is one ulp from
# the 34th: a search ranked by tagged scores (up to 16 ulps) cannot be trusted here.
_NEAR_ROWS = (128, 256, 384, 512, 640, 768, 896, 1024, 1152, 1280, 5001, 2633, 3368, 4161,
              2830, 1947, 586, 3310, 4735, 3438, 2058, 4632, 2155, 2108, 2198, 1801, 2510, 816,
              3467, 5323, 4668, 148, 4686, 556, 3517, 4911, 478, 511, 5414, 4533, 4077, 3705,
              1136, 3732, 5060, 3168, 2698, 3481)
_NEAR_SIGNS = "-+++-+---++--+---++---+-+----++-++-+-++++++---+-"


def test_binned_fallback_ranks_by_untagged_scores():
  """The fallback of the binned kernel ran the XLA search on its default tiles, which
  pair chunk minima at this size: tagged scores, which the certificate did not allow
  for on TPU, so key 556 (n = 33) was returned as certified in place of 4686 (n = 32)."""
  n, near = 5504, len(_NEAR_ROWS)
  ulp = 2.0 ** -23
  x = np.zeros(n)
  for i, row in enumerate(_NEAR_ROWS):
    x[row] = (1 + i * ulp) * (-1 if _NEAR_SIGNS[i] == "-" else 1)
  rest = np.setdiff1d(np.arange(n), _NEAR_ROWS)
  far = near + 16 + np.arange(len(rest))
  x[rest] = (1 + far * ulp) * np.where(far % 2 == 0, 1, -1)
  keys, queries = x.astype(np.float32)[:, None], np.zeros((1, 1), np.float32)
  assert xla.tiling(33, n, 1, jnp.float32, "l2", None)[1]  # the default tiles pair
  res = resmem_jax.knn(queries, keys, 33, implementation="pallas")
  np.testing.assert_array_equal(np.asarray(res.indices)[0], _NEAR_ROWS[:33])


def test_k_at_the_kernel_maximum():
  # The wrapper asks the kernel for k + margin candidates (the exactness certificate):
  # the largest public k is the one whose candidate count is the kernel's maximum.
  queries, keys = random_data(22, 9, 700, 5)
  k = max(k for k in range(1, pk.MAX_K + 1) if api.n_candidates(k, 700) <= pk.MAX_K)
  assert api.n_candidates(k, 700) == pk.MAX_K
  result = resmem_jax.knn(queries, keys, k, implementation="pallas", block_sizes=SMALL)
  check_result(result, queries, keys, k)


def test_k_above_the_maximum_raises():
  queries, keys = random_data(23, 8, pk.MAX_K + 10, 3)
  with pytest.raises(ValueError, match=f"keeps at most {pk.MAX_K} candidates"):
    resmem_jax.knn(queries, keys, pk.MAX_K + 1, implementation="pallas")
  with pytest.raises(ValueError, match="must be in"):  # the kernel's own check
    pk.knn_pallas(queries, keys, pk.MAX_K + 1)


def test_float64_inputs_raise():
  with jax.enable_x64(True):
    q = jnp.zeros((8, 3), jnp.float64)
    with pytest.raises(ValueError, match="float32"):
      pk.knn_pallas(q, q, 1)


def test_is_supported():
  assert pk.is_supported(k=10, dim=64, dtype=jnp.float32, platform="tpu")
  assert pk.is_supported(k=pk.MAX_K, dim=64, dtype=jnp.bfloat16, platform="tpu")
  assert not pk.is_supported(k=pk.MAX_K + 1, dim=64, dtype=jnp.float32, platform="tpu")
  assert not pk.is_supported(k=10, dim=64, dtype=jnp.float64, platform="tpu")
  assert pk.is_supported(k=pk.GPU_MAX_K, dim=128, dtype=jnp.float32, platform="gpu",
                         metric="ip")
  assert not pk.is_supported(k=pk.GPU_MAX_K + 1, dim=128, dtype=jnp.float32, platform="gpu",
                             metric="ip")
  # l2 beyond the rounds kernel's slots: the pairs kernel, up to MAX_K.
  assert pk.is_supported(k=pk.MAX_K, dim=128, dtype=jnp.float32, platform="gpu")
  assert not pk.is_supported(k=pk.MAX_K + 1, dim=128, dtype=jnp.float32, platform="gpu")
  assert not pk.is_supported(k=10, dim=pk.GPU_MAX_DIM + 1, dtype=jnp.float32, platform="gpu")
  assert not pk.is_supported(k=10, dim=64, dtype=jnp.float32, platform="cpu")
  assert api.IMPLEMENTATIONS["pallas"] is pk.knn_pallas


# --------------------------------------------------------------------------------------
# The TPU interpreter: simulates VMEM scratch, block copies and the grid order.

tpu_interpreter = pytest.mark.skipif(
    pltpu is None or not hasattr(pltpu, "InterpretParams"),
    reason="this jax has no TPU interpret mode")


@tpu_interpreter
@pytest.mark.parametrize("k,metric", [(1, "l2"), (7, "ip"), (40, "l2")])
def test_tpu_interpreter(k, metric):
  queries, keys = random_data(30 + k, 20, 555, 6)
  with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
    result = resmem_jax.knn(queries, keys, k, metric=metric, implementation="pallas",
                            block_sizes=BlockSizes(block_q=8, block_n=128, chunk=0))
  check_result(result, queries, keys, k, metric=metric)


@tpu_interpreter
def test_tpu_interpreter_ties():
  queries, keys = integer_data(33, 12, 150, 3, low=-1, high=1)
  with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
    result = resmem_jax.knn(queries, keys, 9, implementation="pallas",
                            block_sizes=BlockSizes(block_q=8, block_n=128, chunk=0))
  check_result(result, queries, keys, 9, exact_ties=True)


# --------------------------------------------------------------------------------------
# The Triton kernel body under the generic interpreter (its compiled form needs a GPU).

triton_interpret = functools.partial(pk.knn_pallas, backend="triton", interpret=True)


@pytest.mark.parametrize("k,metric,dim", [(1, "l2", 3), (9, "ip", 20), (pk.GPU_MAX_K, "l2", 5)])
def test_triton_body_interpreted(k, metric, dim):
  queries, keys = random_data(40 + k, 19, 301, dim)  # ragged query and key tiles
  q, x = centred(queries, keys, metric)
  tiles = BlockSizes(block_q=16, block_n=64, chunk=0)
  _, idx = jax.jit(functools.partial(triton_interpret, k=k, metric=metric,
                                     block_sizes=tiles))(q, x)
  assert_kernel_exact(idx, queries, keys, k, metric)


@pytest.mark.parametrize("min_split_tiles", [pk.GPU_MIN_SPLIT_TILES, 1])
def test_triton_body_ties(monkeypatch, min_split_tiles):
  """Also with the keys split into one-tile ranges (merged in XLA): ties across splits
  keep the lower index first."""
  monkeypatch.setattr(pk, "GPU_MIN_SPLIT_TILES", min_split_tiles)
  queries, keys = integer_data(44, 10, 120, 3, low=-1, high=1)
  _, idx = jax.jit(functools.partial(
      triton_interpret, k=9, metric="l2",
      block_sizes=BlockSizes(block_q=16, block_n=32, chunk=0)))(jnp.asarray(queries),
                                                                  jnp.asarray(keys))
  assert_kernel_exact(idx, queries, keys, 9, exact_ties=True)


@pytest.mark.parametrize("query_tiles", [1, 3, 16, 320, 600])
@pytest.mark.parametrize("key_tiles", [1, 7, 8, 9, 100, 15625, 262144])
def test_key_splits_cover_every_key_tile_once(query_tiles, key_tiles):
  splits, per_split = pk.key_splits(query_tiles, key_tiles)
  assert splits >= 1 and (splits - 1) * per_split < key_tiles <= splits * per_split
  assert per_split >= min(pk.GPU_MIN_SPLIT_TILES, key_tiles)
  if key_tiles >= pk.GPU_MIN_SPLIT_TILES * pk.GPU_TARGET_PROGRAMS:  # about the target
    assert query_tiles * splits > pk.GPU_TARGET_PROGRAMS // 2
  # C3 (1000 queries in tiles of 64, 1M keys in tiles of 64): 16 programs before.
  assert pk.key_splits(16, 15625)[0] * 16 > pk.GPU_TARGET_PROGRAMS // 2


# --------------------------------------------------------------------------------------
# The Triton pairs kernel (l2 beyond GPU_MAX_K, or asked for by BlockSizes.pairs), with
# the public wrapper and its certificate as they run on a GPU, the kernel interpreted.

PAIR_TILES = BlockSizes(block_q=16, block_n=32, chunk=4, pairs=True)


@pytest.fixture(scope="class")
def as_on_a_gpu():
  """`knn_pallas` and the wrapper pick the Triton kernels, as on a GPU (interpreted:
  the platform is still CPU). Class-scoped, so the property tests may use it."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(pk, "backend_for", lambda platform: "triton")
    yield


@pytest.mark.usefixtures("as_on_a_gpu")
class TestTritonPairsInterpret(KnnContract):
  """The contract suite on the GPU path: l2 through the pairs kernel (chunks of 4 so
  that small k prunes), ip through the rounds kernel."""

  IMPLEMENTATION = "pallas"
  BLOCK_SIZES = PAIR_TILES


pairs_interpret = functools.partial(pk.knn_pallas, metric="l2", backend="triton",
                                    interpret=True)


@pytest.mark.parametrize("k,dim,tiles", [
    (pk.GPU_MAX_K + 1, 3, None),  # the default GPU tiles: chunk 16
    (70, 40, BlockSizes(block_q=16, block_n=64, chunk=16)),  # dot in 2 steps, 1 ragged
    (pk.MAX_K, 130, BlockSizes(block_q=32, block_n=256, chunk=8, pairs=True)),
])
def test_triton_pairs_kernel_interpreted(k, dim, tiles):
  queries, keys = random_data(60 + k, 21, 4500, dim)  # ragged query and key tiles
  q, x = centred(queries, keys, "l2")
  _, idx = jax.jit(functools.partial(pairs_interpret, k=k, block_sizes=tiles))(q, x)
  assert_kernel_exact(idx, queries, keys, k)


@pytest.mark.parametrize("dim", [20, 45])  # the kernel's dot in one step, in two
def test_triton_pairs_equal_the_xla_pairs(dim):
  """The kernel's chunk pairs are the XLA path's up to the dot's rounding (a matmul of
  other tile shapes may round differently): the same minima where the scores are apart."""
  queries, keys = random_data(61, 32, 1000, dim)
  q, x = (jnp.asarray(a) for a in centred(queries, keys, "l2"))
  x_sq = jnp.sum(x * x, axis=1)
  first, second = pk.triton_chunk_pairs(q, x, x_sq[:, None], chunk=8, block_q=16,
                                        block_n=64, interpret=True)
  want_first, want_second = xla._chunk_pairs(q, x, x_sq, 1024, 8)
  assert first.shape == want_first.shape == (125, 32)
  for got, want in ((first, want_first), (second, want_second)):
    np.testing.assert_allclose(np.asarray(xla.from_ordered(got)),
                               np.asarray(xla.from_ordered(want)), rtol=1e-5, atol=1e-4)
  want_low = np.asarray(xla.from_ordered(want_first))
  apart = np.asarray(xla.from_ordered(want_second)) - want_low > 1e-3
  assert apart.mean() > 0.9
  np.testing.assert_array_equal(np.where(apart, np.asarray(first) & 7, -1),
                                np.where(apart, np.asarray(want_first) & 7, -1))


def test_triton_pairs_crowded_chunks_fall_back_exactly():
  """Keys along a line in index order: a query's winners fill whole consecutive chunks,
  far more crowded chunks than PAIR_SLOTS, so its query tile runs the exact step."""
  rng = np.random.default_rng(62)
  line = np.sort(rng.uniform(0, 1000, 1200))
  keys = np.stack([line, rng.standard_normal(1200)], axis=1).astype(np.float32)
  queries = np.stack([rng.uniform(100, 900, 20), np.zeros(20)], axis=1).astype(np.float32)
  q, x = (jnp.asarray(a) for a in centred(queries, keys, "l2"))
  k, chunk = 60, 4
  first, second = pk.triton_chunk_pairs(pk._pad_rows(q, 32), x, jnp.sum(x * x, 1)[:, None],
                                        chunk=chunk, block_q=16, block_n=64, interpret=True)
  chunk_ids = xla._select_chunks(xla.from_ordered(first), k)
  rows = jnp.arange(first.shape[1])[:, None]
  tau = jnp.max(first[chunk_ids, rows], axis=1, keepdims=True)
  crowded = np.asarray(jnp.sum(second[chunk_ids, rows] <= tau, axis=1))[:20]
  assert (crowded > xla.PAIR_SLOTS).all()
  tiles = BlockSizes(block_q=16, block_n=64, chunk=chunk, pairs=True)
  _, idx = jax.jit(functools.partial(pairs_interpret, k=k, block_sizes=tiles))(q, x)
  assert_kernel_exact(idx, queries, keys, k)


def test_triton_pairs_with_few_keys_run_the_xla_search():
  queries, keys = random_data(63, 10, 500, 4)  # k * 16 >= N: no chunk can be pruned
  q, x = centred(queries, keys, "l2")
  _, idx = jax.jit(functools.partial(pairs_interpret, k=40))(q, x)
  assert_kernel_exact(idx, queries, keys, 40)


def test_certificate_allows_for_the_pairs_tag(monkeypatch):
  """The pairs kernel ranks by tagged scores: the certificate's bound must say so."""
  def tags(implementation, k, metric, block_sizes):
    return api._tags_scores(implementation, k, 100_000, 64, jnp.float32, metric, block_sizes)
  assert not tags("pallas", 100, "l2", None)  # CPU: the TPU kernel
  monkeypatch.setattr(pk, "backend_for", lambda platform: "triton")
  assert tags("pallas", 100, "l2", None)
  assert tags("pallas", 10, "l2", PAIR_TILES)
  assert not tags("pallas", 10, "l2", None)  # the rounds kernel
  assert not tags("pallas", 10, "ip", PAIR_TILES)
  assert not tags("reference", 10, "l2", None)


# --------------------------------------------------------------------------------------
# From a mutation audit: the kernels called directly (the contract suite reaches them
# through `knn`, whose certificate and exact fallback turn a kernel that ranks badly
# into a silent slowdown), on tied data, mixed batches, centring and ragged chunks.

INT_MAX = np.iinfo(np.int32).max


def bins_of(scores, depth):
  """Runs sink_into_bins over a (rows, n) score matrix, n a multiple of 128."""
  rows, n = scores.shape
  regs = [jnp.full((rows, 128), jnp.inf)] * depth
  regs_idx = [jnp.full((rows, 128), INT_MAX, jnp.int32)] * depth
  for c in range(n // 128):
    cols = jnp.broadcast_to(c * 128 + jnp.arange(128, dtype=jnp.int32), (rows, 128))
    regs, regs_idx = pk.sink_into_bins(jnp.asarray(scores[:, c * 128:(c + 1) * 128]), cols,
                                       list(regs), list(regs_idx))
  return regs, regs_idx


# --------------------------------------------------------------------------------------
# Binned selection with exact ties.


def test_bins_keep_the_lowest_indices_of_tied_scores():
  """Scores in {0, 1}: each lane holds ~10 zeros, more than its m - 1 registers, so the
  bins must keep the lowest-index zeros (sinking insertion strictly below); the rows are
  then certified and equal a lexsort. (`bubble <= regs[i]` would keep the highest.)"""
  rng = np.random.default_rng(5)
  rows, n, k = 8, 128 * 20, 40
  scores = rng.integers(0, 2, size=(rows, n)).astype(np.float32)
  regs, regs_idx = bins_of(scores, pk.binned_depth(k))
  out, out_idx, ok = pk.certify_and_extract(regs, regs_idx, k, 128)
  want, want_idx = lexsorted(scores, np.broadcast_to(np.arange(n), scores.shape), k)
  assert (np.asarray(ok)[:, 0] > 0).all()
  np.testing.assert_array_equal(np.asarray(out_idx)[:, :k], want_idx)
  np.testing.assert_array_equal(np.asarray(out)[:, :k], want)


def test_binned_kernel_all_keys_equal_is_certified_lowest_indices():
  """The binned TPU kernel (interpret mode) on keys that all tie: certified, 0..k-1."""
  keys = np.full((128 * 10 + 7, 4), 3.0, np.float32)  # a ragged last tile
  queries = np.zeros((8, 4), np.float32)
  _, idx, ok = pk._knn_tpu(jnp.asarray(queries), jnp.asarray(keys), 40, "l2", SMALL,
                           interpret=True)
  assert np.asarray(ok).all()
  np.testing.assert_array_equal(np.asarray(idx), np.broadcast_to(np.arange(40), (8, 40)))


def test_bins_certificate_is_sound_on_ties_at_the_pivot():
  """Ties at the pivot value P: only entries below P in (value, index) order count.

  Row 0 (scores 1 except zeros): lane 0 has 20 zeros (its m-th is (0, 896)), lane 1
  zeros at 1 + 128 j for j >= 10, lanes 2..127 one zero at 1280 + lane. The true
  k = 40 best are all zeros, lane 0's 896..2432 among them, which lie outside lane 0's
  top-(m-1): the certificate must fail (7 entries below (0, 896)). Counting every zero
  (`values <= p`) or taking the pivot index as the largest would certify a wrong
  answer. Row 1: all scores tie, certified with 0..k-1.
  """
  n, k = 128 * 20, 40
  depth = pk.binned_depth(k)
  assert depth == 8  # the construction below relies on m - 1 = 7
  scores = np.ones((8, n), np.float32)
  scores[0, 0::128] = 0.0
  scores[0, 1 + 128 * np.arange(10, 20)] = 0.0
  scores[0, 1280 + np.arange(2, 128)] = 0.0
  scores[1] = 0.0
  regs, regs_idx = bins_of(scores, depth)
  out, out_idx, ok = pk.certify_and_extract(regs, regs_idx, k, 128)
  ok = np.asarray(ok)[:, 0] > 0
  want, want_idx = lexsorted(scores, np.broadcast_to(np.arange(n), scores.shape), k)
  assert not ok[0] and ok[1]
  np.testing.assert_array_equal(np.asarray(out_idx)[ok, :k], want_idx[ok])
  np.testing.assert_array_equal(np.asarray(out)[ok, :k], want[ok])


def test_binned_kernel_skips_a_tile_only_when_no_bin_changes():
  """Keys on a line, query at 0 (score x^2): lane 0 (keys 0, 128, ..., 896) holds the 8
  nearest, one per key tile of 128, so k = 40 cannot be certified (m - 1 = 7). Each
  later tile improves no lane's (m-1)-th entry but fills its m-th: a tile may be
  skipped only if nothing beats a lane's m-th entry. (Skipping on the (m-1)-th
  leaves every m-th at +inf, certifies, and drops key 896.)"""
  tiles, k = 8, 40
  t, lane = np.meshgrid(np.arange(tiles), np.arange(128), indexing="ij")
  x = np.where(lane == 0, t.astype(np.float64), 100.0 + t + lane / 1000.0)
  keys = x.reshape(-1, 1).astype(np.float32)  # key t * 128 + lane
  queries = np.zeros((8, 1), np.float32)
  tile = BlockSizes(block_q=8, block_n=128, chunk=0)
  _, _, ok = pk._knn_tpu(jnp.asarray(queries), jnp.asarray(keys), k, "l2", tile,
                         interpret=True)
  assert not np.asarray(ok).any()
  _, idx = jax.jit(functools.partial(pk.knn_pallas, k=k, metric="l2", block_sizes=tile))(
      jnp.asarray(queries), jnp.asarray(keys))
  want = np.argsort(keys[:, 0].astype(np.float64) ** 2, kind="stable")[:k]
  np.testing.assert_array_equal(np.asarray(idx), np.broadcast_to(want, (8, k)))


# --------------------------------------------------------------------------------------
# knn_pallas's own fallback and its ragged query count.


def _clustered(seed, n_q):
  """Every 128th key sits near c = 10 e_1 (one lane holds them all); queries near c
  cannot be certified, the others (far from c) are."""
  queries, keys = random_data(seed, n_q, 1500, 6)
  c = np.zeros(6, np.float32)
  c[0] = 10.0
  keys = keys.copy()
  keys[::128] = c + 1e-2 * keys[::128]
  queries = queries.copy()
  queries[::2] = c + 1e-2 * queries[::2]
  return queries, keys


def test_binned_fallback_redoes_only_a_mixed_batch_exactly():
  """Some rows certified, some not: every row must come out exact (a cond on
  `any(certified)` would return the uncertified rows' bins unchecked)."""
  queries, keys = _clustered(70, 24)
  _, _, ok = pk._knn_tpu(jnp.asarray(queries), jnp.asarray(keys), 64, "l2", SMALL,
                         interpret=True)
  ok = np.asarray(ok)[:, 0] > 0
  assert ok.any() and not ok.all()
  _, idx = jax.jit(functools.partial(pk.knn_pallas, k=64, metric="l2",
                                     block_sizes=SMALL))(jnp.asarray(queries), jnp.asarray(keys))
  assert_kernel_exact(idx, queries.astype(np.float64), keys.astype(np.float64), 64)


def test_binned_kernel_with_fewer_queries_than_a_sublane_tile():
  """13 queries in a 16-row tile (padded): the certificate is cut to the 13 rows as the
  scores are (uncut, a (16, 1) mask would meet (13, k) scores)."""
  queries, keys = random_data(71, 13, 900, 5)
  _, idx = jax.jit(functools.partial(pk.knn_pallas, k=40, metric="l2",
                                     block_sizes=SMALL))(jnp.asarray(queries), jnp.asarray(keys))
  assert_kernel_exact(idx, queries.astype(np.float64), keys.astype(np.float64), 40)


# --------------------------------------------------------------------------------------
# The centring applied on chip. The contract
# suite passes a Centring only through the public wrapper, whose certificate and exact
# fallback hide a kernel that ranks badly. Leaving the mean in the keys only adds
# -2 <q, mean> to each query's scores, so the order is lost to float32 rounding, not
# in exact arithmetic: the data sit at 10^6, as offset data do (SPEC 3).


@pytest.mark.parametrize("backend,k,metric,tiles", [
    ("tpu", 5, "l2", SMALL),           # rounds
    ("tpu", 40, "l2", SMALL),          # binned
    ("tpu", 5, "ip", SMALL),           # rounds, ip
    ("triton", 5, "l2", BlockSizes(block_q=16, block_n=64, chunk=0)),  # rounds
    ("triton", 5, "ip", BlockSizes(block_q=16, block_n=64, chunk=0)),  # rounds, ip
    ("triton", 40, "l2", PAIR_TILES),  # pairs
])
def test_kernels_apply_the_centring_to_the_keys(backend, k, metric, tiles):
  queries, keys = random_data(72, 19, 1001, 6, offset=1e6)
  scale = 0.25  # a power of two, as api.search_scale gives
  mean = (scale * keys.astype(np.float64).mean(axis=0)).astype(np.float32)[None, :]
  centring = Centring(scale=jnp.float32(scale), mean=jnp.asarray(mean))
  fn = functools.partial(pk.knn_pallas, k=k, metric=metric, block_sizes=tiles,
                         backend=backend, interpret=True, centring=centring)
  _, idx = jax.jit(fn)(jnp.asarray(queries), jnp.asarray(keys))
  # Centred in float32 exactly (x * 2^-2 is exact, and x * scale - mean cancels exactly).
  q64 = queries.astype(np.float64) * scale - mean
  x64 = keys.astype(np.float64) * scale - mean
  assert_kernel_exact(idx, q64, x64, k, metric)


# --------------------------------------------------------------------------------------
# The Triton pairs kernel's ragged last chunk.


@pytest.mark.parametrize("n", [1003, 1007])  # 3 and 7 keys in the last chunk of 8
def test_triton_pairs_ragged_last_chunk_against_numpy(n):
  """Every chunk's tagged minimum is its smallest real key (position and value), and
  its second is the chunk's second smallest; rows past the last key take no part."""
  chunk = 8
  queries, keys = random_data(73, 16, n, 40)
  q, x = jnp.asarray(queries), jnp.asarray(keys)
  first, second = pk.triton_chunk_pairs(q, x, jnp.sum(x * x, axis=1)[:, None], chunk=chunk,
                                        block_q=16, block_n=64, interpret=True)
  q64, x64 = queries.astype(np.float64), keys.astype(np.float64)
  s = (x64 * x64).sum(1)[:, None] - 2.0 * x64 @ q64.T  # (n, Q), keys-major
  pad = -n % chunk
  s = np.concatenate([s, np.full((pad, s.shape[1]), np.inf)]).reshape(-1, chunk, s.shape[1])
  order = np.argsort(s, axis=1, kind="stable")
  assert first.shape == (s.shape[0], 16)
  low = np.take_along_axis(s, order[:, :1], axis=1)[:, 0]
  low2 = np.take_along_axis(s, order[:, 1:2], axis=1)[:, 0]
  got_first = np.asarray(xla.from_ordered(first), np.float64)
  got_second = np.asarray(xla.from_ordered(second), np.float64)
  np.testing.assert_allclose(got_first, low, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(got_second, low2, rtol=1e-4, atol=1e-3)
  apart = low2 - low > 1e-2
  assert apart.mean() > 0.9
  np.testing.assert_array_equal(np.where(apart, np.asarray(first) & (chunk - 1), -1),
                                np.where(apart, order[:, 0], -1))


def test_triton_pairs_search_with_one_padding_row_in_the_last_chunk():
  """n = 7 (mod 8): one padding row in the last chunk. A padding row scored below the
  real keys would be read off as the chunk's winner, an index past the last key."""
  queries, keys = random_data(74, 16, 1007, 40)
  tiles = BlockSizes(block_q=16, block_n=64, chunk=8, pairs=True)
  _, idx = jax.jit(functools.partial(pk.knn_pallas, k=40, metric="l2", backend="triton",
                                     interpret=True, block_sizes=tiles))(
                                         jnp.asarray(queries), jnp.asarray(keys))
  assert (np.asarray(idx) < 1007).all()
  assert_kernel_exact(idx, queries.astype(np.float64), keys.astype(np.float64), 40)


# --------------------------------------------------------------------------------------
# Static choices.


def test_default_tpu_tiles_at_the_largest_dim_are_the_documented_ones():
  """At D = 4096 the binned selection (k > 32) takes 64 query rows, as documented in
  `default_block_sizes`: 128 would be over the VMEM budget once the inputs are counted
  double-buffered, as the pipeline holds them. The rounds selection keeps 128."""
  assert pk.default_block_sizes("tpu", 33, 4096).block_q == 64
  assert pk.default_block_sizes("tpu", 256, 4096).block_q == 64
  assert pk.default_block_sizes("tpu", 32, 4096).block_q == 128


def test_is_supported_dim_limits_are_inclusive():
  f32 = jnp.float32
  assert pk.is_supported(k=10, dim=pk.TPU_MAX_DIM, dtype=f32, platform="tpu")
  assert not pk.is_supported(k=10, dim=pk.TPU_MAX_DIM + 1, dtype=f32, platform="tpu")
  assert pk.is_supported(k=10, dim=pk.GPU_MAX_DIM, dtype=f32, platform="gpu")
  assert not pk.is_supported(k=10, dim=pk.GPU_MAX_DIM + 1, dtype=f32, platform="gpu")
  assert not pk.is_supported(k=0, dim=8, dtype=f32, platform="tpu")


def test_pairs_kernel_only_beyond_the_rounds_kernels_k():
  assert not pk.uses_pairs("triton", pk.GPU_MAX_K, "l2", None)
  assert pk.uses_pairs("triton", pk.GPU_MAX_K + 1, "l2", None)
  assert pk.uses_pairs("triton", 1, "l2", PAIR_TILES)
  assert not pk.uses_pairs("triton", pk.GPU_MAX_K + 1, "ip", None)
  assert not pk.uses_pairs("tpu", pk.GPU_MAX_K + 1, "l2", PAIR_TILES)


# --------------------------------------------------------------------------------------
# Lowering for the real backends, on CPU: every primitive has a Mosaic TPU / Triton
# lowering rule and the block shapes pass the lowering's checks. (Mosaic's layout
# passes and ptxas run only at compile time on the device: not covered here.)


@pytest.mark.parametrize("backend,platform,k,tiles,dim", [
    ("tpu", "tpu", 10, None, 64), ("tpu", "tpu", 100, None, 64),
    ("tpu", "tpu", 100, None, 4096),  # the largest D: a 64-row query tile
    ("triton", "cuda", 16, None, 64),  # rounds
    ("triton", "cuda", 100, None, 64),  # pairs
    ("triton", "cuda", 16, BlockSizes(block_q=64, block_n=128, chunk=16, pairs=True), 64)])
def test_lowers_for_the_device(backend, platform, k, tiles, dim):
  tiles = tiles or pk.default_block_sizes("gpu" if backend == "triton" else "tpu", k, dim)
  fn = jax.jit(functools.partial(pk.knn_pallas, k=k, metric="l2", block_sizes=tiles,
                                 backend=backend, interpret=False))
  args = (jax.ShapeDtypeStruct((256, dim), jnp.float32),
          jax.ShapeDtypeStruct((3000, dim), jnp.float32))
  # Triton custom calls carry no serialization guarantee; we only lower, never load.
  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  target = contextlib.nullcontext()
  if backend == "triton":
    # Since jax 0.11 the Triton lowering reads the GPU's compute capability, so a
    # machine without one names the GPU it lowers for: an abstract H100.
    gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None,
                                      platform="gpu")
    target = jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), abstract_device=gpu))
  with target:
    text = export.export(fn, platforms=[platform], disabled_checks=checks)(*args).mlir_module()
  call = "tpu_custom_call" if backend == "tpu" else "__gpu$xla.gpu.triton"
  assert f"stablehlo.custom_call @{call}(" in text


# --------------------------------------------------------------------------------------
# Compiled mode: only with a GPU or TPU (tests/conftest.py skips these on CPU).


@pytest.mark.accelerator
@pytest.mark.parametrize("k", [1, 10, 32, 100, 256])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_compiled_against_oracle(k, metric):
  platform = jax.default_backend()
  if not pk.is_supported(k=k, dim=48, dtype=jnp.float32, platform=platform):
    pytest.skip(f"{k=} not supported by the kernel on {platform}")
  queries, keys = random_data(50 + k, 300, 5000, 48, offset=100.0)
  result = resmem_jax.knn(queries, keys, k, metric=metric, implementation="pallas")
  check_result(result, queries, keys, k, metric=metric)


@pytest.mark.accelerator
def test_compiled_ties_and_default_choice():
  queries, keys = integer_data(60, 64, 2000, 7, low=-1, high=1)
  result = resmem_jax.knn(queries, keys, 9, implementation="pallas")
  check_result(result, queries, keys, 9, exact_ties=True)
  assert api.default_implementation(64, 4000, 9, 7, jnp.float32) == "pallas"

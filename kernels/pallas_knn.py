"""Fused exact kNN in Pallas: the distance tile never leaves the chip.

The XLA path writes every (block_q, block_n) score tile to memory and reads it back
for `lax.top_k`. Here one kernel computes a tile's ranking scores

  l2: ||x||^2 - 2 <q, x>        ip: -<q, x>

with an f32 dot at `Precision.HIGHEST`, masks the ragged edge, and merges the tile
into a running top-k that stays on chip, written out once per query tile. Selection
uses only min/max/where/iota (no `lax.top_k`, no sort: neither exists inside a TPU
kernel, and Triton has no sort). Ties keep the lower index first, as in the XLA path.
The public wrapper (`kernels/api.py`) re-scores the winners; it passes the keys as they
are with their `Centring` (scale and mean), which the kernels apply to each key tile
on chip, so that no centred copy of the keys is ever made.

Two selections, chosen statically from k:

* k <= SMALL_K_MAX, "rounds": the running top-k is k unsorted slots per query row.
  Each round takes every row's smallest remaining tile score (lowest column on ties)
  and, where it beats the row's worst slot, replaces that slot and masks the entry.
  Rounds stop as soon as no row can improve, so after the first tiles most tiles
  cost one row-min. A final k rounds of row-min and mask sort the slots.
* SMALL_K_MAX < k <= MAX_K, "binned" (the design of the Pallas top-k in
  oliverdutton/tallax): the keys of a lane (column mod 128) form a bin, and each bin
  keeps its m best in m sorted registers, updated by a vectorized sinking insertion
  (compare and where, no reductions). At the end the k best lie among the bins'
  top-(m-1) whenever at least k of those beat the smallest m-th entry of any bin
  (every key outside a bin's top-(m-1) is no better than that bin's m-th entry).
  The kernel reports this certificate per query; rows without it are recomputed by
  the exact XLA search (`knn_xla`), inside a `lax.cond` that costs nothing when
  every row is certified. m = 2 ceil(k/128) + 6: if the k best fall into the 128
  bins like random balls, a bin rarely gets m - 1 of them (k <= 256: mean load <= 2,
  m - 1 >= 7); data whose near neighbours repeat with a period dividing 128 in index
  order can defeat it and then pays for the fallback (see the tests).

Backends:

* TPU (Mosaic): grid (query tiles "parallel", key tiles "arbitrary", innermost); the
  running top-k lives in VMEM scratch. Tiles follow the (8, 128) layout: block_q is
  rounded up to a multiple of 8, block_n to a multiple of 128; the running top-k is
  padded to whole 128-lane rows so every store is lane-dense. The default tiles keep
  an estimate of the kernel's VMEM use (`tpu_vmem_bytes`) under 12 MiB at every
  supported D and k, below the 16 MiB default scoped VMEM limit of a v5e.
* GPU (Triton, chosen deliberately over Mosaic GPU for the jax versions we support):
  in jax 0.10.2 Mosaic GPU is the default Pallas GPU lowering
  (`jax_pallas_use_mosaic_gpu` defaults to True) and the Triton lowering is on its
  way out, but Mosaic GPU cannot run this kernel exactly: it has no `dot_general`
  lowering for register values, and its tensor-core matmuls (`plgpu.wgmma`,
  `tcgen05_mma`) take f32 operands as TF32, which changes the neighbours (SPEC 3);
  it also targets Hopper and newer (and `pl.pallas_call` on it is deprecated in
  favour of `plgpu.kernel`), while Colab mostly offers older GPUs. The Triton
  lowering maps `Precision.HIGHEST` on f32 to `input_precision="ieee"`, is not tied
  to Hopper, and is still shipped in jax 0.12.0 (deprecated since jax 0.11.0: it
  warns when it lowers); it is selected explicitly by passing
  `pltriton.CompilerParams`. Triton has no scratch memory and no sequential
  grid axis, so the grid runs over (query tiles, splits of the key tiles) and a
  `fori_loop` walks a split's key tiles with the running top-k in registers (the
  splits' k best are merged in XLA: a few candidates per query, where one program per
  query tile would leave most of a large GPU idle on small batches); only the rounds
  selection is used (the binned registers would spill), so this kernel stops at
  k = GPU_MAX_K. For l2
  beyond it (or when `BlockSizes.pairs` asks), a second Triton kernel computes the
  XLA path's paired chunk minima on chip (`kernels/xla.py`): a fully parallel
  (query tiles, key tiles) grid, each program a GEMM tile (the dot in slices of
  PAIRS_DIM_STEP columns) whose epilogue reduces every chunk of PAIRS_CHUNK keys to
  its smallest position-tagged score and its second smallest, two int32 words where
  the XLA path would write PAIRS_CHUNK scores to memory. The selection from them
  (`xla.paired_select`: the k chunks, the winners read off their tagged minima, the
  few crowded chunks searched key by key, an exact fallback) runs in XLA. If a jax
  without `jax.experimental.pallas.triton` is installed, `is_supported(platform="gpu")`
  is False and `knn` falls back to XLA.
* CPU: `implementation="pallas"` runs the TPU kernel in interpret mode (slow by
  design; for tests). `is_supported` is False on CPU, so it is never the default.

What was run: every path in interpret mode on CPU (the TPU kernel under both the
generic interpreter and the TPU interpreter `pltpu.InterpretParams`, and the Triton
kernel bodies under the generic interpreter, the pairs kernel also through the whole
public wrapper's contract suite), and `jax.export` lowering to Mosaic TPU
and to Triton IR on CPU (every primitive has a lowering rule; block shapes pass the
lowering checks), see tests/test_knn_pallas.py; the whole test suite passed with jax
0.10.2 (Python 3.11) and 0.12.0.1 (Python 3.12). Nothing was compiled or run on a TPU
or GPU: Mosaic's layout passes, ptxas, VMEM/register budgets and the default tile
sizes are unverified; the compiled-mode tests are marked `accelerator`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from jax.experimental import pallas as pl

from resmem_jax.kernels.base import BlockSizes, Centring, centre_fn
from resmem_jax.kernels import xla
from resmem_jax.kernels.xla import knn_xla

try:  # Mosaic TPU: pure Python in jax, but keep a missing piece from breaking the import.
  from jax.experimental.pallas import tpu as pltpu
except ImportError:  # pragma: no cover
  pltpu = None
try:  # Triton: the Pallas GPU lowering we use (see the module docstring).
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
  pltriton = None

HIGHEST = lax.Precision.HIGHEST
LANES = 128
SUBLANES = 8
SMALL_K_MAX = 32  # rounds selection up to here, binned selection above
MAX_K = 256  # the binned registers, m * 128 lanes per row, must stay small in VMEM
GPU_MAX_K = 32  # Triton keeps the running top-k in registers (the rounds kernel)
PAIRS_CHUNK = 16  # keys per chunk of the GPU pairs kernel (l2, k > GPU_MAX_K)
PAIRS_BYTES = 1 << 30  # chunk pairs held at once by the GPU pairs path
PAIRS_DIM_STEP = 32  # columns per step of the pairs kernel's dot
TPU_MAX_DIM = 4096  # a (block_n, D) f32 key tile, double-buffered, must fit in VMEM
# Default TPU tiles keep `tpu_vmem_bytes` within this: Mosaic's default scoped VMEM
# limit is 16 MiB on v5e (32 MiB on v6e), and the estimate leaves out its own scratch.
TPU_VMEM_BUDGET = 12 << 20
GPU_MAX_DIM = 256  # a (block_n, D) key tile lives in registers
# The Triton rounds kernel splits the key tiles until its grid has about this many
# programs (a few per SM of a large GPU: 132 on an H100), each split at least
# GPU_MIN_SPLIT_TILES key tiles long (every split writes k candidates per query).
GPU_TARGET_PROGRAMS = 512
GPU_MIN_SPLIT_TILES = 8
_INT_MAX = np.iinfo(np.int32).max
_NT = (((1,), (1,)), ((), ()))  # q @ x.T without materializing the transpose


def default_block_sizes(platform: str, k: int, dim: int) -> BlockSizes:
  """Starting tiles per platform (not yet tuned on hardware: none was available).

  TPU: 128 query rows fill the MXU's rows; 512 keys keep the score tile at 256 KiB of
  VMEM; the key tile shrinks with D so that it stays near 1 MiB (128 keys at least, one
  lane row: 2 MiB at D = 4096), and the query tile halves from 128 rows until
  `tpu_vmem_bytes` fits TPU_VMEM_BUDGET (at D = 4096 and k > 32 it takes 64 rows). GPU
  (Triton): tiles small enough for the score tile and both operand tiles to sit in
  registers. CPU (interpret mode): few, large grid steps, since each step is
  interpreted.
  """
  if platform == "tpu":
    block_n = max(LANES, min(512, (1 << 18) // max(dim, 1) // LANES * LANES))
    block_q = 128
    while block_q > SUBLANES and tpu_vmem_bytes(block_q, block_n, dim, k) > TPU_VMEM_BUDGET:
      block_q //= 2
    return BlockSizes(block_q=block_q, block_n=block_n, chunk=0)
  if platform == "gpu" and k > GPU_MAX_K:  # the pairs kernel (l2)
    return BlockSizes(block_q=64, block_n=128, chunk=PAIRS_CHUNK, pairs=True)
  if platform == "gpu":
    if dim <= 64:
      return BlockSizes(block_q=64, block_n=64, chunk=0)
    return BlockSizes(block_q=32, block_n=32, chunk=0)
  return BlockSizes(block_q=64, block_n=512, chunk=0)


def tpu_vmem_bytes(block_q: int, block_n: int, dim: int, k: int) -> int:
  """An estimate of the TPU kernel's VMEM use, in bytes (not measured on a TPU).

  Counts, all 4-byte words: the input blocks, double-buffered (query and key tiles,
  the (1, D) centring rows and the (1, block_n) key norms, each padded to 8 sublanes);
  the output blocks, double-buffered; the running top-k scratch; and the largest
  values the kernel body holds: the centred key tile, four (block_q, block_n) tiles
  (scores, columns, masks) and, for the binned selection, a copy of its registers.
  Tile sizes are rounded to the (8, 128) layout as `_knn_tpu` rounds them.
  """
  block_q, block_n = _round_up(block_q, SUBLANES), _round_up(block_n, LANES)
  width = _round_up(k, LANES)
  binned = k > SMALL_K_MAX
  slots = binned_depth(k) * LANES if binned else width
  inputs = block_q * dim + block_n * dim + 2 * SUBLANES * dim + SUBLANES * block_n
  outputs = 2 * block_q * width + (block_q * LANES if binned else 0)
  scratch = 2 * block_q * slots
  body = block_n * dim + 4 * block_q * block_n + (scratch if binned else 0)
  return 4 * (2 * inputs + 2 * outputs + scratch + body)


def backend_for(platform: str) -> str:
  """The kernel that `knn_pallas` runs on `platform`: "triton" on GPU, else "tpu"
  (interpreted on CPU)."""
  return "triton" if platform == "gpu" else "tpu"


def max_k(backend: str, metric: str) -> int:
  """The largest k the kernel takes: the Triton rounds kernel keeps GPU_MAX_K slots in
  registers; l2 goes beyond through the pairs kernel."""
  if backend == "triton" and metric != "l2":
    return GPU_MAX_K
  return MAX_K


def uses_pairs(backend: str, k: int, metric: str, block_sizes: BlockSizes | None) -> bool:
  """Whether the search runs the GPU pairs kernel, whose ranking scores carry a
  position tag of under PAIRS_CHUNK units in the last place (`xla.PACKED_ULPS` bounds
  it; the certificate in `api.search_certified` allows for it)."""
  if backend != "triton" or metric != "l2":
    return False
  return k > GPU_MAX_K or (block_sizes is not None and block_sizes.pairs)


def is_supported(*, k: int, dim: int, dtype, platform: str, metric: str = "l2") -> bool:
  """Whether the compiled kernel handles this problem on `platform` ("tpu" or "gpu").

  Inputs are searched in float32 (bfloat16/float16 are promoted, float64 is not
  supported). False on CPU: there the kernel only runs in interpret mode.
  """
  if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
    return False
  if k < 1 or dim < 1:
    return False
  if platform == "tpu":
    return pltpu is not None and k <= MAX_K and dim <= TPU_MAX_DIM
  if platform == "gpu":
    return pltriton is not None and k <= max_k("triton", metric) and dim <= GPU_MAX_DIM
  return False


def binned_depth(k: int) -> int:
  """Registers per lane bin, m: the certificate uses the top-(m-1) of each bin."""
  return 2 * pl.cdiv(k, LANES) + 6


# --------------------------------------------------------------------------------------
# Selection from min/max/where only, on values (shared by the TPU and Triton kernels).


def _row_any(mask) -> jax.Array:
  """Scalar: whether any entry of a 2-D boolean mask is set (one axis at a time:
  Triton reduces a single axis per op)."""
  return jnp.max(jnp.max(mask.astype(jnp.int32), axis=1), axis=0) > 0


def _centring_rows(centring: Centring | None, dim: int) -> tuple[jax.Array, jax.Array]:
  """`centring` as two (1, D) float32 rows, the scale repeated and the mean, which
  the kernels apply to each key tile they load (identity for None)."""
  if centring is None:
    return jnp.ones((1, dim), jnp.float32), jnp.zeros((1, dim), jnp.float32)
  scale = jnp.broadcast_to(centring.scale.astype(jnp.float32), (1, dim))
  return scale, centring.mean.astype(jnp.float32).reshape(1, dim)


def _tile_scores(q, x, x_sq, col0, n: int, metric: str):
  """Ranking scores of one tile, +inf past the last key, and their global columns."""
  dots = lax.dot_general(q, x, _NT, precision=HIGHEST, preferred_element_type=jnp.float32)
  scores = -dots if metric == "ip" else x_sq - 2.0 * dots
  cols = col0 + lax.broadcasted_iota(jnp.int32, (1, scores.shape[1]), 1)
  # Out-of-range columns hold whatever the padded tile held (possibly NaN): replace,
  # never combine arithmetically.
  return jnp.where(cols < n, scores, jnp.inf), cols


def _empty_slots(rows: int, slots: int, k: int):
  """Running top-k: slots < k start empty (+inf, distinct indices above any key);
  slots >= k are disabled (-inf, never the worst, so never replaced)."""
  lane = lax.broadcasted_iota(jnp.int32, (rows, slots), 1)
  values = jnp.where(lane < k, jnp.inf, -jnp.inf).astype(jnp.float32)
  indices = jnp.where(lane < k, _INT_MAX - lane, -1)
  return values, indices


def merge_rounds(scores, cols, best, best_idx):
  """Merges a tile into the running top-k slots, one entry per row per round.

  A round takes each row's smallest remaining score (lowest column among equals); if
  it is below the row's worst slot it replaces that slot (the highest index among
  equal worst values) and is masked. Tiles come in column order, so a tile entry that
  merely equals the worst value has the higher index and rightly loses. The loop ends
  when no row's minimum beats its worst slot: at most k rounds, often none.
  """

  def worst(best):
    return jnp.max(best, axis=1, keepdims=True)

  def cond(carry):
    _, best, _, tile_min = carry
    return _row_any(tile_min < worst(best))

  def body(carry):
    scores, best, best_idx, tile_min = carry
    w = worst(best)
    w_idx = jnp.max(jnp.where(best == w, best_idx, -2), axis=1, keepdims=True)
    col = jnp.min(jnp.where(scores == tile_min, cols, _INT_MAX), axis=1, keepdims=True)
    replace = (tile_min < w) & (best_idx == w_idx)
    best = jnp.where(replace, tile_min, best)
    best_idx = jnp.where(replace, col, best_idx)
    scores = jnp.where(cols == col, jnp.inf, scores)
    return scores, best, best_idx, jnp.min(scores, axis=1, keepdims=True)

  init = (scores, best, best_idx, jnp.min(scores, axis=1, keepdims=True))
  _, best, best_idx, _ = lax.while_loop(cond, body, init)
  return best, best_idx


def extract_sorted(values, indices, k: int, width: int):
  """The k smallest (value, index) pairs of each row, ascending, by k rounds of
  row-min and mask; returned in `width` lanes (lanes >= k hold +inf and -1)."""
  rows = values.shape[0]
  lane = lax.broadcasted_iota(jnp.int32, (1, width), 1)

  def body(r, carry):
    values, out, out_idx = carry
    v = jnp.min(values, axis=1, keepdims=True)
    i = jnp.min(jnp.where(values == v, indices, _INT_MAX), axis=1, keepdims=True)
    out = jnp.where(lane == r, v, out)
    out_idx = jnp.where(lane == r, i, out_idx)
    return jnp.where(indices == i, jnp.inf, values), out, out_idx

  init = (values, jnp.full((rows, width), jnp.inf, jnp.float32),
          jnp.full((rows, width), -1, jnp.int32))
  _, out, out_idx = lax.fori_loop(0, k, body, init)
  return out, out_idx


def sink_into_bins(bubble, bubble_idx, regs, regs_idx):
  """Inserts one (rows, 128) chunk into per-lane sorted registers (a sinking insert).

  Every entry of a lane arrives with a higher index than those stored, so it goes
  before the first register it is strictly below; from there each register takes the
  one above it (`taken` stays set down the chain). Lists of m (rows, 128) arrays.
  """
  taken = jnp.zeros(bubble.shape, jnp.bool_)
  for i in range(len(regs)):
    taken = taken | (bubble < regs[i])
    regs[i], bubble = jnp.where(taken, bubble, regs[i]), jnp.where(taken, regs[i], bubble)
    regs_idx[i], bubble_idx = (jnp.where(taken, bubble_idx, regs_idx[i]),
                               jnp.where(taken, regs_idx[i], bubble_idx))
  return regs, regs_idx


def certify_and_extract(regs, regs_idx, k: int, width: int):
  """The k best from the bins' top-(m-1), and whether they are provably the k best.

  Pivot P = the smallest m-th entry over all bins, as a (value, index) pair. Every key
  outside its bin's top-(m-1) is >= its bin's m-th entry >= P, so if at least k
  entries of the top-(m-1) are strictly below P, they contain the k best.
  """
  last, last_idx = regs[-1], regs_idx[-1]
  p = jnp.min(last, axis=1, keepdims=True)
  p_idx = jnp.min(jnp.where(last == p, last_idx, _INT_MAX), axis=1, keepdims=True)
  values = jnp.concatenate(regs[:-1], axis=1)
  indices = jnp.concatenate(regs_idx[:-1], axis=1)
  below = (values < p) | ((values == p) & (indices < p_idx))
  certified = jnp.sum(below.astype(jnp.int32), axis=1, keepdims=True) >= k
  out, out_idx = extract_sorted(values, indices, k, width)
  return out, out_idx, certified.astype(jnp.int32)


# --------------------------------------------------------------------------------------
# TPU kernels (Mosaic; also what CPU interpret mode runs).


def _rounds_kernel(q_ref, x_ref, scale_ref, mean_ref, x_sq_ref, out_ref, out_idx_ref, best_ref,
                   best_idx_ref, *, k: int, n: int, metric: str):
  j = pl.program_id(1)
  block_n = x_ref.shape[0]

  @pl.when(j == 0)
  def _():
    best_ref[...], best_idx_ref[...] = _empty_slots(*best_ref.shape, k)

  x = x_ref[...] * scale_ref[...] - mean_ref[...]  # the key tile, centred on chip
  scores, cols = _tile_scores(q_ref[...], x, x_sq_ref[...], j * block_n, n, metric)
  best_ref[...], best_idx_ref[...] = merge_rounds(scores, cols, best_ref[...],
                                                  best_idx_ref[...])

  @pl.when(j == pl.num_programs(1) - 1)
  def _():
    best = best_ref[...]
    lane = lax.broadcasted_iota(jnp.int32, best.shape, 1)
    out_ref[...], out_idx_ref[...] = extract_sorted(
        jnp.where(lane < k, best, jnp.inf), best_idx_ref[...], k, out_ref.shape[1])


def _binned_kernel(q_ref, x_ref, scale_ref, mean_ref, x_sq_ref, out_ref, out_idx_ref, ok_ref,
                   regs_ref, regs_idx_ref, *, k: int, n: int, metric: str, depth: int):
  j = pl.program_id(1)
  block_n = x_ref.shape[0]
  bins = [pl.ds(i * LANES, LANES) for i in range(depth)]

  @pl.when(j == 0)
  def _():
    regs_ref[...] = jnp.full(regs_ref.shape, jnp.inf, jnp.float32)
    regs_idx_ref[...] = jnp.full(regs_idx_ref.shape, _INT_MAX, jnp.int32)

  x = x_ref[...] * scale_ref[...] - mean_ref[...]  # the key tile, centred on chip
  scores, cols = _tile_scores(q_ref[...], x, x_sq_ref[...], j * block_n, n, metric)
  chunks = [slice(c * LANES, (c + 1) * LANES) for c in range(block_n // LANES)]
  # Exact skip: a tile with no entry below its lane's m-th best changes no bin.
  last = regs_ref[:, bins[-1]]
  hit = functools.reduce(jnp.logical_or, [scores[:, c] < last for c in chunks])

  @pl.when(_row_any(hit))
  def _():
    regs = [regs_ref[:, b] for b in bins]
    regs_idx = [regs_idx_ref[:, b] for b in bins]
    for c in chunks:
      col = jnp.broadcast_to(cols[:, c], regs_idx[0].shape)
      regs, regs_idx = sink_into_bins(scores[:, c], col, regs, regs_idx)
    for b, r, ri in zip(bins, regs, regs_idx):
      regs_ref[:, b] = r
      regs_idx_ref[:, b] = ri

  @pl.when(j == pl.num_programs(1) - 1)
  def _():
    regs = [regs_ref[:, b] for b in bins]
    regs_idx = [regs_idx_ref[:, b] for b in bins]
    out_ref[...], out_idx_ref[...], ok = certify_and_extract(regs, regs_idx, k,
                                                             out_ref.shape[1])
    ok_ref[...] = ok


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pad_rows(x, rows: int):
  return x if x.shape[0] >= rows else jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


def _knn_tpu(queries, keys, k: int, metric: str, block_sizes: BlockSizes, interpret,
             centring: Centring | None = None):
  n_q, dim = queries.shape
  n = keys.shape[0]
  block_q = min(_round_up(block_sizes.block_q, SUBLANES), _round_up(n_q, SUBLANES))
  block_n = min(_round_up(block_sizes.block_n, LANES), _round_up(n, LANES))
  # Arrays smaller than one tile are padded (a copy of less than one tile); larger
  # ones get a ragged last tile that the kernel masks, without a padded copy.
  centre = centre_fn(centring)
  queries = _pad_rows(centre(queries), block_q)
  keys = _pad_rows(keys, block_n)
  scale, mean = _centring_rows(centring, dim)
  x_sq = xla.squared_norms(keys, centre)[None, :]
  width = _round_up(k, LANES)
  grid = (pl.cdiv(queries.shape[0], block_q), pl.cdiv(keys.shape[0], block_n))
  in_specs = [
      pl.BlockSpec((block_q, dim), lambda i, j: (i, 0)),
      pl.BlockSpec((block_n, dim), lambda i, j: (j, 0)),
      pl.BlockSpec((1, dim), lambda i, j: (0, 0)),
      pl.BlockSpec((1, dim), lambda i, j: (0, 0)),
      pl.BlockSpec((1, block_n), lambda i, j: (0, j)),
  ]
  row_spec = pl.BlockSpec((block_q, width), lambda i, j: (i, 0))
  out_shape = [jax.ShapeDtypeStruct((queries.shape[0], width), jnp.float32),
               jax.ShapeDtypeStruct((queries.shape[0], width), jnp.int32)]
  if k <= SMALL_K_MAX:
    kernel = functools.partial(_rounds_kernel, k=k, n=n, metric=metric)
    out_specs = [row_spec, row_spec]
    scratch = [pltpu.VMEM((block_q, width), jnp.float32),
               pltpu.VMEM((block_q, width), jnp.int32)]
  else:
    depth = binned_depth(k)
    kernel = functools.partial(_binned_kernel, k=k, n=n, metric=metric, depth=depth)
    out_specs = [row_spec, row_spec, pl.BlockSpec((block_q, 1), lambda i, j: (i, 0))]
    out_shape.append(jax.ShapeDtypeStruct((queries.shape[0], 1), jnp.int32))
    scratch = [pltpu.VMEM((block_q, depth * LANES), jnp.float32),
               pltpu.VMEM((block_q, depth * LANES), jnp.int32)]
  outs = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
      name="knn_pallas_tpu",
  )(queries, keys, scale, mean, x_sq)
  outs = [o[:n_q, :k] for o in outs[:2]] + [o[:n_q] for o in outs[2:]]
  return outs


# --------------------------------------------------------------------------------------
# GPU kernel (Triton).


def key_splits(query_tiles: int, key_tiles: int) -> tuple[int, int]:
  """(splits, key tiles per split) of the Triton rounds kernel's (query tiles, splits)
  grid: enough splits to give the GPU about GPU_TARGET_PROGRAMS programs, none shorter
  than GPU_MIN_SPLIT_TILES tiles (but one split at least) and none empty.

  Without splits, a batch of 1000 queries in tiles of 64 is 16 programs, each walking
  every key: 16 busy SMs of an H100's 132.
  """
  wanted = -(-GPU_TARGET_PROGRAMS // query_tiles)
  splits = max(1, min(wanted, key_tiles // GPU_MIN_SPLIT_TILES))
  per_split = -(-key_tiles // splits)
  return -(-key_tiles // per_split), per_split


def _triton_kernel(q_ref, x_ref, scale_ref, mean_ref, x_sq_ref, out_ref, out_idx_ref, *,
                   k: int, n: int, dim: int, block_n: int, tiles_per_split: int,
                   metric: str):
  """One (query tile, key split) program: the k best of its key tiles, sorted."""
  block_q, dim_p = q_ref.shape
  dim_mask = lax.broadcasted_iota(jnp.int32, (1, dim_p), 1) < dim
  # The operand tiles are padded to powers of two (Triton's shapes); masked loads
  # read zeros there (the centred keys too: scale and mean read 0), which change
  # neither dots nor norms.
  q = pltriton.load(q_ref, mask=dim_mask, other=0.0)
  scale = pltriton.load(scale_ref, mask=dim_mask, other=0.0)
  mean = pltriton.load(mean_ref, mask=dim_mask, other=0.0)

  def body(t, carry):
    best, best_idx = carry
    start = t * block_n
    rows = start + lax.broadcasted_iota(jnp.int32, (block_n, 1), 0)
    x = pltriton.load(x_ref.at[pl.ds(start, block_n), :], mask=(rows < n) & dim_mask,
                      other=0.0) * scale - mean
    x_sq = pltriton.load(x_sq_ref.at[:, pl.ds(start, block_n)],
                         mask=(rows.reshape(1, block_n) < n), other=0.0)
    scores, cols = _tile_scores(q, x, x_sq, start, n, metric)
    return merge_rounds(scores, cols, best, best_idx)

  width = out_ref.shape[1]
  init = _empty_slots(block_q, width, k)
  first = pl.program_id(1) * tiles_per_split
  last = jnp.minimum(first + tiles_per_split, pl.cdiv(n, block_n))
  best, best_idx = lax.fori_loop(first, last, body, init)
  lane = lax.broadcasted_iota(jnp.int32, (1, width), 1)
  out, out_idx = extract_sorted(jnp.where(lane < k, best, jnp.inf), best_idx, k, width)
  out_ref[...] = out
  out_idx_ref[...] = out_idx


def _knn_triton(queries, keys, k: int, metric: str, block_sizes: BlockSizes, interpret,
                centring: Centring | None = None):
  n_q, dim = queries.shape
  n = keys.shape[0]
  # Triton needs power-of-two shapes and at least 16 along each dot dimension.
  block_q = max(16, pl.next_power_of_2(min(block_sizes.block_q, n_q)))
  block_n = max(16, pl.next_power_of_2(min(block_sizes.block_n, n)))
  dim_p = max(16, pl.next_power_of_2(dim))
  width = max(2, pl.next_power_of_2(k))
  # Padding the queries to whole tiles copies fewer than block_q rows.
  centre = centre_fn(centring)
  queries = _pad_rows(centre(queries), _round_up(n_q, block_q))
  scale, mean = _centring_rows(centring, dim)
  x_sq = xla.squared_norms(keys, centre)[None, :]
  query_tiles = queries.shape[0] // block_q
  splits, tiles_per_split = key_splits(query_tiles, pl.cdiv(n, block_n))
  kernel = functools.partial(_triton_kernel, k=k, n=n, dim=dim, block_n=block_n,
                             tiles_per_split=tiles_per_split, metric=metric)
  # Split j's candidates fill columns [j * width, (j + 1) * width) of each row.
  shape = (queries.shape[0], splits * width)
  out, out_idx = pl.pallas_call(
      kernel,
      grid=(query_tiles, splits),
      in_specs=[
          pl.BlockSpec((block_q, dim_p), lambda i, j: (i, 0)),
          pl.BlockSpec((n, dim_p), lambda i, j: (0, 0)),
          pl.BlockSpec((1, dim_p), lambda i, j: (0, 0)),
          pl.BlockSpec((1, dim_p), lambda i, j: (0, 0)),
          pl.BlockSpec((1, n), lambda i, j: (0, 0)),
      ],
      out_specs=[pl.BlockSpec((block_q, width), lambda i, j: (i, j))] * 2,
      out_shape=[jax.ShapeDtypeStruct(shape, jnp.float32),
                 jax.ShapeDtypeStruct(shape, jnp.int32)],
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="knn_pallas_triton",
  )(queries, keys, scale, mean, x_sq)
  out, out_idx = out[:n_q], out_idx[:n_q]
  if splits == 1:
    return out[:, :k], out_idx[:, :k]
  # The splits hold increasing key ranges, each sorted lower index first on ties, so
  # a stable selection by position keeps the lower index first across splits too.
  best = xla._smallest(out, k)  # pylint: disable=protected-access
  return (jnp.take_along_axis(out, best, axis=1),
          jnp.take_along_axis(out_idx, best, axis=1))


def _triton_pairs_kernel(q_ref, x_ref, scale_ref, mean_ref, x_sq_ref, first_ref, second_ref, *,
                         n: int, dim: int, chunk: int):
  """One (key tile, query tile) block of chunk pairs: GEMM-shaped, no loop, no state.

  Keys-major like `xla._tile_pairs`: the (block_n, block_q) score tile is cut into
  chunks of `chunk` rows, and each chunk gives its smallest tagged score and its second
  smallest (the tags make a chunk's scores distinct, so the second is the minimum of
  what is not the first). Rows past the last key score the largest float, as in XLA.
  """
  block_q, dim_p = q_ref.shape
  block_n = first_ref.shape[0] * chunk
  start = pl.program_id(1) * block_n
  rows = lax.broadcasted_iota(jnp.int32, (block_n, 1), 0)
  valid = start + rows < n
  # The dot in slices of `step` columns, as a matmul kernel does: the operand slices
  # stay small in registers and the loop's loads can be pipelined.
  step = min(dim_p, PAIRS_DIM_STEP)

  def accumulate(s, dots):
    cols = pl.ds(s * step, step)
    dim_mask = s * step + lax.broadcasted_iota(jnp.int32, (1, step), 1) < dim
    q = pltriton.load(q_ref.at[:, cols], mask=dim_mask, other=0.0)
    x = pltriton.load(x_ref.at[pl.ds(start, block_n), cols], mask=valid & dim_mask,
                      other=0.0)
    # Centred on chip; padded columns read scale and mean 0, so they stay 0.
    x = (x * pltriton.load(scale_ref.at[:, cols], mask=dim_mask, other=0.0)
         - pltriton.load(mean_ref.at[:, cols], mask=dim_mask, other=0.0))
    return dots + lax.dot_general(x, q, _NT, precision=HIGHEST,
                                  preferred_element_type=jnp.float32)

  dots = lax.fori_loop(0, dim_p // step, accumulate,
                       jnp.zeros((block_n, block_q), jnp.float32))
  x_sq = pltriton.load(x_sq_ref.at[pl.ds(start, block_n), :], mask=valid, other=0.0)
  scores = jnp.where(valid, x_sq - 2.0 * dots, float(jnp.finfo(jnp.float32).max))
  tagged = xla.tag_positions(scores, rows & (chunk - 1), chunk)
  tagged = tagged.reshape(block_n // chunk, chunk, block_q)
  first = jnp.min(tagged, axis=1)
  first_ref[...] = first
  second_ref[...] = jnp.min(jnp.where(tagged == first[:, None, :], _INT_MAX, tagged), axis=1)


def triton_chunk_pairs(queries, keys, x_sq, *, chunk: int, block_q: int, block_n: int,
                       interpret, centring: Centring | None = None
                       ) -> tuple[jax.Array, jax.Array]:
  """Every chunk's tagged minimum and second score, (ceil(N / chunk), Q) int32 each,
  keys-major as `xla._chunk_pairs` gives them; Q a multiple of `block_q`, `x_sq` the
  (N, 1) squared norms of the centred keys, `block_q` and `block_n` powers of two,
  `block_n` a multiple of `chunk`. `queries` are centred already; the key tiles are
  centred by `centring` on chip."""
  n_q = queries.shape[0]
  n, dim = keys.shape
  dim_p = max(16, pl.next_power_of_2(dim))
  n_key_tiles = pl.cdiv(n, block_n)
  pair_spec = pl.BlockSpec((block_n // chunk, block_q), lambda i, j: (j, i))
  scale, mean = _centring_rows(centring, dim)
  first, second = pl.pallas_call(
      functools.partial(_triton_pairs_kernel, n=n, dim=dim, chunk=chunk),
      grid=(n_q // block_q, n_key_tiles),
      in_specs=[
          pl.BlockSpec((block_q, dim_p), lambda i, j: (i, 0)),
          pl.BlockSpec((n, dim_p), lambda i, j: (0, 0)),
          pl.BlockSpec((1, dim_p), lambda i, j: (0, 0)),
          pl.BlockSpec((1, dim_p), lambda i, j: (0, 0)),
          pl.BlockSpec((n, 1), lambda i, j: (0, 0)),
      ],
      out_specs=[pair_spec, pair_spec],
      out_shape=[jax.ShapeDtypeStruct((n_key_tiles * block_n // chunk, n_q), jnp.int32)] * 2,
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="knn_pallas_triton_pairs",
  )(queries, keys, scale, mean, x_sq)
  n_chunks = pl.cdiv(n, chunk)  # whole tiles of padding rows are no chunks
  return first[:n_chunks], second[:n_chunks]


def _knn_triton_pairs(queries, keys, k: int, block_sizes: BlockSizes, interpret,
                      centring: Centring | None = None):
  """l2 at any k <= MAX_K on the GPU: chunk pairs on chip, the selection in XLA.

  The kernel is a fully parallel (query tiles, key tiles) grid that writes, per chunk
  of `chunk` keys, two int32 words instead of `chunk` scores; `xla.paired_select`
  then picks the k chunks, reads the winners off their tagged minima, and searches
  only the few crowded chunks key by key (the exact step of the XLA path where more
  than `xla.PAIR_SLOTS` are crowded). Queries go in blocks whose pairs stay under
  `PAIRS_BYTES`.
  """
  n_q, dim = queries.shape
  n = keys.shape[0]
  chunk = block_sizes.chunk if block_sizes.pairs else PAIRS_CHUNK
  if k * chunk >= n:  # too few keys for chunks to prune anything
    return knn_xla(queries, keys, k, metric="l2", centring=centring)
  block_q = max(16, pl.next_power_of_2(min(block_sizes.block_q, n_q)))
  block_n = max(16, chunk, pl.next_power_of_2(min(block_sizes.block_n, n)))
  centre = centre_fn(centring)
  x_sq = xla.squared_norms(keys, centre)[:, None]
  # Queries per block: a whole number of query tiles whose pairs fit in PAIRS_BYTES.
  per_tile = pl.cdiv(n, block_n) * block_n // chunk * block_q * 8
  block = block_q * max(1, min(pl.cdiv(n_q, block_q), PAIRS_BYTES // per_tile))
  n_blocks = pl.cdiv(n_q, block)

  def one_block(q):
    first, second = triton_chunk_pairs(q, keys, x_sq, chunk=chunk, block_q=block_q,
                                       block_n=block_n, interpret=interpret,
                                       centring=centring)
    return xla.paired_select(q, keys, x_sq[:, 0], first, second, k, chunk, centre)

  queries = _pad_rows(centre(queries), n_blocks * block)
  best, best_idx = lax.map(one_block, queries.reshape(n_blocks, block, dim))
  return best.reshape(-1, k)[:n_q], best_idx.reshape(-1, k)[:n_q]


# --------------------------------------------------------------------------------------
# Entry point (registered in kernels/api.py as implementation "pallas").


def knn_pallas(queries: Float[Array, "Q D"], keys: Float[Array, "N D"], k: int, *,
               metric: str = "l2", block_sizes: BlockSizes | None = None,
               backend: str | None = None, interpret=None, centring: Centring | None = None
               ) -> tuple[Float[Array, "Q k"], Int[Array, "Q k"]]:
  """Ranking scores and int32 indices of the k best keys per query, ascending.

  Ranks `centring(queries)` against `centring(keys)` as the public wrapper `knn`
  passes them, and returns its ranking scores (l2: ||x||^2 - 2 <q, x>; ip: -<q, x>),
  equal scores lower index first. The kernels centre each key tile on chip (two
  (1, D) rows: the scale and the mean), so no centred copy of the keys is made.

  Args:
    queries: (Q, D) float32 (bfloat16/float16 are promoted).
    keys: (N, D), same dtype.
    k: 1 <= k <= min(N, MAX_K); on the Triton backend k <= GPU_MAX_K.
    metric: "l2" or "ip".
    block_sizes: tiles; `default_block_sizes(platform, k, D)` if None. `chunk` is not
      used (the kernel's selection needs no chunk pruning).
    backend: "tpu" (Mosaic TPU kernel) or "triton" (GPU kernel); None picks "triton"
      on GPU and "tpu" elsewhere (interpreted on CPU).
    interpret: passed to `pallas_call`; None interprets exactly when on CPU.
    centring: the `Centring` of the inputs; None searches them as they are.

  Returns:
    (scores (Q, k) float32, indices (Q, k) int32).

  Raises:
    ValueError: float64 inputs, or k beyond the kernel's maximum.
  """
  platform = jax.default_backend()
  if backend is None:
    backend = backend_for(platform)
  if interpret is None:
    interpret = platform == "cpu"
  dtype = jnp.promote_types(queries.dtype, jnp.float32)
  if dtype != jnp.float32:
    raise ValueError(f"the Pallas kNN kernel searches float32, got dtype={dtype}; "
                     "use implementation='xla' for float64")
  largest_k = max_k(backend, metric)
  if not 1 <= k <= largest_k:
    raise ValueError(f"{k=} must be in [1, {largest_k}] for the Pallas kNN kernel "
                     f"({backend=}, {metric=}); use implementation='xla'")
  queries = queries.astype(jnp.float32)
  keys = keys.astype(jnp.float32)
  if block_sizes is None:
    block_sizes = default_block_sizes("gpu" if backend == "triton" else platform, k,
                                      queries.shape[1])
  if uses_pairs(backend, k, metric, block_sizes):
    return _knn_triton_pairs(queries, keys, k, block_sizes, interpret, centring)
  if backend == "triton":
    return _knn_triton(queries, keys, k, metric, block_sizes, interpret, centring)
  outs = _knn_tpu(queries, keys, k, metric, block_sizes, interpret, centring)
  if len(outs) == 2:
    return tuple(outs)
  scores, indices, certified = outs
  certified = certified[:, 0] > 0

  def fallback(_):
    # Exact, and only run when some row's bins could not certify their top-k. Unpaired
    # tiles: paired minima would tag the scores (`xla.PACKED_ULPS`), and the public
    # certificate allows for tags only where `uses_pairs` says so, which it does not here.
    tiles, _ = xla.tiling(k, keys.shape[0], keys.shape[1], keys.dtype, metric, None)
    exact, exact_idx = knn_xla(queries, keys, k, metric=metric, centring=centring,
                               block_sizes=dataclasses.replace(tiles, pairs=False))
    return (jnp.where(certified[:, None], scores, exact),
            jnp.where(certified[:, None], indices, exact_idx))

  return lax.cond(jnp.all(certified), lambda _: (scores, indices), fallback, None)

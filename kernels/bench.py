"""Benchmark of the exact kNN against FAISS and scikit-learn, on the same float32 data.

    python -m resmem_jax.kernels.bench                      # C1, C2, C3 (minutes)
    python -m resmem_jax.kernels.bench --quick              # small shapes, < 1 minute
    python -m resmem_jax.kernels.bench --cpu-devices 1      # one JAX CPU device only
    python -m resmem_jax.kernels.bench --configs C1,C3 --repeats 5 --out knn_bench.json

Configs (Gaussian keys and queries, seed 0; k neighbours, metric l2):
  C1: N=100k, Q=10k, d=128, k=10     C2: C1 with k=100     C3: N=1M, Q=1k, d=64, k=10

Everything runs in one process, so the methods share the machine's state; on a shared
machine compare the ratios (to FAISS, to the sgemm rate) rather than the seconds.
Columns:
  seconds     best of `--repeats` timed calls after one warm-up call (jit compile),
              wall clock, inputs already in memory (jax arrays for the JAX methods);
  cpu_s       process CPU time of that best call (all threads): about 2x seconds when
              both cores work, about 1x when one does or the machine is busy;
  GFLOP/s     2 Q N d / seconds (the matmul work; selection is not counted);
  x_faiss     FAISS seconds / seconds (> 1: faster than faiss.IndexFlatL2);
  sgemm_frac  GFLOP/s / the rate of a 4096^3 float32 jnp.dot at Precision.HIGHEST,
              the best of the measurements before and after the configs;
  cpu_frac    the same ratio per CPU-second (GFLOP / cpu_s over the sgemm's): the
              share of the work that is matmul, robust to other processes on the
              machine, but blind to time lost waiting on serial parts;
  recall      mean over queries of |returned indices & true indices| / k, the truth
              being a float64 NumPy brute force (computed in query blocks);
  recall_f32  recall, counting as found a returned key whose float64 distance is within
              one float32 ulp of the true k-th distance (a tie no float32 search can
              order: SPEC "exact up to float32 rounding");
  peak_mb     peak resident memory above the level before a call, sampled every
              2 ms from /proc/self/statm, the maximum over all calls including the
              warm-up (so JAX's compilation too); outputs included, inputs excluded.
`xla` and `reference` are `resmem_jax.knn(..., implementation=...)`: the public op,
with validation, query buckets and the exact re-scoring of the winners. The process
starts JAX with one CPU device per core (`--cpu-devices`), the CPU analogue of FAISS's
OpenMP threads: `knn` then splits the queries over the devices, so the single-threaded
top-k selections of different queries run at once (same bits as one device).
`xla-1dev` is the same search with its inputs committed to one device, in the same
process: what a program that keeps the default single CPU device gets. The
reference forms the whole (Q, N) matrix and only runs where that fits in 2 GiB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import resmem_jax

REFERENCE_MAX_BYTES = 2 << 30
FAISS_THREADS = 2


@dataclasses.dataclass(frozen=True)
class Config:
  n: int  # keys
  q: int  # queries
  d: int  # dimension
  k: int  # neighbours

  @property
  def flops(self) -> float:
    return 2.0 * self.q * self.n * self.d


CONFIGS = {
    "C1": Config(n=100_000, q=10_000, d=128, k=10),
    "C2": Config(n=100_000, q=10_000, d=128, k=100),
    "C3": Config(n=1_000_000, q=1_000, d=64, k=10),
}
QUICK_CONFIGS = {
    "C1": Config(n=20_000, q=1_000, d=128, k=10),
    "C2": Config(n=20_000, q=1_000, d=128, k=100),
    "C3": Config(n=200_000, q=200, d=64, k=10),
}


# --------------------------------------------------------------------------------------
# Measurement.


class PeakRss:
  """Peak resident set size above the level at entry, sampled by a thread."""

  def __init__(self, interval: float = 0.002):
    self.interval = interval
    self.page = os.sysconf("SC_PAGE_SIZE")

  def _rss(self) -> int:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * self.page

  def __enter__(self):
    self.base = self.peak = self._rss()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self._rss())
      time.sleep(self.interval)

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self._rss())

  @property
  def increase_mb(self) -> float:
    return (self.peak - self.base) / 2**20


def time_best(fn: Callable[[], object], repeats: int) -> tuple[float, float, float, object]:
  """(best wall seconds, its CPU seconds, peak MiB over all calls, last output)."""
  with PeakRss() as rss:  # warm-up: compilation, first-touch allocations
    out = fn()
  best = (np.inf, np.inf)
  peak = rss.increase_mb
  for _ in range(repeats):
    with PeakRss() as rss:
      wall, cpu = time.perf_counter(), time.process_time()
      out = fn()
      wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = max(peak, rss.increase_mb)
    best = min(best, (wall, cpu))
  return best[0], best[1], peak, out


def sgemm_rate(repeats: int, size: int = 4096) -> tuple[float, float]:
  """GFLOP per second and per CPU-second of a float32 size^3 jnp.dot at HIGHEST."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  matmul = jax.jit(lambda a: jnp.dot(a, a, precision=jax.lax.Precision.HIGHEST))
  seconds, cpu, *_ = time_best(lambda: matmul(a).block_until_ready(), repeats)
  return 2.0 * size**3 / seconds / 1e9, 2.0 * size**3 / cpu / 1e9


def true_neighbours(queries: np.ndarray, keys: np.ndarray, k: int, block: int = 500
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Float64 brute force (centred, in query blocks): (Q, k) indices, nearest first, and
  their (Q, k) Euclidean distances."""
  x = keys.astype(np.float64)
  mean = x.mean(axis=0)
  x -= mean
  x_sq = np.einsum("nd,nd->n", x, x)
  out = np.empty((len(queries), k), np.int64)
  dist = np.empty((len(queries), k), np.float64)
  for start in range(0, len(queries), block):
    q = queries[start:start + block].astype(np.float64) - mean
    scores = x_sq[None, :] - 2.0 * (q @ x.T)  # ||q||^2 does not change a row's order
    part = np.argpartition(scores, k - 1, axis=1)[:, :k]
    order = np.argsort(np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    out[start:start + block] = np.take_along_axis(part, order, axis=1)
    dist[start:start + block] = np.sqrt(np.maximum(
        np.take_along_axis(scores, out[start:start + block], axis=1)
        + np.einsum("qd,qd->q", q, q)[:, None], 0.0))
  return out, dist


def shared_oracle(cache: dict, config: Config, configs: list[Config], queries: np.ndarray,
                  keys: np.ndarray, compute=None, label: str = "float64"
                  ) -> tuple[np.ndarray, np.ndarray]:
  """`compute(queries, keys, k)` (default `true_neighbours`) for `config`, cut to its k.

  Configs on the same data (C1, C2) share one oracle in `cache`, computed once at the
  largest k among `configs`.
  """
  shape = (config.n, config.q, config.d)
  if shape not in cache:
    start = time.perf_counter()
    k_max = max(other.k for other in configs if (other.n, other.q, other.d) == shape)
    cache[shape] = (compute or true_neighbours)(queries, keys, k_max)
    print(f"  {label} oracle (k={k_max}): {time.perf_counter() - start:.1f}s", flush=True)
  return tuple(t[:, :config.k] for t in cache[shape])


def recalls(indices: np.ndarray, truth: np.ndarray, truth_dist: np.ndarray,
            queries: np.ndarray, keys: np.ndarray) -> tuple[float, float]:
  """(recall, recall_f32) of (Q, k) returned indices against the float64 truth.

  recall: mean over queries of |returned & true| / k. recall_f32 also counts as found
  a returned key outside the true k whose float64 distance is within one float32 ulp
  of the true k-th distance: a tie at float32 resolution, which no float32 search can
  order (the SPEC's "up to float32 rounding"), in place of a missed true neighbour that
  is itself such a tie (never of a nearer one). A key returned twice counts once, and
  an index outside [0, N) (FAISS's -1 for a missing result) never: a search that
  repeats one right key k times has recall 1 / k, not 1.
  """
  hits = ties = 0
  kth = truth_dist[:, -1]
  for row, (a, b) in enumerate(zip(indices, truth)):
    a = np.unique(a[(a >= 0) & (a < len(keys))])
    found = np.isin(b, a)
    hits += int(found.sum())
    extra = np.setdiff1d(a, b, assume_unique=True)
    if len(extra):
      ulp = np.spacing(np.float32(kth[row]))
      d = np.linalg.norm(keys[extra].astype(np.float64) - queries[row].astype(np.float64),
                         axis=1)
      tied = int(np.sum(np.abs(d - kth[row]) <= ulp))
      missed_tied = int(np.sum(kth[row] - truth_dist[row][~found] <= ulp))
      ties += min(tied, missed_tied)
  return hits / truth.size, (hits + ties) / truth.size


# --------------------------------------------------------------------------------------
# Methods: each takes the float32 NumPy data and returns a zero-argument search.


def jax_method(implementation: str, one_device: bool = False,
               block_sizes: resmem_jax.BlockSizes | None = None):
  def make(queries, keys, k):
    q, x = jnp.asarray(queries), jnp.asarray(keys)
    if one_device:  # committed inputs: knn stays on this device
      q, x = jax.device_put((q, x), jax.devices()[0])

    def search():
      result = resmem_jax.knn(q, x, k, implementation=implementation,
                              block_sizes=block_sizes)
      return np.asarray(jax.block_until_ready(result.indices))

    return search

  return make


def faiss_method(queries, keys, k):
  import faiss  # pytype: disable=import-error

  faiss.omp_set_num_threads(FAISS_THREADS)
  index = faiss.IndexFlatL2(keys.shape[1])
  index.add(keys)
  return lambda: index.search(queries, k)[1]


def sklearn_method(queries, keys, k):
  from sklearn.neighbors import NearestNeighbors

  model = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(keys)
  return lambda: model.kneighbors(queries, return_distance=False)


def available_methods(config: Config) -> dict[str, Callable]:
  methods = {"xla": jax_method("xla")}
  if jax.local_device_count() > 1:
    methods["xla-1dev"] = jax_method("xla", one_device=True)
  if config.q * config.n * 4 <= REFERENCE_MAX_BYTES:
    methods["reference"] = jax_method("reference")
  try:
    import faiss  # noqa: F401  pytype: disable=import-error
    methods["faiss"] = faiss_method
  except ImportError:
    print("faiss-cpu is not installed: pip install faiss-cpu (no FAISS column)")
  try:
    import sklearn  # noqa: F401
    methods["sklearn"] = sklearn_method
  except ImportError:
    print("scikit-learn is not installed: no sklearn column")
  return methods


# --------------------------------------------------------------------------------------
# Driver.


def make_data(config: Config, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  keys = rng.standard_normal((config.n, config.d), dtype=np.float32)
  queries = rng.standard_normal((config.q, config.d), dtype=np.float32)
  return queries, keys


def run(names: list[str], *, quick: bool, repeats: int) -> dict:
  configs = QUICK_CONFIGS if quick else CONFIGS
  started = time.time()
  print(f"sgemm 4096^3 ...", flush=True)
  gemm_before = sgemm_rate(repeats)
  rows = []
  truths = {}
  for name in names:
    config = configs[name]
    print(f"\n{name}: N={config.n} Q={config.q} d={config.d} k={config.k}", flush=True)
    queries, keys = make_data(config)
    truth, truth_dist = shared_oracle(truths, config, [configs[n] for n in names],
                                      queries, keys)
    for method, make in available_methods(config).items():
      print(f"  {method} ...", end=" ", flush=True)
      seconds, cpu, peak, indices = time_best(make(queries, keys, config.k), repeats)
      strict, with_ties = recalls(np.asarray(indices), truth, truth_dist, queries, keys)
      rows.append(dict(config=name, method=method, n=config.n, q=config.q, d=config.d,
                       k=config.k, seconds=seconds, cpu_s=cpu,
                       gflops=config.flops / seconds / 1e9,
                       recall=strict, recall_f32=with_ties,
                       peak_mb=peak,
                       data_mb=(queries.nbytes + keys.nbytes) / 2**20))
      print(f"{seconds:.3f}s", flush=True)
  gemm_after = sgemm_rate(repeats)
  gemm = max(gemm_before[0], gemm_after[0])
  gemm_cpu = max(gemm_before[1], gemm_after[1])
  for row in rows:
    faiss_row = [r for r in rows if r["config"] == row["config"] and r["method"] == "faiss"]
    row["x_faiss"] = faiss_row[0]["seconds"] / row["seconds"] if faiss_row else None
    row["sgemm_frac"] = row["gflops"] / gemm
    row["sgemm_cpu_frac"] = row["q"] * row["n"] * row["d"] * 2e-9 / row["cpu_s"] / gemm_cpu
  return dict(
      rows=rows, sgemm_gflops=gemm, sgemm_gflops_before=gemm_before[0],
      sgemm_gflops_after=gemm_after[0], sgemm_gflops_per_cpu_s=gemm_cpu,
      quick=quick, repeats=repeats,
      recall_truth="float64 NumPy brute force",
      peak_mb_method="max over calls (warm-up included) of peak RSS above the pre-call level, /proc/self/statm sampled every 2 ms",
      machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                   jax_cpu_devices=jax.local_device_count(),
                   load_average_end=os.getloadavg(), jax=jax.__version__,
                   backend=jax.default_backend()),
      wall_seconds=time.time() - started)


def format_table(result: dict) -> str:
  header = (f"{'config':6} {'method':9} {'seconds':>8} {'cpu_s':>7} {'GFLOP/s':>8} "
            f"{'x_faiss':>7} {'sgemm_frac':>10} {'cpu_frac':>8} {'recall':>8} "
            f"{'recall_f32':>10} {'peak_mb':>8}")
  lines = [header, "-" * len(header)]
  for r in result["rows"]:
    x_faiss = f"{r['x_faiss']:.2f}" if r["x_faiss"] is not None else "-"
    lines.append(f"{r['config']:6} {r['method']:9} {r['seconds']:8.3f} {r['cpu_s']:7.2f} "
                 f"{r['gflops']:8.1f} {x_faiss:>7} {r['sgemm_frac']:10.2f} "
                 f"{r['sgemm_cpu_frac']:8.2f} "
                 f"{r['recall']:8.6f} {r['recall_f32']:10.6f} {r['peak_mb']:8.0f}")
  lines.append(f"sgemm 4096^3 (jnp.dot, HIGHEST): {result['sgemm_gflops']:.1f} GFLOP/s "
               f"(before {result['sgemm_gflops_before']:.1f}, after "
               f"{result['sgemm_gflops_after']:.1f}), "
               f"{result['sgemm_gflops_per_cpu_s']:.1f} GFLOP per CPU-second; recall against the "
               f"{result['recall_truth']}; load average at the end "
               f"{', '.join(f'{x:.1f}' for x in result['machine']['load_average_end'])}")
  return "\n".join(lines)


def add_common_arguments(parser: argparse.ArgumentParser, configs: dict, *, quick_help: str,
                         out: str) -> None:
  """--configs, --quick, --repeats and --out, shared with `bench_gpu`."""
  parser.add_argument("--configs", default=",".join(configs),
                      help="comma-separated, of " + ",".join(configs))
  parser.add_argument("--quick", action="store_true", help=quick_help)
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per method")
  parser.add_argument("--out", default=out, help="JSON output path")


def config_names(parser: argparse.ArgumentParser, args, configs: dict) -> list[str]:
  """The --configs names, after checking them and --repeats (exits 2 on bad input)."""
  names = [name.strip() for name in args.configs.split(",") if name.strip()]
  unknown = [name for name in names if name not in configs]
  if unknown:
    parser.error(f"unknown configs {unknown}; choose from {sorted(configs)}")
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  return names


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_common_arguments(parser, CONFIGS, quick_help="small shapes, < 1 minute",
                       out="knn_bench.json")
  parser.add_argument("--cpu-devices", type=int, default=os.cpu_count(),
                      help="JAX CPU devices (default: one per core); knn splits the "
                           "queries over them. 1 gives the single-device search alone")
  args = parser.parse_args(argv)
  if args.cpu_devices < 1:
    parser.error(f"--cpu-devices must be >= 1, got {args.cpu_devices}")
  names = config_names(parser, args, CONFIGS)
  # Fixed when the CPU backend starts, so before any array exists (and after every
  # argument is checked: a rejected command line leaves the process as it found it).
  jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  result = run(names, quick=args.quick, repeats=args.repeats)
  print("\n" + format_table(result))
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

"""What ResMem costs on top of its kNN search, and what a whole tuning grid costs.

Measures, in one process and on the same random data:
  knn      rm.knn(queries, keys, k)                       the bare exact search
  predict  rm.predict(mem, queries, logits, k, sigma)     search + weights + residuals
  sweep    rm.sweep(mem, ..., ks x sigmas x temperatures) one search at max(ks) + every
           (k, sigma, T) of ResMem and the baselines (deepnet, soft kNN, kNN-LM with
           5 lambdas); ks = those of (1, 5, 10, 20, 50) below --k, and --k
Targets (issue 3): predict <= 1.15 x knn; a 5 x 6 x 4 sweep <= 2 x predict.

Each timing is the median of `--repeats` runs after one warm-up run (compilation
excluded), with the result blocked on.

Command (defaults are the issue's sizes):
  python experiments/bench_core.py --out /tmp/bench_core.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import resmem_jax as rm
from resmem_jax import analysis


def timed(fn, repeats: int) -> tuple[float, list[float]]:
  jax.block_until_ready(fn())  # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=50_000)
  parser.add_argument("--q", type=int, default=10_000)
  parser.add_argument("--d", type=int, default=64)
  parser.add_argument("--c", type=int, default=100)
  parser.add_argument("--k", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="bench_core.json")
  args = parser.parse_args(argv)
  for name in ("n", "q", "d", "c", "k", "repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  if args.k > args.n:
    parser.error(f"--k must be <= --n, got k={args.k}, n={args.n}")
  return args


def main(argv=None):
  args = parse_args(argv)

  rng = np.random.default_rng(0)
  keys = jnp.asarray(rng.normal(size=(args.n, args.d)).astype(np.float32))
  queries = jnp.asarray(rng.normal(size=(args.q, args.d)).astype(np.float32))
  labels = rng.integers(0, args.c, args.n)
  logits = (2 * rng.normal(size=(args.n, args.c))).astype(np.float32)
  q_logits = jnp.asarray((2 * rng.normal(size=(args.q, args.c))).astype(np.float32))
  q_labels = rng.integers(0, args.c, args.q)
  mem = rm.build_memory(keys, labels, logits, task="classification", temperature=1.0)
  # Up to args.k, so the sweep searches at the k that knn and predict use.
  ks = tuple(sorted({k for k in (1, 5, 10, 20, 50) if k < args.k} | {args.k}))
  grid = dict(ks=ks, sigmas=(0.1, 0.3, 1.0, 3.0, 10.0, 30.0), temperatures=(0.5, 1.0, 2.0, 4.0))

  t_knn, all_knn = timed(lambda: rm.knn(queries, keys, args.k), args.repeats)
  t_pred, all_pred = timed(
      lambda: rm.predict(mem, queries, q_logits, k=args.k, sigma=1.0), args.repeats)
  sweep_result = {}

  def run_sweep():
    sweep_result["r"] = rm.sweep(mem, queries, q_logits, q_labels, **grid)
    return jnp.zeros(())

  t_sweep, all_sweep = timed(run_sweep, args.repeats)
  n_settings = len(sweep_result["r"].table)
  n_resmem = len(ks) * len(grid["sigmas"]) * len(grid["temperatures"])

  rows = [("knn", t_knn, 1.0, "-"), ("predict", t_pred, t_pred / t_knn, "<= 1.15 x knn"),
          (f"sweep {len(ks)}x{len(grid['sigmas'])}x{len(grid['temperatures'])}", t_sweep,
           t_sweep / t_knn, f"<= 2 x predict (got {t_sweep / t_pred:.2f}x)")]
  header = (f"N={args.n} Q={args.q} D={args.d} C={args.c} k={args.k}  "
            f"backend={jax.default_backend()} devices={jax.device_count()} "
            f"cpu={platform.processor() or platform.machine()}")
  print(header)
  print(f"{'op':<16}{'median s':>10}{'x knn':>8}  target")
  for name, t, ratio, target in rows:
    print(f"{name:<16}{t:>10.3f}{ratio:>8.2f}  {target}")
  print(f"sweep scored {n_settings} settings ({n_resmem} ResMem (k, sigma, T), the rest "
        f"baselines) from one search; best ResMem: {sweep_result['r'].best['resmem']}")
  record = dict(config=vars(args), grid={k: list(v) for k, v in grid.items()},
                backend=jax.default_backend(), device_count=jax.device_count(),
                jax_version=jax.__version__, hardware=analysis.hardware(),
                provenance=analysis.provenance(),
                seconds=dict(knn=all_knn, predict=all_pred, sweep=all_sweep),
                median=dict(knn=t_knn, predict=t_pred, sweep=t_sweep),
                ratio=dict(predict_over_knn=t_pred / t_knn, sweep_over_predict=t_sweep / t_pred),
                sweep_settings=n_settings, resmem_settings=n_resmem)
  analysis.write_json(args.out, record)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

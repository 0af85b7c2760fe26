"""Accelerator benchmark of the exact kNN: the Pallas kernel against the XLA path and torch.

    python -m resmem_jax.kernels.bench_gpu --out gpu_bench.json      # C1, C2, C3, G4
    python -m resmem_jax.kernels.bench_gpu --tiles 32x32,64x128p     # also Pallas tiles
    python -m resmem_jax.kernels.bench_gpu --quick                    # tiny shapes (on CPU
                                                                      # the kernel is interpreted)

Configs (Gaussian float32 data, seed 0, metric l2): C1, C2 and C3 of `kernels/bench.py`,
and G4: N=1M, Q=10k, d=256, k=10. Everything runs in one process on JAX's default
device, on the same data, so the ratios between methods are measured side by side.

Methods:
  pallas       `resmem_jax.knn(..., implementation="pallas")`: the public op (validation,
               centring, the kernel, exact re-scoring, certificate), default tiles;
  pallas BQxBN the same with `BlockSizes(block_q=BQ, block_n=BN)` (`--tiles`); BQxBNp
               with the GPU pairs kernel (chunk pairs, chunk 16) also at k <= 32;
  pallas-raw   the kernel alone (`pallas_knn.knn_pallas`, jitted) on centred inputs: its
               own throughput, without the wrapper;
  xla          `resmem_jax.knn(..., implementation="xla")`, the blocked XLA search;
  torch        `torch.cdist` + `torch.topk(largest=False)` in float32 with TF32 off (the
               same precision as ours), in blocks of `--torch-block` queries (G4's whole
               (Q, N) matrix would be 40 GB). Only where torch sees the device.
On GPU, k + margin <= 32 runs the Triton rounds kernel and larger k (C2) the Triton
pairs kernel (l2). Where the kernel does not support a config, its rows say so instead
of a time. A method that raises (say, a kernel that does not compile with this jax)
gets a row with its error, its traceback goes to stderr, and the run goes on; the JSON
is rewritten after every config, so a run cut short keeps what it measured; the exit
status is 1 if any method failed.

Columns:
  seconds     best of `--repeats` calls after one warm-up call (compilation), the device
              synchronized, inputs already on the device;
  TFLOP/s     2 Q N d / seconds (the matmul work; selection is not counted);
  frac_peak   TFLOP/s / the FP32 (non-tensor-core) peak of the GPU model, from NVIDIA's
              datasheets (`FP32_PEAK_TFLOPS`); None for a model not in the table;
  frac_sgemm  TFLOP/s / a float32 8192^3 `jnp.dot` at Precision.HIGHEST in the same run;
  x_xla       xla seconds / seconds;  x_torch: torch seconds / seconds;
  recall      |returned & true| / k averaged over queries, against a float64 oracle
              (torch float64 on the device where torch is there, else NumPy);
  recall_f32  the same, counting a returned key within one float32 ulp of the true k-th
              distance as found (a float32 tie; see `kernels/bench.py`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import sys
import time
import traceback
from typing import Callable

# JAX would otherwise take 75% of the GPU's memory when it starts, leaving torch (the
# baseline and the float64 oracle) too little; read when the backend starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from resmem_jax.kernels import api  # noqa: E402
from resmem_jax.kernels.base import BlockSizes  # noqa: E402
from resmem_jax.kernels import bench  # noqa: E402
from resmem_jax.kernels.bench import Config, jax_method  # noqa: E402

try:
  from resmem_jax.kernels import pallas_knn
except ImportError:  # pragma: no cover - a jax without Pallas
  pallas_knn = None

CONFIGS = {**bench.CONFIGS, "G4": Config(n=1_000_000, q=10_000, d=256, k=10)}
QUICK_CONFIGS = {
    "C1": Config(n=4096, q=256, d=128, k=10),
    "C2": Config(n=4096, q=256, d=128, k=100),
    "C3": Config(n=16_384, q=64, d=64, k=10),
    "G4": Config(n=8192, q=128, d=256, k=10),
}
# FP32 (CUDA-core, not tensor-core) peak TFLOP/s from NVIDIA's datasheets, matched in
# order against `device_kind` as whole words (more specific names first: "L4" must
# not match an L40S, nor "H200" an H200 NVL).
FP32_PEAK_TFLOPS = (
    ("H100 PCIe", 51.2), ("H100 NVL", 60.0), ("H100", 66.9), ("H200 NVL", 60.0),
    ("H200", 66.9), ("A100", 19.5), ("L40S", 91.6), ("L40", 90.5), ("L4", 30.3),
    ("T4", 8.1), ("V100", 15.7),
)
SGEMM_SIZE = 8192


def fp32_peak(device_kind: str) -> float | None:
  for name, peak in FP32_PEAK_TFLOPS:
    if re.search(rf"\b{re.escape(name)}\b", device_kind, re.IGNORECASE):
      return peak
  return None


# --------------------------------------------------------------------------------------
# torch (optional): the usual GPU baseline, and a float64 oracle on the device.


def torch_device():
  """The torch device matching JAX's backend, or None (no torch, or it cannot see it)."""
  try:
    import torch  # pytype: disable=import-error
  except ImportError:
    return None
  if jax.default_backend() == "gpu":
    return torch.device("cuda") if torch.cuda.is_available() else None
  return torch.device("cpu") if jax.default_backend() == "cpu" else None


def torch_method(device, block: int):
  import torch  # pytype: disable=import-error

  def make(queries, keys, k):
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 products, as ours
    torch.backends.cudnn.allow_tf32 = False
    q = torch.from_numpy(queries).to(device)
    x = torch.from_numpy(keys).to(device)

    def search():
      parts = []
      for start in range(0, q.shape[0], block):
        dist = torch.cdist(q[start:start + block], x)
        parts.append(torch.topk(dist, k, dim=1, largest=False).indices)
      out = torch.cat(parts)
      if device.type == "cuda":
        torch.cuda.synchronize()
      return out

    return lambda: search().cpu().numpy()

  return make


def torch_true_neighbours(queries, keys, k, device, block: int = 1024):
  """`bench.true_neighbours` in torch float64 on `device`: (Q, k) indices, distances."""
  import torch  # pytype: disable=import-error

  x = torch.from_numpy(keys).to(device, torch.float64)
  mean = x.mean(dim=0)
  x -= mean
  x_sq = (x * x).sum(dim=1)
  out, dist = [], []
  for start in range(0, len(queries), block):
    q = torch.from_numpy(queries[start:start + block]).to(device, torch.float64) - mean
    scores = x_sq[None, :] - 2.0 * (q @ x.T)
    best = torch.topk(scores, k, dim=1, largest=False, sorted=True)
    out.append(best.indices.cpu().numpy())
    dist.append(torch.sqrt(torch.clamp(best.values + (q * q).sum(dim=1, keepdim=True),
                                       min=0.0)).cpu().numpy())
  return np.concatenate(out), np.concatenate(dist)


# --------------------------------------------------------------------------------------
# JAX methods.


def pallas_raw_method(queries, keys, k):
  """The kernel alone on centred inputs, at the public op's candidate count."""
  m = api.n_candidates(k, keys.shape[0])
  mean = keys.mean(axis=0, dtype=np.float64).astype(np.float32)
  q, x = jnp.asarray(queries - mean), jnp.asarray(keys - mean)
  kernel = jax.jit(lambda q, x: pallas_knn.knn_pallas(q, x, m, metric="l2")[1])

  def search():
    return np.asarray(jax.block_until_ready(kernel(q, x)))[:, :k]

  return search


def pallas_support(config: Config, backend: str) -> str | None:
  """None if the kernel runs this config on `backend`, else the reason it does not."""
  if pallas_knn is None:
    return "this jax has no Pallas"
  m = api.n_candidates(config.k, config.n)
  if backend == "cpu":  # interpreted: the TPU kernel's limits
    return None if m <= pallas_knn.MAX_K else f"k + margin = {m} > MAX_K = {pallas_knn.MAX_K}"
  if pallas_knn.is_supported(k=m, dim=config.d, dtype=jnp.float32, platform=backend):
    return None
  limit = pallas_knn.max_k(pallas_knn.backend_for(backend), "l2")
  max_dim = pallas_knn.GPU_MAX_DIM if backend == "gpu" else pallas_knn.TPU_MAX_DIM
  return (f"k + margin = {m}, d = {config.d}: beyond the {backend} kernel "
          f"(k <= {limit}, d <= {max_dim})")


def parse_tiles(text: str) -> list[BlockSizes]:
  """"BQxBN" entries, comma-separated; a trailing "p" asks for the GPU pairs kernel
  (chunk pairs, chunk 16) at any k, e.g. "64x128p"."""
  tiles = []
  for item in filter(None, (part.strip() for part in text.split(","))):
    spec = item.lower()
    pairs = spec.endswith("p")
    try:
      block_q, block_n = (int(v) for v in spec.removesuffix("p").split("x"))
      tiles.append(BlockSizes(block_q=block_q, block_n=block_n,
                              chunk=pallas_knn.PAIRS_CHUNK if pairs else 0, pairs=pairs))
    except ValueError as err:
      raise ValueError(f"--tiles entry {item!r} must be BQxBN or BQxBNp with positive "
                       f"ints ({err})") from None
  return tiles


def tile_name(tiles: BlockSizes) -> str:
  return f"pallas {tiles.block_q}x{tiles.block_n}{'p' if tiles.pairs else ''}"


def methods_for(config: Config, backend: str, tiles: list[BlockSizes], torch_dev,
                torch_block: int) -> tuple[dict[str, Callable], dict[str, str]]:
  """({name: make(queries, keys, k) -> search}, {name: why it is skipped})."""
  methods, skipped = {}, {}
  reason = pallas_support(config, backend)
  pallas = {"pallas": jax_method("pallas"), "pallas-raw": pallas_raw_method}
  pallas.update({tile_name(t): jax_method("pallas", block_sizes=t) for t in tiles})
  if reason is None:
    methods.update(pallas)
  else:
    skipped.update(dict.fromkeys(pallas, reason))
  methods["xla"] = jax_method("xla")
  if torch_dev is not None:
    methods["torch"] = torch_method(torch_dev, torch_block)
  else:
    skipped["torch"] = "torch is not installed or does not see this device"
  return methods, skipped


# --------------------------------------------------------------------------------------
# Driver.


def _measure(name: str, method: str, config: Config, make: Callable, queries, keys, truth,
             truth_dist, repeats: int, sgemm: float, peak: float | None, oracle: str) -> dict:
  """One method's row; a method that raises gets an `error` row instead of a time."""
  row = dict(config=name, method=method, n=config.n, q=config.q, d=config.d, k=config.k,
             seconds=None)
  try:
    # Every search returns host indices, so the device has finished when it returns.
    seconds, _, _, indices = bench.time_best(make(queries, keys, config.k), repeats)
  except Exception as err:  # noqa: BLE001 - one broken method must not lose the others
    traceback.print_exc()
    message = str(err).strip().splitlines()
    row["error"] = type(err).__name__ + (f": {message[0][:300]}" if message else "")
    return row
  strict, with_ties = bench.recalls(np.asarray(indices), truth, truth_dist, queries, keys)
  tflops = config.flops / seconds / 1e12
  row.update(seconds=seconds, tflops=tflops, frac_peak=tflops / peak if peak else None,
             frac_sgemm=tflops / sgemm, recall=strict, recall_f32=with_ties, oracle=oracle)
  return row


def _add_ratios(rows: list[dict]) -> None:
  """x_xla and x_torch of every timed row, against the same config's peer rows."""
  for row in rows:
    for peer in ("xla", "torch"):
      other = [r for r in rows if r["config"] == row["config"] and r["method"] == peer
               and r["seconds"]]
      row[f"x_{peer}"] = (other[0]["seconds"] / row["seconds"]
                          if other and row["seconds"] else None)


def run(names: list[str], *, quick: bool, repeats: int, tiles: list[BlockSizes],
        torch_block: int, out: str | None = None) -> dict:
  """Times every method on every config; with `out`, rewrites that JSON after each
  config, so a run cut short (a time limit, a crash) still leaves what it measured."""
  configs = QUICK_CONFIGS if quick else CONFIGS
  backend = jax.default_backend()
  device = jax.devices()[0]
  torch_dev = torch_device()
  started = time.time()
  size = 1024 if backend == "cpu" else SGEMM_SIZE
  print(f"{device.device_kind} ({backend}); sgemm {size}^3 ...", flush=True)
  sgemm = bench.sgemm_rate(repeats, size)[0] / 1e3
  peak = fp32_peak(device.device_kind) if backend == "gpu" else None
  if torch_dev is not None:
    oracle = f"torch float64 on {torch_dev}"
    compute = functools.partial(torch_true_neighbours, device=torch_dev)
  else:
    oracle, compute = "NumPy float64", bench.true_neighbours
  torch = sys.modules.get("torch")  # imported by torch_device() when installed
  rows = []
  result = dict(
      rows=rows, sgemm_tflops=sgemm, sgemm_size=size, fp32_peak_tflops=peak,
      quick=quick, repeats=repeats, complete=False,
      machine=dict(device_kind=device.device_kind, backend=backend,
                   platform=platform.platform(), jax=jax.__version__,
                   torch=torch and torch.__version__,
                   pallas_gpu_backend="triton" if backend == "gpu" else None))
  truths = {}
  for name in names:
    config = configs[name]
    print(f"\n{name}: N={config.n} Q={config.q} d={config.d} k={config.k}", flush=True)
    queries, keys = bench.make_data(config)
    truth, truth_dist = bench.shared_oracle(truths, config, [configs[n] for n in names],
                                            queries, keys, compute, oracle)
    methods, skipped = methods_for(config, backend, tiles, torch_dev, torch_block)
    for method, make in methods.items():
      print(f"  {method} ...", end=" ", flush=True)
      row = _measure(name, method, config, make, queries, keys, truth, truth_dist, repeats,
                     sgemm, peak, oracle)
      rows.append(row)
      print(f"failed: {row['error']}" if row["seconds"] is None
            else f"{row['seconds']:.4f}s  recall {row['recall']:.6f}", flush=True)
    for method, why in skipped.items():
      rows.append(dict(config=name, method=method, n=config.n, q=config.q, d=config.d,
                       k=config.k, seconds=None, skipped=why))
      print(f"  {method}: skipped ({why})", flush=True)
    _add_ratios(rows)
    result["wall_seconds"] = time.time() - started
    if out:
      _write(result, out)
  result["complete"] = True
  return result


def _write(result: dict, path: str) -> None:
  with open(path, "w") as f:
    json.dump(result, f, indent=2)


def _fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def format_table(result: dict) -> str:
  header = (f"{'config':6} {'method':16} {'seconds':>9} {'TFLOP/s':>8} {'frac_peak':>9} "
            f"{'frac_sgemm':>10} {'x_xla':>6} {'x_torch':>7} {'recall':>8} {'recall_f32':>10}")
  lines = [header, "-" * len(header)]
  for r in result["rows"]:
    if r["seconds"] is None:
      why = f"skipped: {r['skipped']}" if "skipped" in r else f"FAILED: {r['error']}"
      lines.append(f"{r['config']:6} {r['method']:16} {why}")
      continue
    lines.append(
        f"{r['config']:6} {r['method']:16} {r['seconds']:9.4f} {r['tflops']:8.2f} "
        f"{_fmt(r['frac_peak'], '.2f'):>9} {r['frac_sgemm']:10.2f} "
        f"{_fmt(r['x_xla'], '.2f'):>6} {_fmt(r['x_torch'], '.2f'):>7} "
        f"{r['recall']:8.6f} {r['recall_f32']:10.6f}")
  m = result["machine"]
  lines.append(f"{m['device_kind']} ({m['backend']}), jax {m['jax']}, torch {m['torch']}; "
               f"sgemm {result['sgemm_size']}^3 (jnp.dot, HIGHEST) "
               f"{result['sgemm_tflops']:.2f} TFLOP/s; FP32 peak "
               f"{_fmt(result['fp32_peak_tflops'], '.1f')} TFLOP/s")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  bench.add_common_arguments(parser, CONFIGS, quick_help="tiny shapes (plumbing)",
                             out="gpu_bench.json")
  parser.add_argument("--tiles", default="", help="extra Pallas tiles, e.g. 32x32,64x128p "
                      "(p: the GPU pairs kernel)")
  parser.add_argument("--torch-block", type=int, default=2048,
                      help="queries per torch.cdist call")
  args = parser.parse_args(argv)
  names = bench.config_names(parser, args, CONFIGS)
  if args.torch_block < 1:
    parser.error(f"--torch-block must be >= 1, got {args.torch_block}")
  try:
    tiles = parse_tiles(args.tiles)
  except ValueError as err:
    parser.error(str(err))
  if jax.default_backend() == "cpu" and not args.quick:
    parser.error("no GPU or TPU: the Pallas kernel would run interpreted; use --quick "
                 "(plumbing) or kernels/bench.py (CPU speed)")
  result = run(names, quick=args.quick, repeats=args.repeats, tiles=tiles,
               torch_block=args.torch_block, out=args.out)
  print("\n" + format_table(result))
  _write(result, args.out)
  print(f"wrote {args.out}")
  failed = [f"{r['config']} {r['method']}" for r in result["rows"] if "error" in r]
  if failed:
    print(f"{len(failed)} method(s) failed: {', '.join(failed)}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()

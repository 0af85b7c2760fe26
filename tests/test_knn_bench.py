"""The kNN benchmark runs end to end (small shapes) and writes what the README reports.

Speed is never asserted here (the machine is shared): only that every column is
there, that the JAX searches are exact, and that the CPU-device option takes effect.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from resmem_jax.kernels import bench

BENCH = "resmem_jax.kernels.bench"


def test_quick_bench_writes_exact_rows_for_both_device_layouts(tmp_path, run_module):
  out = tmp_path / "bench.json"
  proc = run_module(BENCH, "--quick", "--configs", "C1,C2", "--repeats", "1",
                    "--cpu-devices", "2", "--out", str(out))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["machine"]["jax_cpu_devices"] == 2
  rows = {(r["config"], r["method"]): r for r in result["rows"]}
  for config in ("C1", "C2"):
    for method in ("xla", "xla-1dev"):
      row = rows[(config, method)]
      # Exact up to float32 rounding: a key within one float32 ulp of the true k-th
      # distance is a tie no float32 search can order (C2 quick has one such row).
      assert row["recall_f32"] == 1.0, row
      assert row["recall"] >= 0.9999, row
      assert row["seconds"] > 0 and row["gflops"] > 0 and row["peak_mb"] >= 0
  # The peers: scikit-learn always (a dependency), FAISS where the bench extra is
  # installed. Neither re-scores its winners, so only near-exactness is asked of them;
  # a method timed on the wrong data or misread would score near 0.
  has_faiss = importlib.util.find_spec("faiss") is not None
  for config in ("C1", "C2"):
    for method in ("sklearn", "faiss") if has_faiss else ("sklearn",):
      assert rows[(config, method)]["recall_f32"] >= 0.999, rows[(config, method)]
    if has_faiss:
      assert rows[(config, "faiss")]["x_faiss"] == 1.0
      assert rows[(config, "xla")]["x_faiss"] > 0
    else:
      assert (config, "faiss") not in rows and rows[(config, "xla")]["x_faiss"] is None
  assert ("faiss-cpu is not installed" in proc.stdout) != has_faiss
  assert result["sgemm_gflops"] > 0
  assert "recall_f32" in proc.stdout


@pytest.mark.parametrize("args", [("--cpu-devices", "0"), ("--configs", "C9"),
                                  ("--repeats", "0")])
def test_bench_rejects_bad_arguments(args, capsys):
  """In this process: every argument is checked before the CPU device count is set."""
  with pytest.raises(SystemExit) as exit_info:
    bench.main(list(args))
  assert exit_info.value.code == 2, args
  stderr = capsys.readouterr().err
  assert args[0] in stderr or args[1] in stderr, stderr[-1000:]


def test_recall_counts_each_true_neighbour_once():
  """A search that repeated one right key k times scored recall 1; FAISS's -1 (no
  result) read the last key."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  keys = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]], np.float32)
  queries = np.zeros((1, 1), np.float32)
  truth, truth_dist = np.array([[0, 1, 2]]), np.array([[0.0, 1.0, 2.0]])
  assert bench.recalls(np.array([[0, 1, 2]]), truth, truth_dist, queries, keys) == (1.0, 1.0)
  assert bench.recalls(np.array([[0, 0, 0]]), truth, truth_dist, queries, keys) == (1 / 3, 1 / 3)
  assert bench.recalls(np.array([[0, 1, -1]]), truth, truth_dist, queries, keys) == (2 / 3, 2 / 3)
  # A key at the k-th distance (a float32 tie) counts for recall_f32 in place of a
  # missed neighbour at that distance, not of a nearer one (key 1 below).
  tied = np.array([[0.0], [1.0], [2.0], [2.0], [2.0]], np.float32)
  assert bench.recalls(np.array([[0, 1, 3]]), truth, truth_dist, queries, tied) == (2 / 3, 1.0)
  assert bench.recalls(np.array([[0, 3, 4]]), truth, truth_dist, queries, tied) == (1 / 3, 2 / 3)

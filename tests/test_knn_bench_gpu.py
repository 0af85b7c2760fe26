"""The accelerator benchmark's plumbing, on CPU: tiny shapes with the kernel interpreted.

Its numbers only mean something on a GPU; here it must run end to end, write every
column, find the exact neighbours with each method, and refuse what it cannot measure.
"""

from __future__ import annotations

import json

import pytest

from resmem_jax.kernels import bench_gpu

BENCH = "resmem_jax.kernels.bench_gpu"


def test_quick_run_writes_exact_rows_for_every_method(tmp_path, run_module):
  out = tmp_path / "gpu.json"
  proc = run_module(BENCH, "--quick", "--configs", "C1,C2", "--repeats", "1",
                    "--tiles", "16x256", "--out", str(out))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["machine"]["backend"] == "cpu"
  assert result["sgemm_tflops"] > 0 and result["fp32_peak_tflops"] is None
  rows = {(r["config"], r["method"]): r for r in result["rows"]}
  for config in ("C1", "C2"):
    for method in ("pallas", "pallas-raw", "pallas 16x256", "xla"):
      row = rows[(config, method)]
      assert row["recall_f32"] == 1.0 and row["recall"] >= 0.999, row
      assert row["seconds"] > 0 and row["tflops"] > 0 and row["frac_peak"] is None
    assert rows[(config, "xla")]["x_xla"] == 1.0
    torch_row = rows[(config, "torch")]
    if torch_row["seconds"] is None:  # torch absent (or blind to the device): said so
      assert "torch" in torch_row["skipped"]
  assert "recall_f32" in proc.stdout and "skipped" in proc.stdout


@pytest.mark.parametrize("args,needle", [
    (("--configs", "C9"), "C9"),
    (("--quick", "--repeats", "0"), "--repeats"),
    (("--quick", "--tiles", "16x"), "--tiles"),
    (("--quick", "--torch-block", "0"), "--torch-block"),
    ((), "--quick"),  # no accelerator: a full run would time the interpreter
])
def test_rejects_what_it_cannot_measure(args, needle, capsys):
  with pytest.raises(SystemExit) as exit_info:
    bench_gpu.main(list(args))
  assert exit_info.value.code == 2, args
  stderr = capsys.readouterr().err
  assert needle in stderr, stderr[-1000:]


def test_fp32_peak_matches_the_most_specific_model():
  assert bench_gpu.fp32_peak("NVIDIA H100 PCIe") == 51.2
  assert bench_gpu.fp32_peak("NVIDIA H100 80GB HBM3") == 66.9
  assert bench_gpu.fp32_peak("NVIDIA H200") == 66.9
  assert bench_gpu.fp32_peak("TPU v5 lite") is None
  # Whole words: "L4" used to match an L40S (30.3 for 91.6), "H200" an H200 NVL.
  assert bench_gpu.fp32_peak("NVIDIA L40S") == 91.6
  assert bench_gpu.fp32_peak("NVIDIA L40") == 90.5
  assert bench_gpu.fp32_peak("NVIDIA L4") == 30.3
  assert bench_gpu.fp32_peak("NVIDIA H200 NVL") == 60.0
  assert bench_gpu.fp32_peak("NVIDIA GH200 480GB") is None


def test_unsupported_configs_are_reported_not_timed():
  # C2 (k = 100: 106 candidates) runs the GPU pairs kernel; k = 300 is beyond any kernel.
  assert bench_gpu.pallas_support(bench_gpu.CONFIGS["C2"], "gpu") is None
  big_k = bench_gpu.Config(n=100_000, q=1000, d=128, k=300)
  reason = bench_gpu.pallas_support(big_k, "gpu")
  assert reason is not None and "318" in reason
  methods, skipped = bench_gpu.methods_for(big_k, "gpu", [], None, 1024)
  assert set(methods) == {"xla"}
  assert {"pallas", "pallas-raw", "torch"} <= set(skipped)
  assert bench_gpu.pallas_support(bench_gpu.CONFIGS["C1"], "cpu") is None


def test_tiles_name_the_pairs_kernel():
  plain, pairs = bench_gpu.parse_tiles("32x64, 64x128P")
  assert (plain.block_q, plain.block_n, plain.chunk, plain.pairs) == (32, 64, 0, False)
  assert (pairs.block_q, pairs.block_n, pairs.chunk, pairs.pairs) == (64, 128, 16, True)
  assert [bench_gpu.tile_name(t) for t in (plain, pairs)] == ["pallas 32x64", "pallas 64x128p"]
  with pytest.raises(ValueError, match="BQxBN or BQxBNp"):
    bench_gpu.parse_tiles("64x")


def _failing_search(queries, keys, k):
  def search():
    raise RuntimeError("kernel did not lower\nlong compiler log")
  return search


def test_a_failing_method_gets_an_error_row_and_the_run_goes_on(tmp_path, monkeypatch,
                                                                 capsys):
  real = bench_gpu.methods_for

  def with_a_broken_kernel(config, *args):
    methods, skipped = real(config, *args)
    return {"pallas": _failing_search, "xla": methods["xla"]}, skipped

  monkeypatch.setattr(bench_gpu, "methods_for", with_a_broken_kernel)
  out = tmp_path / "gpu.json"
  with pytest.raises(SystemExit) as exit_info:
    bench_gpu.main(["--quick", "--configs", "C1,C3", "--repeats", "1", "--out", str(out)])
  assert exit_info.value.code == 1
  result = json.loads(out.read_text())
  assert result["complete"]
  rows = {(r["config"], r["method"]): r for r in result["rows"]}
  for config in ("C1", "C3"):
    broken = rows[(config, "pallas")]
    assert broken["error"] == "RuntimeError: kernel did not lower"
    assert broken["seconds"] is None and broken["x_xla"] is None
    assert rows[(config, "xla")]["recall_f32"] == 1.0
  captured = capsys.readouterr()
  assert "FAILED: RuntimeError: kernel did not lower" in captured.out
  assert "Traceback" in captured.err and "C1 pallas, C3 pallas" in captured.err


def test_a_run_cut_short_keeps_the_configs_it_finished(tmp_path, monkeypatch):
  real = bench_gpu.methods_for

  def stop_at_c3(config, *args):
    if config == bench_gpu.QUICK_CONFIGS["C3"]:
      raise KeyboardInterrupt  # what a time limit looks like from inside the run
    return real(config, *args)

  monkeypatch.setattr(bench_gpu, "methods_for", stop_at_c3)
  out = tmp_path / "gpu.json"
  with pytest.raises(KeyboardInterrupt):
    bench_gpu.run(["C1", "C3"], quick=True, repeats=1, tiles=[], torch_block=64,
                  out=str(out))
  result = json.loads(out.read_text())
  assert not result["complete"]
  assert {r["config"] for r in result["rows"]} == {"C1"}
  assert any(r["method"] == "xla" and r["recall_f32"] == 1.0 for r in result["rows"])

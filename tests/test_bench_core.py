"""experiments/bench_core.py: its flags and the record it writes (tiny sizes, no timing claims)."""

from __future__ import annotations

import json

import pytest

from experiments import bench_core


@pytest.mark.parametrize("flag", ["--repeats=0", "--k=0", "--n=-1", "--k=65"])
def test_bad_flags_exit_before_any_work(flag, capsys):
  with pytest.raises(SystemExit) as exc:
    bench_core.parse_args(["--n=64", flag])
  assert exc.value.code == 2
  assert flag.split("=")[0] in capsys.readouterr().err


def test_sweep_searches_at_the_k_of_knn_and_predict(tmp_path):
  """Below k = 20 the grid used to add k = 20, so the sweep searched at another k than
  the knn and predict it was compared with."""
  out = tmp_path / "core.json"
  bench_core.main(["--n=64", "--q=16", "--d=4", "--c=3", "--k=3", "--repeats=1",
                   f"--out={out}"])
  record = json.loads(out.read_text())
  assert record["grid"]["ks"] == [1, 3]
  assert record["config"]["k"] == 3 and len(record["seconds"]["sweep"]) == 1
  assert record["resmem_settings"] == 2 * 6 * 4
  assert all(t > 0 for t in record["median"].values())

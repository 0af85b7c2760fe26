"""The committed results and the README's tables say the same thing.

`results/*.json` are the outputs of the runs the README reports; its tables are typed
from them. A summary written by an older `analysis` (the size sweep's once held
population std, ddof = 0, while the README showed ddof = 1) or a table edited by hand
would go unnoticed without these checks.
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from resmem_jax import analysis

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _json(name: str) -> dict:
  return json.loads((ROOT / "results" / name).read_text())


def _readme_rows(prefix: str) -> list[list[str]]:
  lines = (ROOT / "README.md").read_text().splitlines()
  return [[cell.strip() for cell in line.strip("|").split("|")]
          for line in lines if line.startswith(prefix)]


def _pct(x: float) -> str:
  return f"{100 * x:.2f}"


def test_size_sweep_summary_is_the_analysis_of_its_rows():
  sweep = _json("mnist_sweep.json")
  want = analysis.summarize_size_sweep(sweep["rows"])
  assert [s["size"] for s in sweep["summary"]] == [s["size"] for s in want]
  for got, expected in zip(sweep["summary"], want):
    assert got.keys() == expected.keys()
    for key, value in expected.items():
      assert got[key] == (pytest.approx(value, abs=1e-12) if isinstance(value, float)
                          else value), (got["size"], key)


def test_readme_size_sweep_table_is_the_committed_summary():
  summary = {s["size"].replace(",", ", "): s for s in _json("mnist_sweep.json")["summary"]}
  rows = _readme_rows("| width=")
  assert len(rows) == len(summary) == 9
  for size, params, deepnet, resmem, gain in rows:
    s = summary[size]
    assert params == f"{s['params']:,}"
    assert deepnet == f"{_pct(s['deepnet_mean'])} ± {_pct(s['deepnet_std'])}", size
    assert resmem == f"{_pct(s['resmem_mean'])} ± {_pct(s['resmem_std'])}", size
    assert gain == f"{100 * s['gain_mean']:+.2f} ± {_pct(s['gain_std'])}", size


@pytest.mark.parametrize("config,name", [("mnist", "mnist.json"), ("digits", "digits.json")])
def test_readme_vision_rows_are_the_committed_results(config, name):
  result = _json(name)
  (row,) = _readme_rows(f"| `experiments/configs/{config}.py`")
  deepnet, resmem, knn, knn_lm = row[3:7]
  best = result["best"]
  assert deepnet == f"{_pct(result['deepnet_test_accuracy'])}%"
  assert re.fullmatch(
      rf"{re.escape(_pct(result['resmem_test_accuracy']))}% \(k={best['k']}, "
      rf"T={best['temperature']:g}\)", resmem), resmem
  assert knn == f"{_pct(result['baselines']['knn'])}%"
  assert knn_lm == f"{_pct(result['baselines']['knn_lm'])}%"
  assert f"({result['params']:,})" in row[2]
  assert row[1].endswith(f"{result['n_train']}/{result['n_val']}/{result['n_test']}")

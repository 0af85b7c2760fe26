"""The Colab notebooks: committed without outputs, and each runs top to bottom.

The execution tests run every cell in a fresh `python3` kernel (the interpreter running
pytest), from notebooks/ as a user inside a clone would, and fail on the first cell
error. They are marked slow (about half a minute each on 2 CPU cores) but run in CI.

linear_theory runs with one panel, d = 3, instead of its three (d = 2, 3, 4): a cell
after its "parameters" cell sets DIMS, as papermill injects parameters. Its time goes
mostly into compiling the search once per (d, n), and the quick run it would repeat,
all three dimensions, is computed and checked in tests/test_linear_theory.py.
"""

from __future__ import annotations

import os
import re
import time

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = ("quickstart.ipynb", "linear_theory.ipynb")
# Figures each notebook must draw: a silently empty plot cell would pass the error check.
MIN_IMAGES = {"quickstart.ipynb": 2, "linear_theory.ipynb": 1}
# Settings run after a notebook's cell tagged "parameters" (papermill's convention).
INJECTED = {"linear_theory.ipynb": "DIMS = (3,)  # injected by tests/test_notebooks.py"}
# Per cell; the budget is 5 minutes for a whole notebook on 2 CPU cores. A hung
# cell fails the test instead of stalling CI.
CELL_TIMEOUT_S = 300
COLAB_PREFIX = "https://colab.research.google.com/github/"


def _read(name: str) -> nbformat.NotebookNode:
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
  nbformat.validate(nb)
  return nb


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
  nb = _read(name)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, f"{name} has no code cells"
  for i, cell in enumerate(code):
    assert cell.outputs == [], f"{name}: code cell {i} has outputs; clear them before committing"
    assert cell.execution_count is None, (
        f"{name}: code cell {i} has execution_count={cell.execution_count}")
  assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_colab_badge_opens_this_notebook(name):
  first = _read(name).cells[0]
  assert first.cell_type == "markdown"
  assert "colab-badge.svg" in first.source
  links = re.findall(re.escape(COLAB_PREFIX) + r"[^)\s]+", first.source)
  assert links and all(link.endswith(f"/notebooks/{name}") for link in links), links


def test_readme_links_notebooks_with_colab_badges():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  for name in NOTEBOOKS:
    assert re.search(re.escape(COLAB_PREFIX) + rf"\S+/notebooks/{re.escape(name)}", readme), (
        f"README.md has no Colab link to notebooks/{name}")
  assert readme.count("colab-badge.svg") >= len(NOTEBOOKS)


def _inject_parameters(nb: nbformat.NotebookNode, source: str) -> None:
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", ())]
  assert len(tagged) == 1, f"expected one cell tagged 'parameters', got cells {tagged}"
  cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  nb.cells.insert(tagged[0] + 1, cell)


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top

  nb = _read(name)
  if name in INJECTED:
    _inject_parameters(nb, INJECTED[name])
  # The kernel inherits this: the quickstart's tempfile workdir lands under tmp_path.
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": NOTEBOOK_DIR}})
  start = time.perf_counter()
  client.execute()  # raises CellExecutionError naming the cell on any error
  elapsed = time.perf_counter() - start
  print(f"{name}: executed in {elapsed:.1f} s")

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= MIN_IMAGES[name], (
      f"{name} drew {len(images)} figures, expected at least {MIN_IMAGES[name]}")
  errors = [o for o in outputs if o.output_type == "error"]
  assert not errors, errors
  if name == "linear_theory.ipynb":  # the injected DIMS took effect: one curve, d = 3
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert re.findall(r"^d=(\d+) ", text, re.M) == ["3"], text

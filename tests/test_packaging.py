"""Packaging: the kNN kernels install as `resmem_jax.kernels`, never as a top-level
`kernels`, and CITATION.cff agrees with the package and the README."""

import configparser
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml  # flax and orbax-checkpoint depend on it

import resmem_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
  # Built from a clean copy: setuptools would reuse a stale build/ of the checkout.
  source = tmp_path_factory.mktemp("source") / "resmem_jax"
  shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
      "build", "dist", "*.egg-info", "runs", ".git", "__pycache__", ".pytest_cache",
      ".hypothesis"))
  out = tmp_path_factory.mktemp("wheel")
  subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
       "-w", str(out), str(source)],
      check=True, capture_output=True, text=True)
  (wheel,) = out.glob("resmem_jax-*.whl")
  with zipfile.ZipFile(wheel) as zf:
    return zf.namelist()


def test_wheel_maps_kernels_under_the_package(wheel_names):
  assert "resmem_jax/kernels/__init__.py" in wheel_names
  # Every kernels/*.py, and nothing that is not in the tree (no stale build output).
  modules = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
  shipped = sorted(n.split("/")[-1] for n in wheel_names
                   if n.startswith("resmem_jax/kernels/") and n.endswith(".py"))
  assert shipped == modules
  top_level = {name.split("/")[0] for name in wheel_names if ".dist-info" not in name}
  assert top_level == {"resmem_jax"}, top_level


def test_installed_package_imports_kernels_from_the_kernels_folder():
  import resmem_jax.kernels as kernels
  assert pathlib.Path(kernels.__file__).resolve().parent == ROOT / "kernels"
  assert kernels.knn is resmem_jax.knn


def test_citation_file_matches_the_package_and_the_readme():
  """CITATION.cff (GitHub's "Cite this repository") carries the package's version, and
  its reference to the paper names the authors and title of the README's BibTeX."""
  cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
  setup = configparser.ConfigParser()
  setup.read(ROOT / "setup.cfg")
  assert cff["cff-version"] == "1.2.0"
  assert cff["version"] == setup["metadata"]["version"] == resmem_jax.__version__
  assert cff["license"] == setup["metadata"]["license"]
  (paper,) = cff["references"]
  readme = (ROOT / "README.md").read_text()
  bibtex = readme[readme.index("```bibtex"):]
  title = re.search(r"title\s*=\s*\{(.+?)\},", bibtex).group(1)
  authors = re.search(r"author\s*=\s*\{(.+?)\},", bibtex, re.S).group(1)
  assert paper["title"] == title
  assert [f"{a['family-names']}, {a['given-names']}" for a in paper["authors"]] == [
      " ".join(a.split()) for a in re.split(r"\s+and\s+", authors)]
  assert paper["year"] == int(re.search(r"year\s*=\s*\{(\d+)\}", bibtex).group(1))

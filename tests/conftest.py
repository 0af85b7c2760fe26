"""Test-wide settings: rank promotion is an error, hypothesis runs a CI-sized budget,
the run's processes share a compilation cache and a temporary directory that are removed
when it ends, compiled executables are released before they exhaust the process's memory
maps, and a crashed xdist worker's fault dump is printed at the end of the run."""

import faulthandler
import gc
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import pytest
from hypothesis import HealthCheck, settings

from resmem_jax.kernels import xla

jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "ci", max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# The controller (or a run without xdist) makes one directory for the run, removed when
# it ends, and the xdist workers and every subprocess they start inherit it through the
# environment:
#
# - tmp/, their TMPDIR. TFDS leaves an empty directory in the temporary directory each
#   time it makes the builder of a dataset not yet prepared (`initialize_from_bucket`),
#   about twenty a run. pytest's basetemp (the tmp_path of the last few runs, kept for
#   debugging) stays in the system's temporary directory: see `_run_tmp` below.
# - jax-cache/, JAX's persistent compilation cache. Most of the suite's time is XLA
#   compiling (test_knn_xla.py: 242 s from scratch, 65 s with every program already
#   compiled), and many programs are compiled more than once: by the subprocesses that
#   train, resume and run notebooks, and again after `jax.clear_caches()` (below). Each
#   program is still compiled from scratch once per run, nothing carries over from an
#   earlier run, and a program read back from the cache is the executable XLA compiled
#   (same bits). A cache directory the caller set (JAX_COMPILATION_CACHE_DIR) is used as
#   it is and kept.
_run_dir = None  # set in the process that made the directory, which removes it
if "PYTEST_XDIST_WORKER" not in os.environ:
  _run_dir = tempfile.mkdtemp(prefix="pytest-run-")
  os.environ["TMPDIR"] = os.path.join(_run_dir, "tmp")
  os.mkdir(os.environ["TMPDIR"])
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    cache = os.path.join(_run_dir, "jax-cache")
    os.mkdir(cache)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    # Every program, not only those that took a second to compile (most take less).
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    # JAX read its environment when it was imported, above.
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@pytest.fixture(scope="session", autouse=True)
def _run_tmp(tmp_path_factory):
  """Temporary files made in this process go to the run's tmp/ too (the workers read it
  from TMPDIR when they start), once pytest has made its basetemp outside it."""
  tmp_path_factory.getbasetemp()
  saved, tempfile.tempdir = tempfile.tempdir, os.environ["TMPDIR"]
  yield
  tempfile.tempdir = saved


def has_accelerator() -> bool:
  return jax.default_backend() in ("gpu", "tpu")


def pytest_collection_modifyitems(config, items):
  if has_accelerator():
    return
  skip = pytest.mark.skip(reason="needs a GPU or TPU")
  for item in items:
    if "accelerator" in item.keywords:
      item.add_marker(skip)


def _map_count() -> int | None:
  try:
    with open("/proc/self/maps", "rb") as f:
      return f.read().count(b"\n")
  except OSError:  # not Linux
    return None


def _map_limit() -> int:
  try:
    with open("/proc/sys/vm/max_map_count") as f:
      return int(f.read())
  except (OSError, ValueError):
    return 65530  # Linux's default


_MAP_LIMIT = _map_limit()


def pytest_runtest_teardown(item, nextitem):
  """XLA:CPU maps each compiled kernel's code and data separately: one compiled kNN
  search holds ~140 memory maps for as long as JAX caches it. A test process compiles
  hundreds of searches, and at Linux's default vm.max_map_count (65530) the next mmap
  fails inside the compiler as a segfault. So JAX's caches are dropped (the executables'
  maps go with them) between test modules once half the limit is used, or after any
  test once three quarters are: later tests recompile what they use."""
  count = _map_count()
  if count is None:
    return
  module = getattr(item, "module", None)
  last_of_module = nextitem is None or getattr(nextitem, "module", None) is not module
  if count > _MAP_LIMIT * (2 if last_of_module else 3) // 4:
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def tiny_segments(monkeypatch):
  """The pruned XLA search's segment budget shrunk to nothing: a segment is then 4 k
  chunks (rounded up to whole key tiles), so searches over a few hundred keys already
  merge the k best of several segments."""
  monkeypatch.setattr(xla, "SEGMENT_BYTES", 1)


@pytest.fixture
def tiny_tfds(monkeypatch, tmp_path):
  """A TFDS data directory for `tiny_tfds.TINY`, which `data.load_splits` accepts as one
  more TFDS dataset: only its tables of dataset names change, `tfds.data_source` and
  everything after it run for real (the dataset is prepared on first use)."""
  from tiny_tfds import TINY  # pylint: disable=g-import-not-at-top  (registers the builder)

  from resmem_jax import data  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(data, "DATASETS", data.DATASETS + (TINY,))
  monkeypatch.setitem(data._TFDS_TEST_SPLIT, TINY, "test")  # pylint: disable=protected-access
  return str(tmp_path / "tfds")


@pytest.fixture
def run_module(tmp_path):
  """Runs `python -m module *args` on the CPU backend in tmp_path (a benchmark's CLI)."""

  def run(module, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)

  return run


# A worker killed by a fatal signal (a segfault in native code) prints Python's fault
# dump to stderr mid-run: every thread's stack, then a long list of extension modules,
# so the tail of a CI log holds neither the signal nor the crashing thread. Each worker
# writes its dump to a file instead, and the controller prints it last in the run's
# output: the signal, the crashing thread's stack, then the other threads' innermost
# frames.
_FAULT_DIR = pytest.StashKey[str]()
_fault_file = None


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):  # xdist controller, for each worker it starts
  if _FAULT_DIR not in node.config.stash:
    node.config.stash[_FAULT_DIR] = tempfile.mkdtemp(prefix="pytest-faults-")
  node.workerinput["fault_dir"] = node.config.stash[_FAULT_DIR]


@pytest.hookimpl(trylast=True)  # after pytest's faulthandler plugin has enabled it
def pytest_configure(config):
  global _fault_file
  workerinput = getattr(config, "workerinput", {})
  if "fault_dir" in workerinput:
    name = f"{workerinput['workerid']}-pid{os.getpid()}.txt"
    _fault_file = open(os.path.join(workerinput["fault_dir"], name), "w")  # pylint: disable=consider-using-with
    faulthandler.enable(file=_fault_file, all_threads=True)


def _crash_report(dump: str, frames: int = 12) -> str:
  """The dump's signal line, the crashing thread, then each other thread's innermost
  `frames` frames (Python 3.11 lists threads newest first, the crashing one anywhere)."""
  blocks = dump.split("\nExtension modules:")[0].strip().split("\n\n")
  current = [b for b in blocks[1:] if b.startswith("Current thread")]
  others = ["\n".join(b.splitlines()[:frames + 1]) for b in blocks[1:] if b not in current]
  return "\n\n".join([blocks[0], *current, *others])


def pytest_terminal_summary(terminalreporter, config):
  directory = config.stash.get(_FAULT_DIR, None)
  if directory is None:
    return
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name)) as f:
      dump = f.read()
    if dump.strip():
      terminalreporter.section(f"fault dump of crashed worker {name[:-4]}", red=True)
      terminalreporter.write_line(_crash_report(dump))


def pytest_unconfigure(config):
  directory = config.stash.get(_FAULT_DIR, None)
  if directory is not None:
    shutil.rmtree(directory, ignore_errors=True)
  if _run_dir is not None:
    shutil.rmtree(_run_dir, ignore_errors=True)

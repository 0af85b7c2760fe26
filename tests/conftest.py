"""Test-wide settings: rank promotion is an error, hypothesis runs a CI-sized budget."""

import os
import subprocess
import sys

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "ci", max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def has_accelerator() -> bool:
  return jax.default_backend() in ("gpu", "tpu")


def pytest_collection_modifyitems(config, items):
  if has_accelerator():
    return
  skip = pytest.mark.skip(reason="needs a GPU or TPU")
  for item in items:
    if "accelerator" in item.keywords:
      item.add_marker(skip)


@pytest.fixture
def run_module(tmp_path):
  """Runs `python -m module *args` on the CPU backend in tmp_path (a benchmark's CLI)."""

  def run(module, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)

  return run

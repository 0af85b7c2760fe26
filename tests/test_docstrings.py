"""The docstring examples that need no data run as doctests (the others show a workflow
on a user's memory and splits, and are exercised by the tests of their functions)."""

from __future__ import annotations

import doctest
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resmem_jax as rm

# The names the examples take as imported, as NumPy's take `np`.
GLOBS = {"rm": rm, "jax": jax, "jnp": jnp, "np": np, "math": math}

SELF_CONTAINED = [
    ("resmem_jax.data", "augment_crop_flip"),
    ("resmem_jax.memory", "residuals"),
    ("resmem_jax.predict", "neighbour_weights"),
    ("resmem_jax.models", "cifar_resnet"),
    ("resmem_jax.theory", "mean_sq_nn_distance"),
    ("resmem_jax.kernels.api", "knn"),
]


@pytest.mark.parametrize("module,name", SELF_CONTAINED)
def test_docstring_example_runs(module, name):
  fn = getattr(importlib.import_module(module), name)
  (test,) = doctest.DocTestFinder().find(fn, name, extraglobs=GLOBS)
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  report = []
  result = runner.run(test, out=report.append)
  assert result.attempted > 0 and result.failed == 0, "".join(report)

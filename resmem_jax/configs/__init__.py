"""ml_collections configs of the vision experiment, importable from the installed package.

Each module has `get_config(arg=None)`; `arg="quick"` shrinks everything for tests and
CPU smoke runs. `experiments/configs/*.py` re-export them for `--config` on the command
line; a notebook calls `resmem_jax.configs.get_config("mnist", "quick")`.
"""

from __future__ import annotations

import importlib

import ml_collections

from resmem_jax import _validation as v

NAMES = ("mnist", "digits", "mnist_sweep", "cifar10", "cifar100", "imagenet")


def get_config(name: str = "mnist", arg: str | None = None) -> ml_collections.ConfigDict:
  """The config `name` (one of `NAMES`), e.g. `get_config("cifar10", "quick")`."""
  v.check_choice("name", name, NAMES)
  return importlib.import_module(f"resmem_jax.configs.{name}").get_config(arg)

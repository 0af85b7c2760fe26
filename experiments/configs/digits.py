"""Command-line front for `resmem_jax.configs.digits` (the config lives in the package so a
notebook can load it with `resmem_jax.configs.get_config("digits")`); see its docstring for
the command and the expected result."""

from resmem_jax.configs.digits import get_config  # pylint: disable=unused-import

"""Host-side checks at the public boundary: bad input raises before anything compiles.

Value checks (finiteness, ranges) need concrete arrays; under an outer `jax.jit` the
arguments are tracers and only the static checks (shapes, dtypes) can run. A concrete
array closed over by the jitted function is still checked: its reductions are
evaluated on the spot (`jax.ensure_compile_time_eval`), not staged into the trace.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def as_array(name: str, x: Any):
  """Returns `x` as a NumPy or JAX array without copying device arrays to the host."""
  if isinstance(x, (jax.Array, np.ndarray)):
    return x
  try:
    return np.asarray(x)
  except Exception as e:  # ragged lists and the like
    raise TypeError(f"{name} must be an array, got {type(x).__name__}: {e}") from None


def check_floating(name: str, x) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must have a floating dtype, got {name}.dtype={x.dtype}")


def check_integer(name: str, x) -> None:
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must have an integer dtype, got {name}.dtype={x.dtype}")


def check_ndim(name: str, x, ndims: tuple[int, ...], meaning: str) -> None:
  if x.ndim not in ndims:
    raise ValueError(f"{name} must be {meaning}, got {name}.shape={tuple(x.shape)}")


def check_finite(name: str, x) -> None:
  """Raises ValueError naming the first entry of `x` that is not finite in the dtype JAX
  computes it in (skipped under jit): NaN, inf, or a float64 value beyond float32's
  range when 64-bit JAX is off."""
  finite_magnitude(name, x)


def check_finite32(name: str, x) -> None:
  """`check_finite`, and within float32's range also when 64-bit JAX is on: for what
  the memory and its predictions compute in float32 (residuals, distances, weights),
  where a float64 value beyond ~3.4e38 would become inf."""
  top = finite_magnitude(name, x)
  limit = float(np.finfo(np.float32).max)
  if top is not None and top > limit:
    _raise_beyond(name, x, limit, "lie within float32's range",
                  ": ResMem computes its residuals, distances and weights in float32;")


def _raise_beyond(name: str, x, limit: float, must: str, why: str) -> None:
  """ValueError naming the largest |entry| of `x`, which exceeds `limit`."""
  host = np.abs(np.asarray(x))
  bad = np.unravel_index(int(np.argmax(host)), host.shape)
  raise ValueError(f"{name} must {must} (|value| <= {limit:.4g}){why} got "
                   f"{name}[{', '.join(map(str, bad))}]={np.asarray(x)[bad]}")


_max_abs = jax.jit(lambda x: jnp.max(jnp.abs(x)))  # one compiled program per shape, not two


def finite_magnitude(name: str, x) -> float | None:
  """max |x| (0.0 if empty, None under jit), raising as `check_finite` does.

  A NaN or inf makes the maximum non-finite, so one reduction both checks and measures;
  on the host, max and -min avoid an |x| copy of the whole array.
  """
  if is_traced(x):
    return None
  if x.size == 0:
    return 0.0
  if isinstance(x, np.ndarray):
    top = max(float(x.max()), -float(x.min()))
  else:
    with jax.ensure_compile_time_eval():
      top = float(_max_abs(x))
  if not np.isfinite(top):
    bad = np.argwhere(~np.isfinite(np.asarray(x, dtype=np.float32)))[0]
    value = np.asarray(x)[tuple(bad)]
    raise ValueError(f"{name} must be finite, got {name}[{', '.join(map(str, bad))}]={value}")
  dtype = jax.dtypes.canonicalize_dtype(x.dtype)
  if jnp.issubdtype(dtype, jnp.floating) and top > float(jnp.finfo(dtype).max):
    _raise_beyond(name, x, float(jnp.finfo(dtype).max),
                  f"be finite in {dtype.name}, the dtype JAX computes it in", ",")
  return top


def check_positive(name: str, value) -> None:
  if is_traced(value):
    return
  arr = np.asarray(value)
  if not (np.all(np.isfinite(arr)) and np.all(arr > 0)):
    raise ValueError(f"{name} must be finite and > 0, got {name}={value!r}")


def check_non_negative(name: str, value) -> None:
  """A finite real number >= 0 (not a bool), else ValueError naming it."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
      or not (np.isfinite(value) and value >= 0):
    raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}")


def concrete_scalar(value):
  """A concrete 0-d NumPy or JAX array (e.g. `jnp.int32(5)`) as a Python scalar; any
  other value as it is."""
  if isinstance(value, (np.ndarray, jax.Array)) and not is_traced(value) and value.ndim == 0:
    return value.item()
  return value


def check_int(name: str, value, *, low: int, high: int | None = None) -> int:
  value = concrete_scalar(value)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {name}={value!r}")
  value = int(value)
  if value < low or (high is not None and value > high):
    bound = f"{low} <= {name}" + (f" <= {high}" if high is not None else "")
    raise ValueError(f"{name} must satisfy {bound}, got {name}={value}")
  return value


def check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {name}={value!r}")

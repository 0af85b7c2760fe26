"""The search's working memory does not grow with the keys beyond a few floats per key.

SPEC: memory stays O(block_q x block_n + Q x k). What XLA allocates besides the inputs
and outputs is its temporary buffer, which the compiled program reports
(`memory_analysis().temp_size_in_bytes`), so the bound is checked on the compiled
search at two memory sizes, without running it. A centred copy of the keys (D floats
per key) or the whole rows of chunk minima (block_q / chunk floats per key) each
failed this test before the search centred tiles in place and split long key ranges
into segments. What may grow with N: the squared norms of the keys and what the
compiler keeps beside them, a few floats per key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resmem_jax.kernels import api, xla

DIM = 64
# Both sizes are several segments long (kernels/xla.py, `segment_length`).
SMALL, LARGE = 1 << 22, 1 << 23
# Bytes of working memory per added key: four float32s (D = 64 floats make a copy).
PER_KEY = 16


def _temp_bytes(implementation: str, n: int, k: int, n_q: int = 256) -> int:
  queries = jax.ShapeDtypeStruct((n_q, DIM), jnp.float32)
  keys = jax.ShapeDtypeStruct((n, DIM), jnp.float32)
  compiled = api._knn_padded.lower(  # pylint: disable=protected-access
      queries, keys, np.float32(1.0), k=k, metric="l2", implementation=implementation,
      block_sizes=None).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    pytest.skip("this backend reports no memory analysis")
  return analysis.temp_size_in_bytes


@pytest.mark.parametrize("implementation, k", [
    ("xla", 10),    # chunk minima, exact search over the chosen chunks
    ("xla", 100),   # paired minima
    ("xla", 300),   # no pruning: the running top-k
    ("direct", 10),  # the certificate's fallback
])
def test_working_memory_grows_by_a_few_floats_per_key(implementation, k):
  small = _temp_bytes(implementation, SMALL, k)
  large = _temp_bytes(implementation, LARGE, k)
  per_key = (large - small) / (LARGE - SMALL)
  assert per_key <= PER_KEY, (
      f"{implementation} k={k}: {small / 2**20:.1f} MiB of temporaries at N={SMALL}, "
      f"{large / 2**20:.1f} MiB at N={LARGE}: {per_key:.1f} bytes per key (a copy of the "
      f"keys is {DIM * 4})")
  # What does not grow: a few segments' chunk minima and the score tiles.
  assert large - PER_KEY * LARGE <= 4 * xla.SEGMENT_BYTES, large


def test_the_bound_is_not_vacuous():
  """The measure sees a copy of the keys: the same search on a centred copy made
  beforehand (what `search_certified` did) reports it."""
  def copied(queries, keys):
    keys = keys * 2.0 - jnp.mean(keys, axis=0, keepdims=True)
    return api._knn_padded(queries, keys, np.float32(1.0), k=10, metric="l2",  # pylint: disable=protected-access
                           implementation="xla", block_sizes=None)

  def temp(n):
    args = (jax.ShapeDtypeStruct((256, DIM), jnp.float32),
            jax.ShapeDtypeStruct((n, DIM), jnp.float32))
    return jax.jit(copied).lower(*args).compile().memory_analysis().temp_size_in_bytes

  per_key = (temp(LARGE) - temp(SMALL)) / (LARGE - SMALL)
  assert per_key >= DIM * 4 / 2 > PER_KEY, per_key  # about DIM * 4 bytes: the copy

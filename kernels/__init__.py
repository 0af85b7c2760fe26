"""Exact k-nearest-neighbour search: one public op, several implementations.

Installed as `resmem_jax.kernels` (the folder is `kernels/` in the repository).
"""

from resmem_jax.kernels.api import IMPLEMENTATIONS, default_implementation, knn, query_bucket
from resmem_jax.kernels.base import BlockSizes, KnnResult
from resmem_jax.kernels.reference import knn_reference

__all__ = ["BlockSizes", "IMPLEMENTATIONS", "KnnResult", "default_implementation", "knn",
           "knn_reference", "query_bucket"]

"""resmem_jax: ResMem (Yang et al., NeurIPS 2023) in JAX.

A base network learns what it can; an exact k-nearest-neighbour regressor on its
residuals, in its embedding space, memorizes the rest.
"""

from resmem_jax.kernels import BlockSizes, KnnResult, knn, knn_reference

__version__ = "0.1.0"

__all__ = [
    "BlockSizes",
    "KnnResult",
    "knn",
    "knn_reference",
]

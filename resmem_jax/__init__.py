"""resmem_jax: ResMem (Yang et al., NeurIPS 2023) in JAX.

A base network learns what it can; an exact k-nearest-neighbour regressor on its
residuals, in its embedding space, memorizes the rest.
"""

from resmem_jax.kernels import BlockSizes, KnnResult, knn, knn_reference
from resmem_jax.memory import (Memory, MemoryMeta, base_prediction, build_memory,
                               model_fingerprint, residuals, shard_memory)
from resmem_jax.persistence import load_memory, save_memory
from resmem_jax.predict import (aggregate_residuals, drop_excluded, neighbour_weights,
                                predict)
from resmem_jax.sweep import SweepResult, sweep

__version__ = "0.1.0"

__all__ = [
    "BlockSizes",
    "KnnResult",
    "Memory",
    "MemoryMeta",
    "SweepResult",
    "aggregate_residuals",
    "base_prediction",
    "build_memory",
    "drop_excluded",
    "knn",
    "knn_reference",
    "load_memory",
    "model_fingerprint",
    "neighbour_weights",
    "predict",
    "residuals",
    "save_memory",
    "shard_memory",
    "sweep",
]

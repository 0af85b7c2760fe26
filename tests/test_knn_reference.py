"""The kNN contract for the plain-jnp reference (the whole score matrix, one top-k)."""

from knn_contract import KnnContract


class TestReference(KnnContract):
  IMPLEMENTATION = "reference"

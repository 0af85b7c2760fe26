"""The direct-difference search (the certificate's fallback) under the shared contract."""

from knn_contract import KnnContract


class TestDirect(KnnContract):
  IMPLEMENTATION = "direct"

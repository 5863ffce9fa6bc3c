"""Modules built on the lotus ops."""
from .block_sparse_linear import BlockSparseLinear
from .masked_linear import MaskedLinear

__all__ = ["MaskedLinear", "BlockSparseLinear"]

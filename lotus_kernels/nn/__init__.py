"""Modules built on the lotus ops."""
from .block_sparse_linear import BlockSparseLinear
from .masked_linear import MaskedLinear
from .semi_structured_linear import SemiStructuredFallbackWarning, SemiStructuredLinear, semi_structured_mask

__all__ = ["MaskedLinear", "BlockSparseLinear", "SemiStructuredLinear", "SemiStructuredFallbackWarning",
           "semi_structured_mask"]

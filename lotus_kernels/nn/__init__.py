"""Modules built on the lotus ops."""

from .._fx import register_timm_leaf_modules
from .block_sparse_linear import BlockSparseLinear
from .masked_linear import MaskedLinear
from .semi_structured_linear import SemiStructuredFallbackWarning, SemiStructuredLinear, semi_structured_mask

__all__ = [
    "MaskedLinear",
    "BlockSparseLinear",
    "SemiStructuredLinear",
    "SemiStructuredFallbackWarning",
    "semi_structured_mask",
]

# timm's FX feature extraction keeps each sparse layer as one node, named like the nn.Linear it replaced.
register_timm_leaf_modules(MaskedLinear, BlockSparseLinear, SemiStructuredLinear)

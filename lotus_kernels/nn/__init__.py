"""Modules built on the lotus ops."""
from .masked_linear import MaskedLinear
from .semi_structured_linear import SemiStructuredFallbackWarning, SemiStructuredLinear, semi_structured_mask

__all__ = ["MaskedLinear", "SemiStructuredLinear", "SemiStructuredFallbackWarning", "semi_structured_mask"]

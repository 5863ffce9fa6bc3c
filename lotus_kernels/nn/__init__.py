"""Modules built on the lotus ops."""
from .masked_linear import MaskedLinear

__all__ = ["MaskedLinear"]

"""lotus-kernels: kernels that make pruned / token-dropped ViT training cheaper.

Public API: ``ops`` (registered torch ops), ``nn`` (modules), ``select_keep``, ``patch_vit``,
``sparsify_`` / ``densify_``, ``backends``, ``use_backend``.
"""
from . import nn, ops
from ._backend import backend_errors, backends, use_backend
from .select import select_keep
from .sparsify import densify_, sparsify_
from .vit import patch_vit

__version__ = "0.1.0"
__all__ = ["ops", "nn", "select_keep", "patch_vit", "sparsify_", "densify_", "backends", "backend_errors",
           "use_backend", "__version__"]

"""lotus-kernels: kernels that make pruned / token-dropped ViT training cheaper.

Public API: ``ops`` (registered torch ops), ``select_keep``, ``patch_vit``, ``backends``,
``use_backend``.
"""
from . import ops
from ._backend import backend_errors, backends, use_backend
from .select import select_keep
from .vit import patch_vit

__version__ = "0.1.0"
__all__ = ["ops", "select_keep", "patch_vit", "backends", "backend_errors", "use_backend", "__version__"]

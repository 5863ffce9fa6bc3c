"""lotus-kernels: kernels that make pruned / token-dropped ViT training cheaper.

Public API: ``ops`` (registered torch ops), ``nn`` (modules), ``select_keep``, ``patch_vit``,
``sparsify_`` / ``densify_``, ``backends``, ``use_backend``, ``capabilities`` (which backend implements
what, per op), ``cpu_isa`` / ``cpu_isas`` /
``cpu_kernel_path`` (which x86 ISA the CPU kernels use).
"""

import torch as _torch

from . import _version

_why = _version.problem("torch", _torch.__version__, _version.TORCH)
if _why and not _version.allowed_anyway():
    raise ImportError(_why)

from . import nn, ops  # noqa: E402
from ._backend import backend_errors, backends, use_backend
from ._capabilities import capabilities
from .families import patch_vit
from .isa import cpu_isa, cpu_isas, cpu_kernel_path
from .select import select_keep
from .sparsify import densify_, sparsify_

__version__ = _version.__version__
__all__ = [
    "ops",
    "nn",
    "select_keep",
    "patch_vit",
    "sparsify_",
    "densify_",
    "backends",
    "backend_errors",
    "capabilities",
    "use_backend",
    "cpu_isa",
    "cpu_isas",
    "cpu_kernel_path",
    "__version__",
]

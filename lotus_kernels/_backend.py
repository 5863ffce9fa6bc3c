"""Which kernel backends are built, which one an op uses, and how outputs are allocated.

Backends:
  reference  plain PyTorch, the ground truth; runs anywhere
  cpu        C++ (OpenMP) kernels in ``lotus_kernels._C``; CPU tensors
  cuda       CUDA C++ kernels in ``lotus_kernels._cuda``; CUDA tensors
  triton     Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``

The default is the first usable backend of ``PREFERENCE`` for the tensors' device (on CUDA: triton,
then cuda, an order not yet measured on a GPU; see docs/design/ops_and_backends.md).
``LOTUS_KERNELS_BACKEND`` or the ``use_backend`` context manager force one; forcing one that is not
built, or that cannot run on the tensors' device, raises instead of silently falling back.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from collections.abc import Iterator

import torch

from . import _version
from ._capabilities import capability

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_BACKEND = "LOTUS_KERNELS_BACKEND"
# Tests set this so that an element a kernel forgets to write shows up as NaN / a huge integer.
ENV_POISON = "LOTUS_KERNELS_POISON"

_forced: str | None = None


def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except ImportError as e:  # an extension that was not built, or built against another torch
        return f"{type(e).__name__}: {e}"
    return None


def _build_mismatch() -> str | None:
    """Why the compiled extensions cannot load under this torch, before trying (an extension built
    against another torch fails with an undefined symbol, or worse); None if they may."""
    try:
        from . import _build_info
    except ImportError:
        return None  # not built: the import below says so
    built, running = _build_info.TORCH_VERSION, torch.__version__
    if built.split("+")[0] == running.split("+")[0] and _build_info.TORCH_CUDA == torch.version.cuda:
        return None
    return (
        f"the compiled extensions were built against torch {built} (CUDA {_build_info.TORCH_CUDA}), this is "
        f"torch {running} (CUDA {torch.version.cuda}): rebuild them (`pip install --no-build-isolation .`, or "
        f"`make build` in a checkout)"
    )


def _triton_problem() -> str | None:
    err = _import_error("triton")
    if err is not None:
        return err
    import triton

    why = _version.problem("triton", triton.__version__, _version.TRITON)
    if why and not _version.allowed_anyway():
        return why
    if not (torch.cuda.is_available() or triton_interpreted()):
        return "triton is installed, but there is no CUDA device and TRITON_INTERPRET is not 1"
    return None


@functools.cache
def _load_status() -> dict[str, str | None]:
    """Backend -> None if usable, else why not. Loading ``_C`` registers the C++ ops' schemas, so
    it must precede ``_cuda`` (which only adds CUDA implementations to them)."""
    status: dict[str, str | None] = {"reference": None}
    mismatch = _build_mismatch()
    if mismatch is not None:
        # Otherwise every op would quietly run the reference backend: say it once, in one line.
        warnings.warn(f"lotus_kernels: {mismatch}; using the plain PyTorch reference until then", stacklevel=2)
    status["cpu"] = mismatch or _import_error("lotus_kernels._C")
    if status["cpu"] is not None:
        status["cuda"] = mismatch or "needs the C++ extension lotus_kernels._C, which did not load"
    else:
        status["cuda"] = _import_error("lotus_kernels._cuda")
        if status["cuda"] is None and not torch.cuda.is_available():
            status["cuda"] = "built, but no CUDA device is visible"
    status["triton"] = _triton_problem()
    return status


def triton_interpreted() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``): the one place the
    package reads that variable (the Triton launchers import it from here)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backends() -> dict[str, bool]:
    """Which backends can run here, e.g. ``{'reference': True, 'cpu': True, 'cuda': False, ...}``."""
    return {name: why is None for name, why in _load_status().items()}


def backend_errors() -> dict[str, str]:
    """Why each unavailable backend is unavailable."""
    return {name: why for name, why in _load_status().items() if why is not None}


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force every op inside the block onto one backend (``None``: back to the default)."""
    global _forced
    if name is not None:
        _check_name(name, "use_backend(name)")
    prev, _forced = _forced, name
    try:
        yield
    finally:
        _forced = prev


def _check_name(name: str, where: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


# Best first, per device type. On a GPU Triton leads: its kernels are autotuned, software-pipelined
# and use the tensor cores for every float dtype, while the CUDA C++ kernels stage tiles synchronously
# (WMMA for bf16 / fp16 only). `make gpu-check` times both (benchmarks/results/gpu/): change this
# order only from such a measurement.
PREFERENCE = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}


def _default(device: torch.device, implemented) -> str:
    ok = backends()
    prefer = PREFERENCE.get(device.type, ())
    for name in prefer:
        if ok[name] and name in implemented:
            return name
    return "reference"


def select(device: torch.device, op: str) -> str:
    """The backend ``op`` (a row of ``_capabilities.CAPABILITIES``) runs with on ``device`` tensors. The
    default skips the backends the op has no kernel for; forcing one of those raises naming ``op``, and
    forcing one that cannot run here raises saying why."""
    implemented = capability(op).backends
    name = _forced or os.environ.get(ENV_BACKEND) or None
    if name is None:
        return _default(device, implemented)
    _check_name(name, f"{ENV_BACKEND}" if _forced is None else "use_backend")
    if name not in implemented:
        raise NotImplementedError(
            f"{op}: the {name!r} backend has no kernel for this op "
            f"(available: {', '.join(implemented)}; see lotus_kernels.capabilities())"
        )
    why = _load_status()[name]
    if why is not None:
        raise RuntimeError(f"lotus_kernels backend {name!r} was requested but is not available: {why}")
    if name in ("cpu", "cuda") and device.type != name:
        raise RuntimeError(f"lotus_kernels backend {name!r} runs on {name} tensors, got {device.type} tensors")
    if name == "triton" and device.type == "cpu" and not triton_interpreted():
        raise RuntimeError("lotus_kernels backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return name


def cpp_ops():
    """The C++/CUDA kernels (one schema, CPU and CUDA implementations picked by the dispatcher)."""
    return torch.ops.lotus_kernels_C


def triton_kernels(module: str):
    return importlib.import_module(f"lotus_kernels.triton.{module}")


def launch(backend: str, module: str, kernel: str, *args) -> None:
    """Run out-variant ``kernel`` (its last argument is the output it fills) on a kernel backend:
    the launcher in ``lotus_kernels/triton/<module>.py``, or ``torch.ops.lotus_kernels_C.<kernel>``
    whose CPU or CUDA implementation the dispatcher picks by device."""
    if backend == "triton":
        getattr(triton_kernels(module), kernel)(*args)
    else:
        getattr(cpp_ops(), kernel)(*args)


def new_output(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uninitialised kernel output; poisoned when ``LOTUS_KERNELS_POISON=1`` so that unwritten
    elements cannot pass a test by luck."""
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    if os.environ.get(ENV_POISON) == "1":
        out.fill_(float("nan") if out.is_floating_point() else torch.iinfo(out.dtype).max)
    return out

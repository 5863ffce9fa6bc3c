"""Which x86 instruction set the C++ CPU kernels use, and which kernel a call takes.

The CPU kernels carry one variant per ISA level (nested, each including the ones before it):

    default      plain C++ loops (any CPU; also fp64)
    avx2         AVX2 + FMA, fp32
    avx512       AVX-512 F/BW/VL/DQ, fp32
    avx512_bf16  AVX-512 + AVX512_BF16 (vdpbf16ps): bf16 operands, fp32 accumulation

A call takes the best variant the CPU supports, capped by the environment variable
``LOTUS_KERNELS_CPU_ISA`` (one of the names above; unset or empty = no cap). The variable is read
on every call, so a test can force each variant. bf16 / fp16 inputs that have no variant of their
own at the chosen level run the fp32 one on fp32 copies (reported as e.g. ``"avx2 (fp32 copies)"``).
"""

from __future__ import annotations

import torch

from . import _backend

CPU_ISAS = ("default", "avx2", "avx512", "avx512_bf16")
ENV_CPU_ISA = "LOTUS_KERNELS_CPU_ISA"


def _ops():
    why = _backend.backend_errors().get("cpu")
    if why is not None:
        raise RuntimeError(f"the C++ CPU kernels (lotus_kernels._C) are not available: {why}")
    return _backend.cpp_ops()


def cpu_isa(capped: bool = True) -> str:
    """The ISA level the CPU kernels use now (after ``LOTUS_KERNELS_CPU_ISA``); with
    ``capped=False``, the best level this CPU supports."""
    return _ops().cpu_isa(capped)


def cpu_isas() -> tuple[str, ...]:
    """Every level this CPU can run, lowest first (each is a valid ``LOTUS_KERNELS_CPU_ISA``)."""
    best = CPU_ISAS.index(cpu_isa(capped=False))
    return CPU_ISAS[: best + 1]


def cpu_kernel_path(op: str, dtype: torch.dtype = torch.float32, block_size: int = 32) -> str:
    """The kernel variant a CPU call of ``op`` with ``dtype`` inputs takes now, e.g.
    ``cpu_kernel_path("block_sparse_linear.fwd", torch.bfloat16)`` -> ``"avx512_bf16"``.
    Ops: ``block_sparse_linear.fwd`` / ``.bwd_input`` / ``.bwd_weight`` (``block_size`` matters),
    ``masked_weight_grad``, ``attention``."""
    return _ops().cpu_kernel_path(op, dtype, block_size)

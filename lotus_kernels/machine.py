"""What machine a measurement came from: CPU model and ISA flags, the kernels' paths, versions, GPU.

A time measured on one machine says nothing about another (the default ``lotus run`` took 644 s of
wall time on this project's 2-core development machine one day and 321 s on another day, on a host
with the same CPU name), so every number the benchmarks and ``lotus run`` write carries this record:
``describe()`` in full, ``summary()`` as one line.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

# The x86 features the kernels (ours, MKL's, oneDNN's) choose between.
CPU_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _field(cpuinfo: str, name: str) -> str | None:
    for line in cpuinfo.splitlines():
        if line.startswith(name) and ":" in line:
            return line.split(":", 1)[1].strip()
    return None


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's marketing name (``/proc/cpuinfo``'s model name; ``cpuinfo`` overrides the file)."""
    name = _field(_cpuinfo() if cpuinfo is None else cpuinfo, "model name")
    return name or platform.processor() or platform.machine() or "unknown"


def cpu_cache(cpuinfo: str | None = None) -> str | None:
    """The cache size /proc/cpuinfo gives (the last level's, e.g. ``491520 KB``): a virtual machine
    often hides the CPU's model behind a generic name, and this tells its hosts' generations apart."""
    return _field(_cpuinfo() if cpuinfo is None else cpuinfo, "cache size")


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """Which of ``CPU_FLAGS`` this CPU has, in that order ([] where /proc/cpuinfo is not readable)."""
    have = set((_field(_cpuinfo() if cpuinfo is None else cpuinfo, "flags") or "").split())
    return [f for f in CPU_FLAGS if f in have]


def usable_cpus() -> int:
    """CPUs this process may run on (a container's or taskset's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def blas_versions() -> dict[str, str]:
    """MKL and oneDNN versions and the BLAS as torch reports them (``torch.__config__.show()``)."""
    text = torch.__config__.show()
    out = {}
    for key, pattern in (
        ("mkl", r"Math Kernel Library Version ([\d.]+)"),
        ("onednn", r"MKL-DNN v([\d.]+)"),
        ("blas", r"BLAS_INFO=(\w+)"),
    ):
        m = re.search(pattern, text)
        if m:
            out[key] = m.group(1)
    return out


def cpu_kernel_meta() -> dict:
    """Which ISA our C++ kernels run here and which kernel each block-sparse product takes (blocks of
    32); {} without the CPU extension."""
    try:
        from . import backends, cpu_isa, cpu_kernel_path

        if not backends()["cpu"]:
            return {}
        paths = {
            f"{op}[{str(dt).replace('torch.', '')}]": cpu_kernel_path(op, dt, 32)
            for op in ("block_sparse_linear.fwd", "block_sparse_linear.bwd_input", "block_sparse_linear.bwd_weight")
            for dt in (torch.float32, torch.bfloat16)
        }
        return {
            "lotus_cpu_isa": cpu_isa(),
            "lotus_cpu_isa_supported": cpu_isa(capped=False),
            "lotus_cpu_isa_cap": os.environ.get("LOTUS_KERNELS_CPU_ISA") or None,
            "lotus_kernel_paths": paths,
        }
    except (ImportError, RuntimeError, AttributeError):
        return {}


def describe(device: torch.device | str | None = None) -> dict:
    """Everything a time depends on besides the code: versions, threads, CPU (model, usable CPUs, ISA
    flags, the ISA torch's kernels use, MKL / oneDNN), our kernels' ISA and paths, the GPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from . import __version__, backends

    info = _cpuinfo()  # read once for the three fields
    out = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_model": cpu_model(info),
        "cpu_cache": cpu_cache(info),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable_cpus(),
        "cpu_flags": cpu_flags(info),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **blas_versions(),
        "device": str(device),
        "lotus_kernels": __version__,
        "lotus_backends": backends(),
        **cpu_kernel_meta(),
    }
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def _isa_words(flags) -> str:
    words = []
    if "avx512f" in flags:
        words.append("AVX-512" + (" BF16" if "avx512_bf16" in flags else ""))
    elif "avx2" in flags:
        words.append("AVX2")
    if "amx_tile" in flags:
        words.append("AMX")
    return " + ".join(words) or "no AVX2"


def summary(desc: dict | None = None) -> str:
    """One line naming the machine, e.g. ``Intel(R) Xeon(R) Processor with 491520 KB cache, 2 of 2 CPUs
    (AVX-512 BF16 + AMX; lotus CPU kernels avx512_bf16), torch 2.14.1`` (``, GPU NVIDIA H200`` where
    one is used)."""
    d = describe() if desc is None else desc
    isa = _isa_words(d.get("cpu_flags") or [])
    if d.get("lotus_cpu_isa"):
        isa += f"; lotus CPU kernels {d['lotus_cpu_isa']}"
    cache = f" with {d['cpu_cache']} cache" if d.get("cpu_cache") else ""
    line = f"{d.get('cpu_model', 'unknown CPU')}{cache}, {d.get('cpu_usable', '?')} of {d.get('cpu_count', '?')} CPUs ({isa})"
    line += f", torch {d.get('torch', '?')}"
    if d.get("gpu"):
        line += f", GPU {d['gpu']}"
    return line

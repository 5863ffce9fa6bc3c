"""The one description of the two compiled extensions: their sources and flags. ``setup.py`` turns it
into setuptools extensions; ``tools/gpu_check.py``'s fallback builder into
``torch.utils.cpp_extension.load`` calls. Plain data, no torch import: both load this file by path.
"""

from __future__ import annotations

import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extensions(cuda: bool) -> list[dict]:
    """[{name, sources (relative to the repository root), cxx, nvcc, ldflags, cuda}], ``_C`` first:
    loading it registers the op schemas that ``_cuda`` only adds CUDA kernels to."""
    exts = [
        dict(
            name="_C",
            # The per-ISA micro-kernel files last (ATen's rule for ISA-specific objects); they set their
            # ISA per function (`target` attributes), so one flag list serves every file.
            sources=[
                "csrc/module.cpp",
                "csrc/bindings.cpp",
                *_sources("csrc/cpu/*.cpp"),
                *_sources("csrc/cpu/bsr/*.cpp"),
            ],
            cxx=["-O3", "-fopenmp"],  # torch adds -std=c++17/20 as its headers need
            nvcc=[],
            ldflags=["-fopenmp"],
            cuda=False,
        )
    ]
    if cuda:
        exts.append(
            dict(
                name="_cuda",
                sources=["csrc/module.cpp", *_sources("csrc/cuda/*.cu")],
                cxx=["-O3"],
                nvcc=["-O3"],
                ldflags=[],
                cuda=True,
            )
        )
    return exts

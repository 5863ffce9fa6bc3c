"""Builds lotus_kernels._C (C++ CPU kernels, always) and lotus_kernels._cuda (CUDA C++, when nvcc is
found or LOTUS_BUILD_CUDA=1; LOTUS_BUILD_CUDA=0 skips it; LOTUS_BUILD_EXT=0 builds none, for an editable
install over an in-place build). Build with --no-build-isolation so the
extensions link against the torch that is installed, and with ninja (MAX_JOBS caps its jobs)."""
import glob
import os
import shutil

from setuptools import setup


def _cuda_home_from_nvcc():
    # nvcc may be a wrapper script outside the toolkit (here /usr/local/bin/nvcc), from which
    # torch would guess CUDA_HOME=/usr/local and then miss lib64/libcudart.
    for root in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and _cuda_home_from_nvcc():
    os.environ["CUDA_HOME"] = _cuda_home_from_nvcc()

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda() -> bool:
    flag = os.environ.get("LOTUS_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    return CUDA_HOME is not None and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is not None


cxx_flags = ["-O3", "-fopenmp"]  # torch adds -std=c++20, which its headers need
ext_modules = [
    CppExtension(
        "lotus_kernels._C",
        # The per-ISA micro-kernel files last (ATen's rule for ISA-specific objects); they set their
        # ISA per function (`target` attributes), so one flag list serves every file.
        ["csrc/module.cpp", "csrc/bindings.cpp", *_sources("csrc/cpu/*.cpp"), *_sources("csrc/cpu/bsr/*.cpp")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
]
if _want_cuda():
    # Without a visible GPU torch cannot guess the arch: default to Ampere + Hopper (the lent H100/H200).
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext_modules.append(
        CUDAExtension(
            "lotus_kernels._cuda",
            ["csrc/module.cpp", *_sources("csrc/cuda/*.cu")],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
        )
    )

if os.environ.get("LOTUS_BUILD_EXT") == "0":
    # `make install`: the extensions are already built in place; install the package only
    ext_modules = []

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})

"""Builds lotus_kernels._C (C++ CPU kernels, always) and lotus_kernels._cuda (CUDA C++, when nvcc is
found or LOTUS_BUILD_CUDA=1; LOTUS_BUILD_CUDA=0 skips it; LOTUS_BUILD_EXT=0 builds none, for an editable
install over an in-place build; LOTUS_BUILD_ONLY=_C or _cuda builds that one, so that `make gpu-check` can
build both at once in two processes), against the torch that is installed: build with
``pip install --no-build-isolation .`` (an isolated build would compile against another torch than the
one the package then runs with). The sources and flags come from tools/extensions.py (shared with
`make gpu-check`), the supported versions from lotus_kernels/_version.py. Ninja; MAX_JOBS caps its jobs.
"""

import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load(path: str) -> dict:
    """Execute one of this tree's plain-Python files (no package import: that would need the extensions)."""
    scope: dict = {"__file__": os.path.join(ROOT, path), "__name__": os.path.splitext(os.path.basename(path))[0]}
    with open(os.path.join(ROOT, path)) as f:
        exec(compile(f.read(), path, "exec"), scope)
    return scope


VERSION = _load("lotus_kernels/_version.py")
EXTENSIONS = _load("tools/extensions.py")

try:
    import torch
except ImportError:
    sys.exit(
        "lotus-kernels builds against the torch that is installed, and none is importable here. Install "
        f"torch {VERSION['describe'](VERSION['TORCH'])} first, then `pip install --no-build-isolation .` "
        "(with build isolation pip would compile against a torch of its own choosing)"
    )
_why = VERSION["problem"]("torch", torch.__version__, VERSION["TORCH"])
if _why and not VERSION["allowed_anyway"]():
    sys.exit(_why)


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

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda() -> bool:
    flag = os.environ.get("LOTUS_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    # a CPU-only torch (e.g. 2.13.0+cpu) has no CUDA headers to compile CUDA extensions against
    return (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is not None
    )


def _write_build_info(package_dir: str, cuda: bool) -> None:
    """lotus_kernels/_build_info.py (not tracked): the torch the extensions are compiled against, so
    that importing them under another torch says so in one line instead of an undefined symbol."""
    text = (
        f"# Written by setup.py: what the compiled extensions were built against.\n"
        f"TORCH_VERSION = {torch.__version__!r}\nTORCH_CUDA = {torch.version.cuda!r}\nCUDA_BUILT = {cuda!r}\n"
        f"CUDA_ARCH_LIST = {os.environ.get('TORCH_CUDA_ARCH_LIST') if cuda else None!r}\n"
    )
    os.makedirs(package_dir, exist_ok=True)
    path = os.path.join(package_dir, "_build_info.py")
    old = open(path).read() if os.path.exists(path) else None
    if old != text:  # rewriting an unchanged file would make every editable import recompile it
        with open(path, "w") as f:
            f.write(text)


class BuildExt(BuildExtension):
    def run(self):
        # Written while compiling (not for metadata, nor for an editable install over an in-place build),
        # beside the extensions: into the tree for --inplace, into the wheel's tree otherwise.
        where = ROOT if self.inplace else self.build_lib
        _write_build_info(os.path.join(where, "lotus_kernels"), _want_cuda())
        super().run()


ext_modules = []
if os.environ.get("LOTUS_BUILD_EXT") != "0":  # `make install`: the extensions are already built in place
    cuda = _want_cuda()
    if cuda:
        # Without a visible GPU torch cannot guess the arch: default to Ampere + Hopper (the lent H200).
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    only = os.environ.get("LOTUS_BUILD_ONLY")
    for ext in EXTENSIONS["extensions"](cuda):
        if only is not None and ext["name"] != only:
            continue
        kind = CUDAExtension if ext["cuda"] else CppExtension
        flags = {"cxx": ext["cxx"], **({"nvcc": ext["nvcc"]} if ext["cuda"] else {})}
        ext_modules.append(
            kind(
                f"lotus_kernels.{ext['name']}", ext["sources"], extra_compile_args=flags, extra_link_args=ext["ldflags"]
            )
        )


setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)})

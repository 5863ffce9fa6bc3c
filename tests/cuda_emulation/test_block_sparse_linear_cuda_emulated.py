"""The CUDA kernels of csrc/cuda/block_sparse_linear.cu, which cannot run here (no GPU), executed on CPU
threads by bsr_harness.cpp (one thread per CUDA thread, __syncthreads as a barrier, __shared__ as
statics; one CTA at a time): checks their indexing, tiling, bounds and synchronisation against the
densify+matmul reference. Not a check of the host code (which is mirrored in the harness) nor of
anything the GPU compiler or memory model could do differently."""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ..triton.test_block_sparse_linear_kernels import block_mask, bsr_format, densify

ROOT = Path(__file__).resolve().parents[2]
CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = [
    pytest.mark.skipif(CXX is None, reason="no C++ compiler to build the emulation harness"),
    pytest.mark.slow,
]  # ~20 s: builds the harness, one OS thread per emulated CUDA thread
# harness dtype codes: 16-bit "wmma" is what sm80+ runs (tensor cores), "fma" the plain kernels (16-bit
# types below sm80); "wmma-unaligned" is the element-wise tile staging the host picks when a base
# pointer is not 16-byte aligned
DTYPE_CODE = {
    "fp32": 0,
    "fp64": 1,
    "bf16-wmma": 2,
    "bf16-wmma-unaligned": 2,
    "bf16-fma": 3,
    "fp16-wmma": 4,
    "fp16-fma": 5,
}
DTYPES = {
    "fp32": torch.float32,
    "fp64": torch.float64,
    "bf16-wmma": torch.bfloat16,
    "bf16-wmma-unaligned": torch.bfloat16,
    "bf16-fma": torch.bfloat16,
    "fp16-wmma": torch.float16,
    "fp16-fma": torch.float16,
}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("bsr_emu") / "libbsr_emu.so"
    src = ROOT / "csrc" / "cuda" / "block_sparse_linear.cu"
    cmd = [
        CXX,
        "-std=c++20",
        "-O1",
        "-shared",
        "-fPIC",
        "-pthread",
        "-w",
        f"-I{Path(__file__).parent / 'include'}",  # stand-ins for <mma.h> and <cuda_bf16.h>
        f"-I{Path(torch.__file__).parent / 'include'}",
        f'-DKERNEL_SOURCE="{src}"',
        str(Path(__file__).parent / "bsr_harness.cpp"),
        "-o",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"building the emulation harness failed:\n{done.stderr[-4000:]}"
    return ctypes.CDLL(str(out))


def ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None and t.numel() else ctypes.c_void_p(0)


def run(lib, M, out_f, in_f, bs, variant, kind, with_bias=True, splits=1):
    dtype = DTYPES[variant]
    gen = torch.Generator().manual_seed(M * 7 + out_f + in_f + bs)
    mask = block_mask(out_f // bs, in_f // bs, kind, gen)
    weight = torch.randn(out_f, in_f, generator=gen).to(dtype)
    values, crow, col, ccol, row, perm = bsr_format(weight, mask, bs)
    x = torch.randn(M, in_f, generator=gen).to(dtype)
    dy = torch.randn(M, out_f, generator=gen).to(dtype)
    bias = torch.randn(out_f, generator=gen).to(dtype) if with_bias else None
    nan = lambda *s: torch.full(s, float("nan"), dtype=dtype)  # noqa: E731
    out, dx, dv = nan(M, out_f), nan(M, in_f), nan(*values.shape)
    code, i64 = DTYPE_CODE[variant], ctypes.c_int64
    lib.emu_set_vec(0 if variant.endswith("unaligned") else 1)
    lib.emu_fwd(code, bs, ptr(x), ptr(values), ptr(crow), ptr(col), ptr(bias), ptr(out), i64(M), i64(in_f), i64(out_f))
    lib.emu_bwd_input(
        code, bs, ptr(dy), ptr(values), ptr(ccol), ptr(row), ptr(perm), ptr(dx), i64(M), i64(in_f), i64(out_f)
    )
    lib.emu_bwd_weight(
        code,
        bs,
        ptr(dy),
        ptr(x),
        ptr(crow),
        ptr(col),
        ptr(dv),
        i64(M),
        i64(in_f),
        i64(out_f),
        i64(values.shape[0]),
        i64(splits),
    )
    w = densify(values.double(), mask, bs)
    want_out = x.double() @ w.t() + (bias.double() if with_bias else 0)
    want_dx = dy.double() @ w
    want_dv = bsr_format(dy.double().t() @ x.double(), mask, bs)[0]
    tol = {torch.bfloat16: dict(rtol=1e-2, atol=1e-2), torch.float16: dict(rtol=2e-3, atol=2e-3 * M**0.5 + 1e-3)}.get(
        dtype, dict(rtol=1e-5, atol=1e-4)
    )
    torch.testing.assert_close(out.double(), want_out, **tol, msg=lambda m: f"out: {m}")
    torch.testing.assert_close(dx.double(), want_dx, **tol, msg=lambda m: f"dx: {m}")
    torch.testing.assert_close(dv.double(), want_dv, **tol, msg=lambda m: f"dvalues: {m}")


# M around the row tiles (TM = 128 / 64 / 32 rows for bs 16 / 32 / 64 in fp32, half that in fp64) and the
# 32-row M chunks of the weight gradient; empty block rows / columns; nnzb = 0; density 1.
SHAPES = [(1, 32, 64, 16), (129, 96, 48, 16), (65, 64, 96, 32), (33, 128, 64, 64), (0, 32, 32, 16)]


# Empty / full patterns only on fp32 and bf16-wmma: the other variants share their indexing.
CASES = [
    pytest.param(shape, kind, variant, id=f"{variant}-{kind}-{'x'.join(map(str, shape))}")
    for variant in DTYPE_CODE
    for kind in ("random", "empty", "full")
    for shape in SHAPES
    if kind == "random" or variant in ("fp32", "bf16-wmma")
]


@pytest.mark.parametrize("shape,kind,variant", CASES)
def test_emulated_cuda_kernels_match_dense_reference(lib, shape, kind, variant):
    run(lib, *shape, variant, kind)


def test_emulated_forward_without_bias(lib):
    run(lib, 7, 64, 32, 16, "fp32", "random", with_bias=False)
    run(lib, 7, 64, 32, 16, "bf16-wmma", "random", with_bias=False)


# bwd_weight split over M (grid (nnzb, S) writing partial blocks, then the ordered sum): M not a multiple
# of the 64-row ranges, the FMA and WMMA kernels, every 16-bit type.
@pytest.mark.parametrize("variant", ["fp32", "fp64", "bf16-wmma", "bf16-fma", "fp16-wmma", "fp16-fma"])
def test_emulated_weight_gradient_split_over_m(lib, variant):
    run(lib, 197, 64, 32, 16, variant, "random", splits=3)
    run(lib, 129, 64, 64, 32, variant, "random", splits=2)

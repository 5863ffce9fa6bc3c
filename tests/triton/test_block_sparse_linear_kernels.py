"""The Triton block-sparse linear launchers (lotus_kernels/triton/block_sparse_linear.py) called directly,
against a densify-then-matmul reference written here (independent of the op layer). Outputs arrive
NaN-filled, so an element a kernel forgets to write fails the comparison."""

import importlib
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import lotus_kernels

pytestmark = pytest.mark.skipif(
    not lotus_kernels.backends()["triton"],
    reason=f"triton cannot run here: {lotus_kernels.backend_errors().get('triton')}",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = ("bsr_linear_fwd", "bsr_linear_bwd_input", "bsr_linear_bwd_weight")


def kernels():
    return importlib.import_module("lotus_kernels.triton.block_sparse_linear")


def block_mask(R, Cb, kind, gen):
    """Random block mask with, where the grid allows, an all-zero block row and block column."""
    if kind == "empty":
        return torch.zeros(R, Cb, dtype=torch.bool)
    if kind == "full":
        return torch.ones(R, Cb, dtype=torch.bool)
    mask = torch.rand(R, Cb, generator=gen) < 0.6
    if R > 1:
        mask[R // 2] = False
    if Cb > 1:
        mask[:, 0] = False
    mask[-1, -1] = True  # at least one stored block
    return mask


def bsr_format(weight, mask, bs):
    """(values, crow, col, ccol, row, perm) of ``weight`` restricted to the blocks of ``mask``."""
    R, Cb = mask.shape
    r, c = mask.nonzero(as_tuple=True)  # row-major: sorted by (row, col)
    blocks = weight.reshape(R, bs, Cb, bs).permute(0, 2, 1, 3)
    values = blocks[r, c].contiguous()
    crow = torch.zeros(R + 1, dtype=torch.int64)
    crow[1:] = mask.sum(1).cumsum(0)
    ccol = torch.zeros(Cb + 1, dtype=torch.int64)
    ccol[1:] = mask.sum(0).cumsum(0)
    perm = torch.argsort(c * R + r)  # column-major order of the stored blocks
    dev = weight.device
    return (
        values,
        crow.to(dev),
        c.contiguous().to(dev),
        ccol.to(dev),
        r[perm].contiguous().to(dev),
        perm.contiguous().to(dev),
    )


def densify(values, mask, bs):
    R, Cb = mask.shape
    blocks = values.new_zeros(R, Cb, bs, bs)
    blocks[mask] = values
    return blocks.permute(0, 2, 1, 3).reshape(R * bs, Cb * bs)


def poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def tol(dtype, length):
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12 * length**0.5)
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=2e-6 * length**0.5)
    if dtype == torch.float16:
        return dict(rtol=2e-3, atol=2e-3 * length**0.5)  # one fp16 rounding of an fp32 accumulation
    return dict(rtol=1e-2, atol=1e-2)  # bf16: one rounding of an fp32 accumulation


def run_all(M, out_f, in_f, bs, dtype, kind, with_bias=True, splits=None, config=None, wgrad_config=None):
    gen = torch.Generator().manual_seed(M * 1000 + out_f + in_f + bs)
    mask = block_mask(out_f // bs, in_f // bs, kind, gen)
    weight = torch.randn(out_f, in_f, generator=gen).to(DEVICE, dtype)
    values, crow, col, ccol, row, perm = bsr_format(weight, mask.to(DEVICE), bs)
    x = torch.randn(M, in_f, generator=gen).to(DEVICE, dtype)
    dy = torch.randn(M, out_f, generator=gen).to(DEVICE, dtype)
    bias = torch.randn(out_f, generator=gen).to(DEVICE, dtype) if with_bias else None
    k = kernels()
    out = poisoned(M, out_f, dtype=dtype)
    k.bsr_linear_fwd(x, values, crow, col, bias, out, config=config)
    dx = poisoned(M, in_f, dtype=dtype)
    k.bsr_linear_bwd_input(dy, values, ccol, row, perm, dx, config=config)
    dvalues = poisoned(*values.shape, dtype=dtype)
    k.bsr_linear_bwd_weight(dy, x, crow, col, dvalues, splits=splits, config=wgrad_config)

    # reference: densify, then dense products in float64
    w = densify(values.double(), mask.to(DEVICE), bs)
    xd, dyd = x.double(), dy.double()
    want_out = F.linear(xd, w, None if bias is None else bias.double())
    want_dx = dyd @ w
    want_dvalues = bsr_format(dyd.t() @ xd, mask.to(DEVICE), bs)[0]
    torch.testing.assert_close(out.double(), want_out, **tol(dtype, in_f), msg=lambda m: f"out: {m}")
    torch.testing.assert_close(dx.double(), want_dx, **tol(dtype, out_f), msg=lambda m: f"dx: {m}")
    torch.testing.assert_close(dvalues.double(), want_dvalues, **tol(dtype, M), msg=lambda m: f"dvalues: {m}")
    return out, dx, dvalues


# (M, out_features, in_features, block size): odd M (1, 7, 197), square and rectangular weights,
# block sizes 16 and 32, and 64 on one small case.
SHAPES = [(1, 32, 64, 16), (7, 96, 48, 16), (197, 96, 48, 16), (7, 64, 96, 32), (197, 32, 64, 32), (3, 64, 128, 64)]


# At M = 197 the empty / full patterns run in fp32 only, to keep the interpreter run short.
CASES = [
    pytest.param(shape, kind, dtype, id=f"{'x'.join(map(str, shape))}-{kind}-{str(dtype)[6:]}")
    for shape in SHAPES
    for kind in ("random", "empty", "full")
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    if dtype == torch.float32 or shape[0] != 197 or kind == "random"
]


@pytest.mark.parametrize("shape,kind,dtype", CASES)
def test_kernels_match_dense_reference(shape, kind, dtype):
    run_all(*shape, dtype, kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_without_bias(dtype):
    run_all(7, 96, 48, 16, dtype, "random", with_bias=False)


# The weight gradient split over M (two passes: fp32 partial blocks, then an ordered sum): ranges that
# end inside a BLOCK_M tile, more splits than 16-row ranges allow, every dtype.
@pytest.mark.parametrize("splits", [2, 3, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_weight_gradient_split_over_m(splits, dtype):
    run_all(197, 96, 48, 16, dtype, "random", splits=splits)


# Several stored blocks per tl.dot (KB = 2, 4): slots whose block count is not a multiple of KB (the
# masked tail), empty slots, a full pattern, 16-bit dtypes.
@pytest.mark.parametrize("kb", [2, 4])
@pytest.mark.parametrize(
    "shape,kind,dtype",
    [
        ((7, 96, 48, 16), "random", torch.float32),
        ((7, 64, 96, 32), "random", torch.bfloat16),
        ((7, 64, 96, 32), "full", torch.float16),
        ((3, 64, 128, 64), "random", torch.float32),
        ((5, 32, 64, 16), "empty", torch.float32),
    ],
)
def test_several_blocks_per_dot(kb, shape, kind, dtype):
    run_all(*shape, dtype, kind, config=dict(KB=kb))


# The GPU's launch geometry, interpreted: the swizzled order (GROUP_M > 1, with a last group of fewer M
# tiles: 197 rows = 13 tiles of 16, groups of 4), several blocks per dot, and a bwd_weight tile of several
# blocks of one block row (ROWS = 4 * bs: rows whose stored blocks are not a multiple of 4, an empty row)
# with a short step over M, split in two.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_launch_geometry_interpreted(dtype):
    run_all(
        197,
        96,
        64,
        16,
        dtype,
        "random",
        config=dict(BLOCK_M=16, GROUP_M=4, KB=2),
        wgrad_config=dict(ROWS=64, BLOCK_M=32),
        splits=2,
    )


# bwd_weight with one block per program (ROWS = bs) and with more blocks per program than a row has.
@pytest.mark.parametrize("rows", [32, 256])
def test_weight_gradient_blocks_per_program(rows):
    run_all(7, 64, 96, 32, torch.float32, "random", wgrad_config=dict(ROWS=rows))


def test_split_weight_gradient_is_deterministic_and_close_to_unsplit():
    one = run_all(197, 64, 96, 32, torch.float32, "random", splits=1)[2]
    three = run_all(197, 64, 96, 32, torch.float32, "random", splits=3)[2]
    assert torch.equal(three, run_all(197, 64, 96, 32, torch.float32, "random", splits=3)[2])
    torch.testing.assert_close(three, one, rtol=1e-5, atol=1e-5)


def test_empty_batch_writes_zero_weight_grad_and_nothing_else():
    # M = 0: out and dx are empty; dvalues = a sum over no rows = 0, and must still be written.
    run_all(0, 64, 32, 16, torch.float32, "random")


def test_results_are_deterministic():
    first = run_all(197, 96, 48, 16, torch.float32, "random")
    second = run_all(197, 96, 48, 16, torch.float32, "random")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_bf16_rounds_to_nearest_like_a_gpu():
    # One stored block: the bf16 store must round to nearest even like torch's cast (the interpreter's
    # own cast truncates, which would disagree on about half the elements).
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 16, generator=gen).to(DEVICE, torch.bfloat16)
    w = torch.randn(16, 16, generator=gen).to(DEVICE, torch.bfloat16)
    values, crow, col = w[None].contiguous(), torch.tensor([0, 1], device=DEVICE), torch.tensor([0], device=DEVICE)
    out = poisoned(16, 16, dtype=torch.bfloat16)
    kernels().bsr_linear_fwd(x, values, crow, col, None, out)
    want = (x.float() @ w.float().t()).to(torch.bfloat16)  # fp32 accumulation, one RNE rounding
    assert (out.float() - want.float()).abs().max() <= (want.float().abs().max() * 2**-7)
    assert (out == want).float().mean() > 0.95  # not a systematic truncation


@pytest.mark.skipif(
    shutil.which("nvcc") is None or os.environ.get("LOTUS_BUILD_CUDA") == "0",
    reason="no nvcc: the CUDA extension is not built",
)
@pytest.mark.parametrize("kernel", KERNELS)
def test_cuda_extension_registers_block_sparse_kernels(kernel):
    importlib.import_module("lotus_kernels._cuda")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lotus_kernels_C::{kernel}", "CUDA")

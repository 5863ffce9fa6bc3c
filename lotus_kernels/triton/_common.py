"""Helpers shared by the Triton launchers of this package (no kernels here).

Block sizes: the interpreter's cost is per program and per op, so under it the launchers use few,
large programs; on a GPU they use the tile sizes tuned for it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted as _interpreted  # noqa: F401  (the package's one TRITON_INTERPRET check)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def tf32_allowed() -> bool:
    """Whether the user lets fp32 matmuls run on TF32 tensor cores, as torch's own CUDA matmuls read it:
    ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" / "ieee"; set directly or inherited from
    ``torch.backends.fp32_precision``), else the legacy ``allow_tf32`` /
    ``torch.set_float32_matmul_precision("high")``. Default: no. (Reading the legacy getter after the
    new API was used raises in torch >= 2.9, so the new one is read first.)"""
    matmul = torch.backends.cuda.matmul
    new = getattr(matmul, "fp32_precision", None)
    if new in ("tf32", "ieee"):
        return new == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands: full precision unless the user allows TF32 (``tf32_allowed``); other dtypes: the
    argument is ignored by tl.dot."""
    if dtype == torch.float32 and not _interpreted() and tf32_allowed():
        return "tf32"
    return "ieee"


def _dot_in_acc_dtype(dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot multiplies bf16 operands' raw bits: kernels upcast them to fp32 there
    (exact: a product of two bf16 values fits in fp32)."""
    return _interpreted() and dtype == torch.bfloat16


def _bf16_by_hand(dtype: torch.dtype) -> bool:
    """The interpreter rounds fp32 -> bf16 toward zero; a GPU rounds to nearest even. Kernels with
    BF16_BY_HAND store through ``_store_bf16_rne`` instead (called only on that branch: under the
    interpreter a call to a @triton.jit helper costs milliseconds)."""
    return _interpreted() and dtype == torch.bfloat16


def _gather_blocks(rows: int, cols: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) for a row-copy kernel over a [rows, cols] output."""
    if _interpreted():
        block_c = _pow2(cols, 16, 1024)
        return _pow2(rows, 1, max(1, 16384 // block_c)), block_c
    block_c = _pow2(cols, 16, 256)
    return max(1, 2048 // block_c), block_c


def _scatter_blocks(B: int, N: int, K: int, C: int) -> tuple[int, int, int, int]:
    """(G, BLOCK_R, BLOCK_K, BLOCK_C) for a deterministic scatter of [B, K, C] rows into B slabs of N
    rows: G images per program (as many as fit under the interpreter, 1 on a GPU)."""
    if _interpreted():
        G = max(1, min(B, 4096 // max(N, K, 1)))
        block_c = _pow2(C, 16, 1024)
        return G, _pow2(G * N, 1, max(1, 16384 // block_c)), _pow2(G * K, 16, 128), block_c
    block_c = _pow2(C, 32, 128)
    return 1, max(1, 2048 // block_c), 32, block_c


@triton.jit
def _store_bf16_rne(ptrs, acc, mask):
    """Store fp32 ``acc`` as bf16 rounded to nearest even, like a GPU: fp32 bits + 0x7FFF + (bit 16),
    keep the top half (NaNs are truncated, which keeps them NaN)."""
    bits = acc.to(tl.uint32, bitcast=True)
    bits = tl.where(acc == acc, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16, bits >> 16)
    tl.store(ptrs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)


@triton.jit
def _add_distinct_rows(
    col_ptrs, row_off, ROW_STRIDE, dst, v, js, kmask, cmask, ACC_DTYPE: tl.constexpr, BF16_BY_HAND: tl.constexpr
):
    """One chunk of a deterministic scatter: chunk row j goes to destination ``dst[j]`` (-1 where
    masked off), whose elements sit at ``col_ptrs + row_off[j] * ROW_STRIDE``. The rows that share a
    destination are summed (0/1 equality matrix @ v, exact weights, ACC_DTYPE accumulation), then
    only the first of them read-modify-writes it: distinct destinations, so no writes collide.
    A call, not written out in each kernel: it runs once per chunk of up to 128 rows, and its
    interpreter cost (under 1 ms) measured within noise of a scatter launch (~10-15 ms)."""
    same = dst[:, None] == dst[None, :]
    sums = tl.dot(same.to(ACC_DTYPE), v, input_precision="ieee", out_dtype=ACC_DTYPE)
    earlier = tl.sum((same & (js[None, :] < js[:, None])).to(tl.int32), axis=1)
    write = kmask & (earlier == 0)
    ptrs = col_ptrs[None, :] + tl.where(write, row_off, 0)[:, None] * ROW_STRIDE
    wmask = write[:, None] & cmask[None, :]
    acc = tl.load(ptrs, mask=wmask, other=0, cache_modifier=".cg").to(ACC_DTYPE)
    acc += sums
    if BF16_BY_HAND:  # round to nearest even like a GPU; the interpreter's cast truncates
        _store_bf16_rne(ptrs, acc, wmask)
    else:
        tl.store(ptrs, acc.to(col_ptrs.dtype.element_ty), mask=wmask)

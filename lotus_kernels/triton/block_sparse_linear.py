"""Triton kernels for the block-sparse linear products (format and contract: the BSR description in
``lotus_kernels.ops.block_sparse_linear``; W [out, in] stored as ``values`` [nnzb, bs, bs] with BSR
pointers ``crow``/``col`` and their transpose ``ccol``/``row``/``perm``).

    bsr_linear_fwd        out = x @ W^T + bias      program (M tile, block row r): r's stored blocks
    bsr_linear_bwd_input  dx  = dy @ W              program (M tile, block column c): c's stored blocks
    bsr_linear_bwd_weight dvalues[k] = dy[:, r_k]^T @ x[:, c_k]   program k: reduce over M (SDD)

Every program owns a disjoint tile of its output and writes it once, so no atomics, results are
deterministic, and outputs that arrive NaN-poisoned are fully overwritten (an empty block row /
column writes bias / zeros; an empty M writes zero dvalues). Accumulation is fp32 (fp64 for fp64).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _acc_dtype, _bf16_by_hand, _dot_in_acc_dtype, _dot_precision, _interpreted, _pow2, _store_bf16_rne


def _tiles(M: int, reduce_over_m: bool) -> tuple[int, int, int]:
    """(BLOCK_M, num_warps, num_stages). Under the interpreter whole (or large) M in one program: its
    cost is per program and per op. On a GPU an M tile of 64 rows keeps one bs x bs accumulator per
    program small enough for many programs per SM (R * M/64 of them: 1536 for ViT-B fc1 at bs=32)."""
    if _interpreted():
        return _pow2(M, 16, 512 if reduce_over_m else 256), 4, 1
    return 64, 4, 3


# ---------------------------------------------------------------- forward
@triton.jit
def _bsr_fwd_kernel(x_ptr, v_ptr, crow_ptr, col_ptr, bias_ptr, out_ptr, M, IN, OUT,
                    BS: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, DOT_IN_ACC_DTYPE: tl.constexpr,
                    BF16_BY_HAND: tl.constexpr, BLOCK_M: tl.constexpr):
    r = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    ii = tl.arange(0, BS)  # output feature within the block row
    jj = tl.arange(0, BS)  # input feature within a block column
    start = tl.load(crow_ptr + r)
    end = tl.load(crow_ptr + r + 1)
    acc = tl.zeros([BLOCK_M, BS], dtype=ACC_DTYPE)
    for k in range(start, end):
        c = tl.load(col_ptr + k)
        a = tl.load(x_ptr + rows[:, None] * IN + (c * BS + jj)[None, :], mask=rmask[:, None], other=0)
        # W block transposed: wt[j, i] = values[k, i, j]
        wt = tl.load(v_ptr + k * (BS * BS) + ii[None, :] * BS + jj[:, None])
        if DOT_IN_ACC_DTYPE:
            a = a.to(ACC_DTYPE)
            wt = wt.to(ACC_DTYPE)
        acc = tl.dot(a, wt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    ns = r * BS + ii
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ns).to(ACC_DTYPE)[None, :]
    out_ptrs = out_ptr + rows[:, None] * OUT + ns[None, :]
    mask = rmask[:, None]
    if BF16_BY_HAND:  # round to nearest even like a GPU; the interpreter's cast truncates
        _store_bf16_rne(out_ptrs, acc, mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def bsr_linear_fwd(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                   bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out [M, out] = x [M, in] @ W^T + bias, W given by (values, crow, col)."""
    M, IN = x.shape
    bs = values.shape[1]
    R = crow.shape[0] - 1
    OUT = out.shape[1]
    assert x.is_contiguous() and values.is_contiguous() and crow.is_contiguous() and col.is_contiguous()
    assert out.is_contiguous() and out.shape[0] == M and OUT == R * bs and IN % bs == 0
    assert values.dtype == x.dtype == out.dtype and crow.dtype == col.dtype == torch.int64
    if bias is not None:
        assert bias.is_contiguous() and bias.shape == (OUT,) and bias.dtype == x.dtype
    if out.numel() == 0:
        return
    BLOCK_M, num_warps, num_stages = _tiles(M, False)
    grid = (triton.cdiv(M, BLOCK_M), R)
    _bsr_fwd_kernel[grid](x, values, crow, col, bias if bias is not None else out, out, M, IN, OUT,
                          BS=bs, HAS_BIAS=bias is not None, ACC_DTYPE=_acc_dtype(x.dtype),
                          INPUT_PRECISION=_dot_precision(x.dtype), DOT_IN_ACC_DTYPE=_dot_in_acc_dtype(x.dtype),
                          BF16_BY_HAND=_bf16_by_hand(x.dtype), BLOCK_M=BLOCK_M,
                          num_warps=num_warps, num_stages=num_stages)


# ---------------------------------------------------------------- input gradient
@triton.jit
def _bsr_bwd_input_kernel(dy_ptr, v_ptr, ccol_ptr, row_ptr, perm_ptr, dx_ptr, M, IN, OUT,
                          BS: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                          DOT_IN_ACC_DTYPE: tl.constexpr, BF16_BY_HAND: tl.constexpr, BLOCK_M: tl.constexpr):
    c = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    ii = tl.arange(0, BS)
    jj = tl.arange(0, BS)
    start = tl.load(ccol_ptr + c)
    end = tl.load(ccol_ptr + c + 1)
    acc = tl.zeros([BLOCK_M, BS], dtype=ACC_DTYPE)
    for t in range(start, end):
        r = tl.load(row_ptr + t)
        k = tl.load(perm_ptr + t)
        a = tl.load(dy_ptr + rows[:, None] * OUT + (r * BS + ii)[None, :], mask=rmask[:, None], other=0)
        w = tl.load(v_ptr + k * (BS * BS) + ii[:, None] * BS + jj[None, :])
        if DOT_IN_ACC_DTYPE:
            a = a.to(ACC_DTYPE)
            w = w.to(ACC_DTYPE)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    dx_ptrs = dx_ptr + rows[:, None] * IN + (c * BS + jj)[None, :]
    mask = rmask[:, None]
    if BF16_BY_HAND:
        _store_bf16_rne(dx_ptrs, acc, mask)
    else:
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


def bsr_linear_bwd_input(dy: torch.Tensor, values: torch.Tensor, ccol: torch.Tensor, row: torch.Tensor,
                         perm: torch.Tensor, dx: torch.Tensor) -> None:
    """dx [M, in] = dy [M, out] @ W, walking W's block columns through (ccol, row, perm)."""
    M, OUT = dy.shape
    IN = dx.shape[1]
    bs = values.shape[1]
    Cb = ccol.shape[0] - 1
    assert dy.is_contiguous() and values.is_contiguous() and dx.is_contiguous()
    assert ccol.is_contiguous() and row.is_contiguous() and perm.is_contiguous()
    assert dx.shape[0] == M and IN == Cb * bs and OUT % bs == 0
    assert values.dtype == dy.dtype == dx.dtype and ccol.dtype == row.dtype == perm.dtype == torch.int64
    if dx.numel() == 0:
        return
    BLOCK_M, num_warps, num_stages = _tiles(M, False)
    grid = (triton.cdiv(M, BLOCK_M), Cb)
    _bsr_bwd_input_kernel[grid](dy, values, ccol, row, perm, dx, M, IN, OUT,
                                BS=bs, ACC_DTYPE=_acc_dtype(dy.dtype), INPUT_PRECISION=_dot_precision(dy.dtype),
                                DOT_IN_ACC_DTYPE=_dot_in_acc_dtype(dy.dtype), BF16_BY_HAND=_bf16_by_hand(dy.dtype),
                                BLOCK_M=BLOCK_M, num_warps=num_warps, num_stages=num_stages)


# ---------------------------------------------------------------- weight gradient (SDD)
@triton.jit
def _bsr_bwd_weight_kernel(dy_ptr, x_ptr, crow_ptr, col_ptr, dv_ptr, M, IN, OUT, R,
                           BS: tl.constexpr, SEARCH_STEPS: tl.constexpr, ACC_DTYPE: tl.constexpr,
                           INPUT_PRECISION: tl.constexpr, DOT_IN_ACC_DTYPE: tl.constexpr,
                           BF16_BY_HAND: tl.constexpr, BLOCK_M: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    # Block row of stored block k: the last r in [0, R) with crow[r] <= k (binary search; empty rows
    # share their crow value with the next row, so the last such r is the non-empty one).
    lo = k * 0
    hi = lo + R - 1
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        go_up = tl.load(crow_ptr + mid) <= k
        lo = tl.where(go_up, mid, lo)
        hi = tl.where(go_up, hi, mid - 1)
    r = lo
    c = tl.load(col_ptr + k)
    ii = tl.arange(0, BS)
    jj = tl.arange(0, BS)
    ms = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BS, BS], dtype=ACC_DTYPE)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + ms.to(tl.int64)
        rmask = rows < M
        # dy tile loaded transposed: [BS (i), BLOCK_M]
        gt = tl.load(dy_ptr + rows[None, :] * OUT + (r * BS + ii)[:, None], mask=rmask[None, :], other=0)
        a = tl.load(x_ptr + rows[:, None] * IN + (c * BS + jj)[None, :], mask=rmask[:, None], other=0)
        if DOT_IN_ACC_DTYPE:
            gt = gt.to(ACC_DTYPE)
            a = a.to(ACC_DTYPE)
        acc = tl.dot(gt, a, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    dv_ptrs = dv_ptr + k * (BS * BS) + ii[:, None] * BS + jj[None, :]
    if BF16_BY_HAND:
        _store_bf16_rne(dv_ptrs, acc, None)
    else:
        tl.store(dv_ptrs, acc.to(dv_ptr.dtype.element_ty))


def bsr_linear_bwd_weight(dy: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                          dvalues: torch.Tensor) -> None:
    """dvalues[k] = dy[:, block row of k]^T @ x[:, block column of k], for the stored blocks only."""
    M, OUT = dy.shape
    IN = x.shape[1]
    nnzb, bs, _ = dvalues.shape
    R = crow.shape[0] - 1
    assert dy.is_contiguous() and x.is_contiguous() and dvalues.is_contiguous()
    assert crow.is_contiguous() and col.is_contiguous() and col.shape == (nnzb,)
    assert x.shape[0] == M and OUT == R * bs and IN % bs == 0
    assert dy.dtype == x.dtype == dvalues.dtype and crow.dtype == col.dtype == torch.int64
    if dvalues.numel() == 0:
        return
    BLOCK_M, num_warps, num_stages = _tiles(M, True)
    _bsr_bwd_weight_kernel[(nnzb,)](dy, x, crow, col, dvalues, M, IN, OUT, R,
                                    BS=bs, SEARCH_STEPS=max(1, (R - 1).bit_length()),
                                    ACC_DTYPE=_acc_dtype(x.dtype), INPUT_PRECISION=_dot_precision(x.dtype),
                                    DOT_IN_ACC_DTYPE=_dot_in_acc_dtype(x.dtype),
                                    BF16_BY_HAND=_bf16_by_hand(x.dtype), BLOCK_M=BLOCK_M,
                                    num_warps=num_warps, num_stages=num_stages)

"""Triton kernels for the block-sparse linear products (format and contract: the BSR description in
``lotus_kernels.ops.block_sparse_linear``; W [out, in] stored as ``values`` [nnzb, bs, bs] with BSR
pointers ``crow``/``col`` and their transpose ``ccol``/``row``/``perm``).

    bsr_linear_fwd        out = x @ W^T + bias      program (M tile, block row r): r's stored blocks
    bsr_linear_bwd_input  dx  = dy @ W              program (M tile, block column c): c's stored blocks
    bsr_linear_bwd_weight dvalues[k] = dy[:, r_k]^T @ x[:, c_k]
                          program (group j of block row r, split s): WB of r's stored blocks at once

fwd / bwd_input run on a 1-D grid in grouped (swizzled) order: GROUP_M consecutive M tiles sweep all
block rows (columns) before the next group starts, so a wave of programs reads a few M tiles of the
activations many times while they sit in L2 (``tl.swizzle2d``, as in Triton's matmul tutorial and
PyTorch's BSR kernels). Each ``tl.dot`` takes KB stored blocks at once (K = KB * bs), so that a 32-wide
block still feeds the tensor cores a K of 64-128.

bwd_weight computes the transposed product of WB = ROWS / bs stored blocks of one block row:
[x[:, c_1] .. x[:, c_WB]]^T @ dy[:, r] is a [ROWS, bs] tile, so with ROWS >= 64 the product has the
64 rows Hopper's ``wgmma`` needs even for 16- or 32-wide blocks (one block alone, [bs, bs], would fall
back to ``mma.sync``); tile row i*bs + q holds column q of block i. It splits M into S ranges when there
are too few stored blocks to fill the GPU: pass 1 writes S fp32 partial blocks, pass 2 sums them in the
fixed order s = 0..S-1 and rounds once; S = 1 writes dvalues directly. Either way deterministic.

Every program owns a disjoint tile of its output and writes it once, so no atomics, and outputs that
arrive NaN-poisoned are fully overwritten (an empty block row / column writes bias / zeros; an empty
M writes zero dvalues). Accumulation is fp32 (fp64 for fp64); fp32 operands use TF32 tensor cores only
where the user allows it (``_common.tf32_allowed``). Launch configurations: ``_configs.launch``
(committed table, autotune on a GPU, the GPU default, or the interpreter's tiles).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _configs
from ._common import _acc_dtype, _bf16_by_hand, _dot_in_acc_dtype, _dot_precision, _interpreted, _pow2, _store_bf16_rne

# Problems below this (output elements x mean reduction length) use the default config: tuning
# costs ~1 s of compilation per config, more than a small layer's whole training run saves.
AUTOTUNE_WORK = 1 << 26
# GPU tiles of fwd / bwd_input: (BLOCK_M, K per tl.dot, num_warps, num_stages); KB = K / bs (>= 1).
# BLOCK_M >= 64 per warpgroup of 4 warps: the shape Hopper's wgmma takes (compiled-code table:
# benchmarks/results/gpu/compiled_sm90.md).
PRODUCT_TILES = ((64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (256, 64, 8, 3))
PRODUCT_DEFAULT = (64, 64, 4, 3)
GROUP_M = 8
# GPU tiles of bwd_weight: (ROWS = WB * bs output rows, BLOCK_M rows of M per step, num_warps, num_stages).
WGRAD_TILES = ((64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3))
WGRAD_DEFAULT = (64, 64, 4, 3)
_SPLIT_ALIGN = 256  # rows per split: a multiple of every BLOCK_M above


def _product_meta(tile: tuple, bs: int) -> dict:
    bm, k, w, s = tile
    return dict(BLOCK_M=bm, GROUP_M=GROUP_M, KB=max(1, k // bs), num_warps=w, num_stages=s)


def _wgrad_meta(tile: tuple, bs: int) -> dict:
    rows, bm, w, s = tile
    return dict(ROWS=max(rows, bs), BLOCK_M=bm, num_warps=w, num_stages=s)


def _as_configs(metas) -> list:
    out, seen = [], set()
    for m in metas:
        key = tuple(sorted(m.items()))
        if key not in seen:
            seen.add(key)
            meta, opts = _configs.split_config(m)
            out.append(triton.Config(meta, **opts))
    return out


@functools.cache
def product_configs(bs: int) -> list:
    """The autotune list of fwd / bwd_input for block size ``bs`` (duplicates removed)."""
    return _as_configs(_product_meta(t, bs) for t in PRODUCT_TILES)


@functools.cache
def wgrad_configs(bs: int) -> list:
    """The autotune list of bwd_weight for block size ``bs``."""
    return _as_configs(_wgrad_meta(t, bs) for t in WGRAD_TILES)


def _dtype_flags(dtype: torch.dtype) -> dict:
    return dict(
        ACC_DTYPE=_acc_dtype(dtype),
        INPUT_PRECISION=_dot_precision(dtype),
        DOT_IN_ACC_DTYPE=_dot_in_acc_dtype(dtype),
        BF16_BY_HAND=_bf16_by_hand(dtype),
    )


# ---------------------------------------------------------------- fwd and bwd_input: one kernel
@triton.jit
def _bsr_product_kernel(
    a_ptr,
    v_ptr,
    ptr_ptr,
    idx_ptr,
    perm_ptr,
    bias_ptr,
    out_ptr,
    M,
    A_COLS,
    OUT_COLS,
    SLOTS,
    M_KEY,
    NNZ_KEY,
    BS: tl.constexpr,
    TRANS_W: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_ACC_DTYPE: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP_M: tl.constexpr,
    KB: tl.constexpr,
):
    """out[m, p*BS + j] = sum over slot p's blocks t of a[m, idx[t]*BS + q] * B_t[q, j] (+ bias):
    fwd (TRANS_W): p = block row, B_t = values[t]^T; bwd_input: p = block column, B_t = values[perm[t]].
    KB stored blocks per tl.dot (K = KB * BS): one bs = 32 block alone gives the tensor cores a K of
    32; KB > 1 gathers KB blocks' activation columns and weight rows into one [BLOCK_M, KB*BS] x
    [KB*BS, BS] product (the last group of a slot masked where it runs past the slot's blocks)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m, p = tl.swizzle2d(pid // SLOTS, pid % SLOTS, num_m, SLOTS, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    ii = tl.arange(0, BS)
    jj = tl.arange(0, BS)
    start = tl.load(ptr_ptr + p)
    end = tl.load(ptr_ptr + p + 1)
    acc = tl.zeros([BLOCK_M, BS], dtype=ACC_DTYPE)
    if KB == 1:
        for t in range(start, end):
            c = tl.load(idx_ptr + t)
            if HAS_PERM:
                k = tl.load(perm_ptr + t)
            else:
                k = t
            a = tl.load(a_ptr + rows[:, None] * A_COLS + (c * BS + ii)[None, :], mask=rmask[:, None], other=0)
            w = tl.load(v_ptr + k * (BS * BS) + ii[:, None] * BS + jj[None, :])  # values[k] as stored
            if TRANS_W:
                w = tl.trans(w)
            if DOT_IN_ACC_DTYPE:
                a = a.to(ACC_DTYPE)
                w = w.to(ACC_DTYPE)
            acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    else:
        kk = tl.arange(0, KB * BS)  # reduction lane: block kk // BS of the group, column kk % BS
        inner = kk % BS
        for t0 in range(start, end, KB):
            tt = t0 + kk // BS
            valid = tt < end
            c = tl.load(idx_ptr + tt, mask=valid, other=0)
            if HAS_PERM:
                k = tl.load(perm_ptr + tt, mask=valid, other=0)
            else:
                k = tt
            a = tl.load(
                a_ptr + rows[:, None] * A_COLS + (c * BS + inner)[None, :],
                mask=rmask[:, None] & valid[None, :],
                other=0,
            )
            if TRANS_W:  # B[kk, j] = values[k, j, inner]: loaded [j, kk] (rows of a block contiguous)
                w = tl.trans(
                    tl.load(
                        v_ptr + k[None, :].to(tl.int64) * (BS * BS) + jj[:, None] * BS + inner[None, :],
                        mask=valid[None, :],
                        other=0,
                    )
                )
            else:  # B[kk, j] = values[k, inner, j]
                w = tl.load(
                    v_ptr + k[:, None].to(tl.int64) * (BS * BS) + inner[:, None] * BS + jj[None, :],
                    mask=valid[:, None],
                    other=0,
                )
            if DOT_IN_ACC_DTYPE:
                a = a.to(ACC_DTYPE)
                w = w.to(ACC_DTYPE)
            acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    ns = p * BS + jj
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ns).to(ACC_DTYPE)[None, :]
    out_ptrs = out_ptr + rows[:, None] * OUT_COLS + ns[None, :]
    mask = rmask[:, None]
    if BF16_BY_HAND:  # round to nearest even like a GPU; the interpreter's cast truncates
        _store_bf16_rne(out_ptrs, acc, mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _product(name, a, values, ptr, idx, perm, bias, out, trans_w: bool, config: dict | None = None) -> None:
    M, a_cols = a.shape
    out_cols = out.shape[1]
    bs = values.shape[1]
    slots = ptr.shape[0] - 1
    if out.numel() == 0:
        return
    nnzb = values.shape[0]
    nnz_key = _configs.nnz_bucket(nnzb, slots)
    args = (
        a,
        values,
        ptr,
        idx,
        perm if perm is not None else ptr,
        bias if bias is not None else out,
        out,
        M,
        a_cols,
        out_cols,
        slots,
        _configs.bucket(M)[0],
        nnz_key,
    )
    const = dict(BS=bs, TRANS_W=trans_w, HAS_PERM=perm is not None, HAS_BIAS=bias is not None, **_dtype_flags(a.dtype))
    if _interpreted():  # few, large programs: the interpreter's cost is per program and per op
        fallback = dict(BLOCK_M=_pow2(M, 16, 256), GROUP_M=1, KB=1, num_warps=4, num_stages=1)
    else:
        fallback = _product_meta(PRODUCT_DEFAULT, bs)
    work = M * nnzb * bs * bs
    if config is not None:  # tests: these meta-parameters, no table, no autotuning
        fallback, work = {**fallback, **config}, 0
    _configs.launch(
        name,
        _bsr_product_kernel,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * slots,),
        args,
        const,
        device=a.device,
        dtype=a.dtype,
        bucket=(bs, nnz_key, *_configs.bucket(M, a_cols, out_cols)),
        fallback=fallback,
        work=work,
        threshold=AUTOTUNE_WORK,
        configs=product_configs(bs),
        key=["M_KEY", "NNZ_KEY", "A_COLS", "OUT_COLS", "BS"],
        tuner=f"{name}:bs{bs}",
    )


def bsr_linear_fwd(
    x: torch.Tensor,
    values: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    config: dict | None = None,
) -> None:
    """out [M, out] = x [M, in] @ W^T + bias, W given by (values, crow, col). ``config`` (tests) fixes the
    meta-parameters (e.g. ``dict(KB=2, GROUP_M=4, BLOCK_M=16)``) over the default's."""
    M, IN = x.shape
    bs = values.shape[1]
    R = crow.shape[0] - 1
    assert x.is_contiguous() and values.is_contiguous() and crow.is_contiguous() and col.is_contiguous()
    assert out.is_contiguous() and out.shape[0] == M and out.shape[1] == R * bs and IN % bs == 0
    assert values.dtype == x.dtype == out.dtype and crow.dtype == col.dtype == torch.int64
    if bias is not None:
        assert bias.is_contiguous() and bias.shape == (out.shape[1],) and bias.dtype == x.dtype
    _product("bsr_fwd", x, values, crow, col, None, bias, out, trans_w=True, config=config)


def bsr_linear_bwd_input(
    dy: torch.Tensor,
    values: torch.Tensor,
    ccol: torch.Tensor,
    row: torch.Tensor,
    perm: torch.Tensor,
    dx: torch.Tensor,
    config: dict | None = None,
) -> None:
    """dx [M, in] = dy [M, out] @ W, walking W's block columns through (ccol, row, perm)."""
    M, OUT = dy.shape
    bs = values.shape[1]
    Cb = ccol.shape[0] - 1
    assert dy.is_contiguous() and values.is_contiguous() and dx.is_contiguous()
    assert ccol.is_contiguous() and row.is_contiguous() and perm.is_contiguous()
    assert dx.shape[0] == M and dx.shape[1] == Cb * bs and OUT % bs == 0
    assert values.dtype == dy.dtype == dx.dtype and ccol.dtype == row.dtype == perm.dtype == torch.int64
    _product("bsr_bwd_input", dy, values, ccol, row, perm, None, dx, trans_w=False, config=config)


# ---------------------------------------------------------------- weight gradient (SDD), split over M
@triton.jit
def _bsr_bwd_weight_kernel(
    dy_ptr,
    x_ptr,
    crow_ptr,
    col_ptr,
    dst_ptr,
    M,
    IN,
    OUT,
    NNZB,
    ROWS_PER_SPLIT,
    M_KEY,
    NNZ_KEY,
    BS: tl.constexpr,
    PARTIAL: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_ACC_DTYPE: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Program (j, r, s): stored blocks crow[r] + j*WB .. + WB - 1 of block row r (WB = ROWS / BS; those
    past the row's end masked off; a program past it does nothing) over M rows [s * ROWS_PER_SPLIT,
    (s + 1) * ROWS_PER_SPLIT): acc [ROWS, BS] = X^T @ dy[:, r], X = those blocks' x columns side by side,
    so acc[i*BS + q, p] = dvalues[k_i][p, q]. PARTIAL: store the ACC_DTYPE sum at partial slot s; else
    (one split) the rounded dvalues."""
    WB: tl.constexpr = ROWS // BS
    j = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2).to(tl.int64)
    first = tl.load(crow_ptr + r) + j * WB
    end = tl.load(crow_ptr + r + 1)
    if first < end:
        rho = tl.arange(0, ROWS)
        k = first + rho // BS  # the stored block of each tile row
        valid = k < end
        xcols = tl.load(col_ptr + k, mask=valid, other=0) * BS + rho % BS
        pp = tl.arange(0, BS)
        ms = tl.arange(0, BLOCK_M)
        m_lo = s * ROWS_PER_SPLIT
        m_hi = tl.minimum(m_lo + ROWS_PER_SPLIT, M)
        acc = tl.zeros([ROWS, BS], dtype=ACC_DTYPE)
        for m0 in range(m_lo, m_hi, BLOCK_M):
            rows = m0 + ms.to(tl.int64)
            rmask = rows < m_hi
            xg = tl.load(x_ptr + rows[:, None] * IN + xcols[None, :], mask=rmask[:, None] & valid[None, :], other=0)
            g = tl.load(dy_ptr + rows[:, None] * OUT + (r * BS + pp)[None, :], mask=rmask[:, None], other=0)
            if DOT_IN_ACC_DTYPE:
                xg = xg.to(ACC_DTYPE)
                g = g.to(ACC_DTYPE)
            acc = tl.dot(tl.trans(xg), g, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        offs = k[:, None] * (BS * BS) + pp[None, :] * BS + (rho % BS)[:, None]
        if PARTIAL:
            tl.store(dst_ptr + s * NNZB * (BS * BS) + offs, acc, mask=valid[:, None])
        elif BF16_BY_HAND:
            _store_bf16_rne(dst_ptr + offs, acc, valid[:, None])
        else:
            tl.store(dst_ptr + offs, acc.to(dst_ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, S, NUMEL, BF16_BY_HAND: tl.constexpr, BLOCK: tl.constexpr):
    """out[e] = sum over s = 0..S-1 of part[s, e], in that order (deterministic), rounded once."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    acc = tl.load(part_ptr + offs, mask=mask, other=0)
    for s in range(1, S):
        acc += tl.load(part_ptr + s * NUMEL + offs, mask=mask, other=0)
    if BF16_BY_HAND:
        _store_bf16_rne(out_ptr + offs, acc, mask)
    else:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def weight_grad_splits(M: int, nnzb: int, device: torch.device, bs: int = 32) -> int:
    """How many ranges of M the weight gradient is split into: enough programs (~nnzb / WB of them, WB
    = 64 / bs blocks each at the default tile) for ~4 waves of the GPU (they are few at low density or
    large blocks), never a range under _SPLIT_ALIGN rows. 1 under the interpreter, whose cost is per
    program."""
    if device.type != "cuda" or _interpreted() or nnzb == 0:
        return 1
    programs = triton.cdiv(nnzb, max(1, 64 // bs))
    want = triton.cdiv(4 * _configs.num_sms(device.index or 0), programs)
    return max(1, min(want, triton.cdiv(M, _SPLIT_ALIGN)))


def bsr_linear_bwd_weight(
    dy: torch.Tensor,
    x: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    dvalues: torch.Tensor,
    splits: int | None = None,
    config: dict | None = None,
) -> None:
    """dvalues[k] = dy[:, block row of k]^T @ x[:, block column of k], for the stored blocks only.
    ``splits`` and ``config`` (tests) override ``weight_grad_splits`` and the default meta-parameters."""
    M, OUT = dy.shape
    IN = x.shape[1]
    nnzb, bs, _ = dvalues.shape
    R = crow.shape[0] - 1
    Cb = IN // bs
    assert dy.is_contiguous() and x.is_contiguous() and dvalues.is_contiguous()
    assert crow.is_contiguous() and col.is_contiguous() and col.shape == (nnzb,)
    assert x.shape[0] == M and OUT == R * bs and IN % bs == 0
    assert dy.dtype == x.dtype == dvalues.dtype and crow.dtype == col.dtype == torch.int64
    if dvalues.numel() == 0:
        return
    S = splits or weight_grad_splits(M, nnzb, x.device, bs)
    S = max(1, min(S, triton.cdiv(M, 16))) if M > 0 else 1
    rows_per_split = triton.cdiv(triton.cdiv(max(M, 1), S), 16) * 16
    S = triton.cdiv(max(M, 1), rows_per_split)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dst = dvalues if S == 1 else torch.empty((S, nnzb, bs, bs), dtype=acc, device=x.device)
    nnz_key = _configs.nnz_bucket(nnzb, R)
    args = (dy, x, crow, col, dst, M, IN, OUT, nnzb, rows_per_split, _configs.bucket(M)[0], nnz_key)
    const = dict(BS=bs, PARTIAL=S > 1, **_dtype_flags(x.dtype))
    if _interpreted():  # a few blocks per program (fewer programs), long steps over M
        fallback = dict(
            ROWS=bs * min(triton.next_power_of_2(Cb), max(1, 128 // bs)),
            BLOCK_M=_pow2(rows_per_split, 16, 512),
            num_warps=4,
            num_stages=1,
        )
    else:
        fallback = _wgrad_meta(WGRAD_DEFAULT, bs)
    work = M * nnzb * bs * bs
    if config is not None:
        fallback, work = {**fallback, **config}, 0
    _configs.launch(
        "bsr_bwd_weight",
        _bsr_bwd_weight_kernel,
        lambda meta: (triton.cdiv(Cb, meta["ROWS"] // bs), R, S),
        args,
        const,
        device=x.device,
        dtype=x.dtype,
        bucket=(bs, S > 1, nnz_key, *_configs.bucket(M, IN, OUT)),
        fallback=fallback,
        work=work,
        threshold=AUTOTUNE_WORK,
        configs=wgrad_configs(bs),
        key=["M_KEY", "NNZ_KEY", "IN", "OUT", "BS", "PARTIAL"],
        tuner=f"bsr_bwd_weight:bs{bs}",
    )
    if S > 1:
        numel = nnzb * bs * bs
        block = 1024
        _sum_partials_kernel[(triton.cdiv(numel, block),)](
            dst, dvalues, S, numel, BF16_BY_HAND=_bf16_by_hand(x.dtype), BLOCK=block
        )

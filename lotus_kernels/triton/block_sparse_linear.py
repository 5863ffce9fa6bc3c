"""Triton kernels for the block-sparse linear products (format and contract: the BSR description in
``lotus_kernels.ops.block_sparse_linear``; W [out, in] stored as ``values`` [nnzb, bs, bs] with BSR
pointers ``crow``/``col`` and their transpose ``ccol``/``row``/``perm``).

    bsr_linear_fwd        out = x @ W^T + bias      program (M tile, block row r): r's stored blocks
    bsr_linear_bwd_input  dx  = dy @ W              program (M tile, block column c): c's stored blocks
    bsr_linear_bwd_weight dvalues[k] = dy[:, r_k]^T @ x[:, c_k]   program (k, split s): rows of split s

fwd / bwd_input run on a 1-D grid in grouped (swizzled) order: GROUP_M consecutive M tiles sweep all
block rows (columns) before the next group starts, so a wave of programs reads a few M tiles of the
activations many times while they sit in L2 (``tl.swizzle2d``, as in Triton's matmul tutorial and
PyTorch's BSR kernels). bwd_weight splits M into S ranges when there are too few stored blocks to fill
the GPU: pass 1 writes S fp32 partial blocks, pass 2 sums them in the fixed order s = 0..S-1 and
rounds once; S = 1 writes dvalues directly. Either way deterministic.

Every program owns a disjoint tile of its output and writes it once, so no atomics, and outputs that
arrive NaN-poisoned are fully overwritten (an empty block row / column writes bias / zeros; an empty
M writes zero dvalues). Accumulation is fp32 (fp64 for fp64). Launch configurations come from
``_configs`` (committed table, autotune on a GPU, or the interpreter's tiles).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _configs
from ._common import _acc_dtype, _bf16_by_hand, _dot_in_acc_dtype, _dot_precision, _interpreted, _pow2, _store_bf16_rne

# Problems below this (output elements x mean reduction length) use the default config: tuning
# costs ~1 s of compilation per config, more than a small layer's whole training run saves.
AUTOTUNE_WORK = 1 << 26
_PRODUCT_DEFAULT = dict(BLOCK_M=64, GROUP_M=8, KB=1, num_warps=4, num_stages=3)
_PRODUCT_CONFIGS = [triton.Config({"BLOCK_M": bm, "GROUP_M": 8, "KB": kb}, num_warps=w, num_stages=s)
                    for bm, kb, w, s in ((64, 1, 4, 3), (64, 2, 4, 3), (128, 1, 4, 3), (128, 2, 8, 3), (128, 4, 8, 3),
                                         (128, 1, 8, 4), (256, 2, 8, 3))]
_WGRAD_DEFAULT = dict(BLOCK_M=64, num_warps=4, num_stages=3)
_WGRAD_CONFIGS = [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
                  for bm, w, s in ((32, 4, 3), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (128, 8, 4))]
_SPLIT_ALIGN = 256  # rows per split: a multiple of every BLOCK_M above


def _launch(name, kernel, configs, key_names, grid, args, const, *, device, dtype, bucket, work, interp):
    """Run ``kernel`` with the table's config, the autotuner's, the GPU default or (interpreted) ``interp``."""
    entry = _configs.table_entry(name, device, dtype, bucket)
    if entry is not None:
        meta, launch = _configs.split_config(entry)
        kernel[grid(meta)](*args, **const, **meta, **launch)
    elif _configs.use_autotune(work, AUTOTUNE_WORK):
        _configs.autotuned(name, kernel, configs, key_names)[grid](*args, **const)
        _configs.record(name, device, dtype, bucket)
    else:
        meta, launch = _configs.split_config(interp)
        kernel[grid(meta)](*args, **const, **meta, **launch)


def _dtype_flags(dtype: torch.dtype) -> dict:
    return dict(ACC_DTYPE=_acc_dtype(dtype), INPUT_PRECISION=_dot_precision(dtype),
                DOT_IN_ACC_DTYPE=_dot_in_acc_dtype(dtype), BF16_BY_HAND=_bf16_by_hand(dtype))


# ---------------------------------------------------------------- fwd and bwd_input: one kernel
@triton.jit
def _bsr_product_kernel(a_ptr, v_ptr, ptr_ptr, idx_ptr, perm_ptr, bias_ptr, out_ptr, M, A_COLS, OUT_COLS, SLOTS,
                        M_KEY, BS: tl.constexpr, TRANS_W: tl.constexpr, HAS_PERM: tl.constexpr,
                        HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                        DOT_IN_ACC_DTYPE: tl.constexpr, BF16_BY_HAND: tl.constexpr,
                        BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr, KB: tl.constexpr):
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
            a = tl.load(a_ptr + rows[:, None] * A_COLS + (c * BS + inner)[None, :],
                        mask=rmask[:, None] & valid[None, :], other=0)
            if TRANS_W:  # B[kk, j] = values[k, j, inner]: loaded [j, kk] (rows of a block contiguous)
                w = tl.trans(tl.load(v_ptr + k[None, :].to(tl.int64) * (BS * BS) + jj[:, None] * BS + inner[None, :],
                                     mask=valid[None, :], other=0))
            else:  # B[kk, j] = values[k, inner, j]
                w = tl.load(v_ptr + k[:, None].to(tl.int64) * (BS * BS) + inner[:, None] * BS + jj[None, :],
                            mask=valid[:, None], other=0)
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


def _product(name, a, values, ptr, idx, perm, bias, out, trans_w: bool, blocks_per_dot: int | None = None) -> None:
    M, a_cols = a.shape
    out_cols = out.shape[1]
    bs = values.shape[1]
    slots = ptr.shape[0] - 1
    if out.numel() == 0:
        return
    nnzb = values.shape[0]
    args = (a, values, ptr, idx, perm if perm is not None else ptr, bias if bias is not None else out, out,
            M, a_cols, out_cols, slots, _configs.bucket(M)[0])
    const = dict(BS=bs, TRANS_W=trans_w, HAS_PERM=perm is not None, HAS_BIAS=bias is not None, **_dtype_flags(a.dtype))
    interp = dict(BLOCK_M=_pow2(M, 16, 256), GROUP_M=1, KB=1, num_warps=4, num_stages=1) if _interpreted() \
        else _PRODUCT_DEFAULT
    if blocks_per_dot is not None:  # tests: a fixed KB, autotuning off
        interp = {**interp, "KB": blocks_per_dot}
        work = 0
    else:
        work = M * nnzb * bs * bs
    _launch(name, _bsr_product_kernel, _PRODUCT_CONFIGS, ["M_KEY", "A_COLS", "OUT_COLS", "BS"],
            lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * slots,), args, const, device=a.device, dtype=a.dtype,
            bucket=(bs, *_configs.bucket(M, a_cols, out_cols)), work=work, interp=interp)


def bsr_linear_fwd(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                   bias: torch.Tensor | None, out: torch.Tensor, blocks_per_dot: int | None = None) -> None:
    """out [M, out] = x [M, in] @ W^T + bias, W given by (values, crow, col). ``blocks_per_dot``
    (tests) fixes KB instead of the config's."""
    M, IN = x.shape
    bs = values.shape[1]
    R = crow.shape[0] - 1
    assert x.is_contiguous() and values.is_contiguous() and crow.is_contiguous() and col.is_contiguous()
    assert out.is_contiguous() and out.shape[0] == M and out.shape[1] == R * bs and IN % bs == 0
    assert values.dtype == x.dtype == out.dtype and crow.dtype == col.dtype == torch.int64
    if bias is not None:
        assert bias.is_contiguous() and bias.shape == (out.shape[1],) and bias.dtype == x.dtype
    _product("bsr_fwd", x, values, crow, col, None, bias, out, trans_w=True, blocks_per_dot=blocks_per_dot)


def bsr_linear_bwd_input(dy: torch.Tensor, values: torch.Tensor, ccol: torch.Tensor, row: torch.Tensor,
                         perm: torch.Tensor, dx: torch.Tensor, blocks_per_dot: int | None = None) -> None:
    """dx [M, in] = dy [M, out] @ W, walking W's block columns through (ccol, row, perm)."""
    M, OUT = dy.shape
    bs = values.shape[1]
    Cb = ccol.shape[0] - 1
    assert dy.is_contiguous() and values.is_contiguous() and dx.is_contiguous()
    assert ccol.is_contiguous() and row.is_contiguous() and perm.is_contiguous()
    assert dx.shape[0] == M and dx.shape[1] == Cb * bs and OUT % bs == 0
    assert values.dtype == dy.dtype == dx.dtype and ccol.dtype == row.dtype == perm.dtype == torch.int64
    _product("bsr_bwd_input", dy, values, ccol, row, perm, None, dx, trans_w=False, blocks_per_dot=blocks_per_dot)


# ---------------------------------------------------------------- weight gradient (SDD), split over M
@triton.jit
def _bsr_bwd_weight_kernel(dy_ptr, x_ptr, crow_ptr, col_ptr, dst_ptr, M, IN, OUT, R, NNZB, ROWS_PER_SPLIT, M_KEY,
                           BS: tl.constexpr, SEARCH_STEPS: tl.constexpr, PARTIAL: tl.constexpr,
                           ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_ACC_DTYPE: tl.constexpr,
                           BF16_BY_HAND: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program (k, s): block k's product over rows [s * ROWS_PER_SPLIT, (s + 1) * ROWS_PER_SPLIT).
    PARTIAL: store the ACC_DTYPE sum at partial slot s; else (one split) the rounded dvalues[k]."""
    k = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
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
    ms = tl.arange(0, BLOCK_M)
    m_lo = s * ROWS_PER_SPLIT
    m_hi = tl.minimum(m_lo + ROWS_PER_SPLIT, M)
    acc = tl.zeros([BS, BS], dtype=ACC_DTYPE)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rows = m0 + ms.to(tl.int64)
        rmask = rows < m_hi
        g = tl.load(dy_ptr + rows[:, None] * OUT + (r * BS + ii)[None, :], mask=rmask[:, None], other=0)
        a = tl.load(x_ptr + rows[:, None] * IN + (c * BS + ii)[None, :], mask=rmask[:, None], other=0)
        if DOT_IN_ACC_DTYPE:
            g = g.to(ACC_DTYPE)
            a = a.to(ACC_DTYPE)
        acc = tl.dot(tl.trans(g), a, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    if PARTIAL:
        tl.store(dst_ptr + (s * NNZB + k) * (BS * BS) + ii[:, None] * BS + ii[None, :], acc)
    else:
        dv_ptrs = dst_ptr + k * (BS * BS) + ii[:, None] * BS + ii[None, :]
        if BF16_BY_HAND:
            _store_bf16_rne(dv_ptrs, acc, None)
        else:
            tl.store(dv_ptrs, acc.to(dst_ptr.dtype.element_ty))


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


def weight_grad_splits(M: int, nnzb: int, device: torch.device) -> int:
    """How many ranges of M the weight gradient is split into: enough programs for ~4 waves of the
    GPU (nnzb alone is small at low density or large blocks), never a range under _SPLIT_ALIGN rows.
    1 under the interpreter, whose cost is per program."""
    if device.type != "cuda" or _interpreted() or nnzb == 0:
        return 1
    want = triton.cdiv(4 * _configs.num_sms(device.index or 0), nnzb)
    return max(1, min(want, triton.cdiv(M, _SPLIT_ALIGN)))


def bsr_linear_bwd_weight(dy: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                          dvalues: torch.Tensor, splits: int | None = None) -> None:
    """dvalues[k] = dy[:, block row of k]^T @ x[:, block column of k], for the stored blocks only.
    ``splits`` (tests) overrides ``weight_grad_splits``."""
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
    S = splits or weight_grad_splits(M, nnzb, x.device)
    S = max(1, min(S, triton.cdiv(M, 16))) if M > 0 else 1
    rows_per_split = triton.cdiv(triton.cdiv(max(M, 1), S), 16) * 16
    S = triton.cdiv(max(M, 1), rows_per_split)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dst = dvalues if S == 1 else torch.empty((S, nnzb, bs, bs), dtype=acc, device=x.device)
    args = (dy, x, crow, col, dst, M, IN, OUT, R, nnzb, rows_per_split, _configs.bucket(M)[0])
    const = dict(BS=bs, SEARCH_STEPS=max(1, (R - 1).bit_length()), PARTIAL=S > 1, **_dtype_flags(x.dtype))
    interp = dict(BLOCK_M=_pow2(rows_per_split, 16, 512), num_warps=4, num_stages=1) if _interpreted() \
        else _WGRAD_DEFAULT
    _launch("bsr_bwd_weight", _bsr_bwd_weight_kernel, _WGRAD_CONFIGS, ["M_KEY", "IN", "OUT", "BS", "PARTIAL"],
            lambda meta: (nnzb, S), args, const, device=x.device, dtype=x.dtype,
            bucket=(bs, S > 1, *_configs.bucket(M, IN, OUT)), work=M * nnzb * bs * bs, interp=interp)
    if S > 1:
        numel = nnzb * bs * bs
        block = 1024
        _sum_partials_kernel[(triton.cdiv(numel, block),)](dst, dvalues, S, numel,
                                                          BF16_BY_HAND=_bf16_by_hand(x.dtype), BLOCK=block)

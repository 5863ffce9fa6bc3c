"""Triton kernels for ``ops.attention`` (semantics: ``lotus_kernels.ops.attention``).

Padded ([B, H, N, D], optional key padding mask) and packed varlen ([T, H, D] with cu_seqlens) go
through the same kernels: a program handles one (sequence b, head h) pair and finds its rows at a
per-sequence offset and row stride (VARLEN reads the offsets from cu_seqlens); query blocks past the
end of a shorter sequence store nothing.

Forward, flash-style: one program per (block of BLOCK_M queries, b*H + h) walks the keys in blocks
of BLOCK_N with an online softmax in fp32 (fp64 for float64), and writes ``out`` and ``lse`` (+inf for
a query that sees no unpadded key, whose out is 0). Backward, flash-style and deterministic (no
atomics): P is recomputed from q, k and lse; one kernel per key block accumulates dK and dV over all
query blocks, another per query block accumulates dQ over all key blocks; delta = rowsum(dO * O) is
recomputed in each from the loaded tiles. The head dim is padded to a power of two >= 16
(``tl.dot``'s minimum) with masked loads. Under the interpreter bf16/fp16 tiles are upcast to fp32
before ``tl.dot`` (its numpy dot mishandles bf16 operands: errors of 1e8 otherwise).

Scores: "cls" is the forward kernel (which stores query 0's raw scores as it computes them) plus ONE
small kernel (``_cls_scores_kernel``: mean over heads and the sink rule), no PyTorch op in between;
"received" is computed from lse in PyTorch, in query chunks (``scores_from_lse``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from . import _configs
from ._common import _acc_dtype, _dot_precision, _interpreted, _pow2


@triton.jit
def _seq(cu_ptr, b, h, N, T, H, D, VARLEN: tl.constexpr):
    """(length, q/k/v row-0 offset, row stride, lse offset) of sequence b, head h."""
    if VARLEN:
        start = tl.load(cu_ptr + b).to(tl.int64)  # int64 or int32 offsets (as flash-attn's)
        n = tl.load(cu_ptr + b + 1).to(tl.int64) - start
        base = (start * H + h) * D
        ld = H * D + 0 * b
        lbase = h * T + start
    else:
        bh = b * H + h
        n = N + 0 * b
        base = bh * N * D
        ld = D + 0 * b
        lbase = bh * N
    return n, base, ld, lbase


@triton.jit
def _mm(a, b, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, BY_HAND: tl.constexpr):
    """a @ b accumulated in ACC_DTYPE. BY_HAND (fp64 on a GPU, small tiles): broadcast, multiply and
    sum, because Triton's fp64 MMA lowering rejects the register operands these kernels have
    (Triton 3.8 for sm_90: "fp64 don't support largeK MMA")."""
    if BY_HAND:
        return tl.sum(a.to(ACC_DTYPE)[:, :, None] * b.to(ACC_DTYPE)[None, :, :], axis=1)
    else:
        return tl.dot(a, b, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)


@triton.jit
def _attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    cu_ptr,
    out_ptr,
    lse_ptr,
    s0_ptr,
    N,
    T,
    D,
    scale,
    HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr,
    CLS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BY_HAND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    H,
    N_KEY,
):
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    n, base, ld, lbase = _seq(cu_ptr, b, bh % H, N, T, H, D, VARLEN)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    rmask = rows < n
    dmask = dims < D
    q = tl.load(q_ptr + base + rows[:, None] * ld + dims[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(ACC_DTYPE)
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    l_i = tl.zeros((BLOCK_M,), ACC_DTYPE)
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC_DTYPE)
    for j0 in range(0, n, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < n
        kv_mask = cmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + base + cols[:, None] * ld + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + base + cols[:, None] * ld + dims[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(ACC_DTYPE)
            v = v.to(ACC_DTYPE)
        s = _mm(q, tl.trans(k), ACC_DTYPE, INPUT_PRECISION, BY_HAND) * scale
        valid = cmask
        if HAS_MASK:
            padded = tl.load(mask_ptr + b * N + cols, mask=cmask, other=1)
            valid = valid & (padded == 0)
        s = tl.where(valid[None, :], s, float("-inf"))
        if CLS:  # the first query's raw scores (-inf at padded keys), laid out like lse
            if tl.program_id(0) == 0:
                tl.store(s0_ptr + lbase + cols, tl.sum(tl.where(rows[:, None] == 0, s, 0.0), 0), mask=cmask)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no unpadded key yet: keep exps at 0, not NaN
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = _mm(p.to(v.dtype), v, ACC_DTYPE, INPUT_PRECISION, BY_HAND)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    empty = l_i == 0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + base + rows[:, None] * ld + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=rmask[:, None] & dmask[None, :],
    )
    lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(lse_ptr + lbase + rows, lse, mask=rmask)


@triton.jit
def _cls_scores_kernel(
    s0_ptr,
    lse_ptr,
    mask_ptr,
    cu_ptr,
    out_ptr,
    N,
    T,
    H,
    HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr,
    SINK: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Class-token scores of sequence b = program_id(0) from the first query's raw scores s0 and lse (same
    layout), written by the fused forward or by ``_cls_row_kernel``: out[j] = mean over h of
    exp(s0[h, j] - lse[h, 0]) over b's keys j (padded keys have s0 = -inf: 0), BLOCK_H heads per load (one
    memory round trip for all of a key block's heads, summed in a fixed order). SINK: out[0] := the mean
    of out[1:] over unpadded keys (0 with none; 0 if key 0 is padded), the sum kept along the same pass,
    so the scores are final here with no PyTorch ops after. One program walks its whole sequence: B
    programs (64 for ViT-B, one key block each at N = 197), every sequence's sink in one place."""
    b = tl.program_id(0).to(tl.int64)
    if VARLEN:  # s0 / lse [H, T], scores [T]
        start = tl.load(cu_ptr + b).to(tl.int64)
        n = tl.load(cu_ptr + b + 1).to(tl.int64) - start
        row, head_stride, obase = start, T, start
    else:  # s0 / lse [B, H, N], scores [B, N]
        n = N + 0 * b
        row, head_stride, obase = b * H * N, N + 0 * b, b * N
    hs = tl.arange(0, BLOCK_H)
    total = tl.zeros([BLOCK], dtype=lse_ptr.dtype.element_ty)  # the sink's sum and count, per lane
    count = tl.zeros([BLOCK], dtype=lse_ptr.dtype.element_ty)
    for j0 in range(0, n, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        cmask = cols < n
        acc = tl.zeros([BLOCK], dtype=lse_ptr.dtype.element_ty)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + hs
            hmask = hh < H
            sc = tl.load(
                s0_ptr + row + hh[:, None] * head_stride + cols[None, :],
                mask=hmask[:, None] & cmask[None, :],
                other=float("-inf"),
            )
            lse = tl.load(lse_ptr + row + hh * head_stride, mask=hmask, other=float("inf"))
            acc += tl.sum(tl.exp(sc - lse[:, None]), 0)
        acc = acc / H
        if SINK:  # key 0 is written after the loop
            rest = cmask & (cols > 0)
            tl.store(out_ptr + obase + cols, acc, mask=rest)
            if HAS_MASK:
                rest = rest & (tl.load(mask_ptr + b * N + cols, mask=cmask, other=1) == 0)
            total += tl.where(rest, acc, 0.0)
            count += rest.to(lse_ptr.dtype.element_ty)
        else:
            tl.store(out_ptr + obase + cols, acc, mask=cmask)
    if SINK:
        sink = tl.sum(total, 0) / tl.maximum(tl.sum(count, 0), 1.0)
        if HAS_MASK:
            sink = tl.where(tl.load(mask_ptr + b * N) == 0, sink, 0.0)
        tl.store(out_ptr + obase, sink, mask=n > 0)  # an empty packed sequence owns no token


@triton.jit
def _cls_row_kernel(
    q_ptr,
    k_ptr,
    mask_ptr,
    cu_ptr,
    s0_ptr,
    lse_ptr,
    N,
    T,
    D,
    scale,
    HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    H,
):
    """Program (b, h) of the SDPA path's class-token scores, for when another kernel computes the
    attention output: the first query's raw scores s0[j] = scale * q[b, h, 0] . k[b, h, j] (-inf at
    padded keys) and their log-sum-exp, stored where the fused forward stores them (s0 laid out like lse,
    the lse at query 0), so that ``_cls_scores_kernel`` finishes both paths alike. A GEMV over one head's
    keys: reads them once; B * H programs keep every SM streaming."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    n, base, ld, lbase = _seq(cu_ptr, b, bh % H, N, T, H, D, VARLEN)
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < D
    q0 = tl.load(q_ptr + base + dims, mask=dmask & (n > 0), other=0).to(ACC_DTYPE)
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), ACC_DTYPE), 0)
    l_i = tl.sum(tl.zeros([BLOCK_N], ACC_DTYPE), 0)
    for j0 in range(0, n, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < n
        kt = tl.load(
            k_ptr + base + cols[:, None] * ld + dims[None, :], mask=cmask[:, None] & dmask[None, :], other=0
        ).to(ACC_DTYPE)
        valid = cmask
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + b * N + cols, mask=cmask, other=1) == 0)
        sc = tl.where(valid, tl.sum(kt * q0[None, :], 1) * scale, float("-inf"))
        tl.store(s0_ptr + lbase + cols, sc, mask=cmask)
        m_new = tl.maximum(m_i, tl.max(sc, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no unpadded key yet: exps stay 0, not NaN
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(sc - m_safe), 0)
        m_i = m_new
    lse = tl.where(l_i == 0, float("inf"), m_i + tl.log(tl.where(l_i == 0, 1.0, l_i)))  # +inf: every p is 0
    tl.store(lse_ptr + lbase, lse, mask=n > 0)


@triton.jit
def _cu_seqlens_ok_kernel(cu_ptr, ok_ptr, B, T, MAX_SEQLEN, BLOCK: tl.constexpr):
    """ok = cu[0] == 0, cu[B] == T and 0 <= cu[b + 1] - cu[b] <= MAX_SEQLEN for every b: the whole
    device-side check of the packed offsets in one program (PyTorch ops: ~10 launches)."""
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for b0 in range(0, B, BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        m = b < B
        lo = tl.load(cu_ptr + b, mask=m, other=0).to(tl.int64)
        hi = tl.load(cu_ptr + b + 1, mask=m, other=0).to(tl.int64)
        bad += (m & ((hi < lo) | (hi - lo > MAX_SEQLEN))).to(tl.int32)
    ends = (tl.load(cu_ptr).to(tl.int64) == 0) & (tl.load(cu_ptr + B).to(tl.int64) == T)
    tl.store(ok_ptr, (ends & (tl.sum(bad, 0) == 0)).to(tl.int32))


@triton.jit
def _bwd_tile(
    q, k, v, do, o, lse, valid, scale, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, BY_HAND: tl.constexpr
):
    """(P, dS) of one [BLOCK_M, BLOCK_N] tile, scale folded into dS; 0 outside ``valid``."""
    s = _mm(q, tl.trans(k), ACC_DTYPE, INPUT_PRECISION, BY_HAND) * scale
    dp = _mm(do, tl.trans(v), ACC_DTYPE, INPUT_PRECISION, BY_HAND)
    p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)  # lse = +inf (no unpadded key) gives 0
    delta = tl.sum(do.to(ACC_DTYPE) * o.to(ACC_DTYPE), 1)
    return p, p * (dp - delta[:, None]) * scale


@triton.jit
def _attention_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    o_ptr,
    lse_ptr,
    mask_ptr,
    cu_ptr,
    dk_ptr,
    dv_ptr,
    N,
    T,
    D,
    scale,
    HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BY_HAND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    H,
    N_KEY,
):
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    n, base, ld, lbase = _seq(cu_ptr, b, bh % H, N, T, H, D, VARLEN)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    cmask = cols < n
    dmask = dims < D
    kv_ptrs = base + cols[:, None] * ld + dims[None, :]
    kv_mask = cmask[:, None] & dmask[None, :]
    k = tl.load(k_ptr + kv_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_ptrs, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(ACC_DTYPE)
        v = v.to(ACC_DTYPE)
    valid_k = cmask
    if HAS_MASK:
        valid_k = valid_k & (tl.load(mask_ptr + b * N + cols, mask=cmask, other=1) == 0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), ACC_DTYPE)
    dv = tl.zeros((BLOCK_N, BLOCK_D), ACC_DTYPE)
    for i0 in range(0, n, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        rmask = rows < n
        q_ptrs = base + rows[:, None] * ld + dims[None, :]
        q_mask = rmask[:, None] & dmask[None, :]
        q = tl.load(q_ptr + q_ptrs, mask=q_mask, other=0.0)
        do = tl.load(do_ptr + q_ptrs, mask=q_mask, other=0.0)
        o = tl.load(o_ptr + q_ptrs, mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(ACC_DTYPE)
            do = do.to(ACC_DTYPE)
        lse = tl.load(lse_ptr + lbase + rows, mask=rmask, other=float("inf"))
        p, ds = _bwd_tile(
            q, k, v, do, o, lse, rmask[:, None] & valid_k[None, :], scale, ACC_DTYPE, INPUT_PRECISION, BY_HAND
        )
        dv += _mm(tl.trans(p.to(do.dtype)), do, ACC_DTYPE, INPUT_PRECISION, BY_HAND)
        dk += _mm(tl.trans(ds.to(q.dtype)), q, ACC_DTYPE, INPUT_PRECISION, BY_HAND)
    tl.store(dk_ptr + kv_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + kv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attention_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    o_ptr,
    lse_ptr,
    mask_ptr,
    cu_ptr,
    dq_ptr,
    N,
    T,
    D,
    scale,
    HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BY_HAND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    H,
    N_KEY,
):
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    n, base, ld, lbase = _seq(cu_ptr, b, bh % H, N, T, H, D, VARLEN)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    rmask = rows < n
    dmask = dims < D
    q_ptrs = base + rows[:, None] * ld + dims[None, :]
    q_mask = rmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + q_ptrs, mask=q_mask, other=0.0)
    do = tl.load(do_ptr + q_ptrs, mask=q_mask, other=0.0)
    o = tl.load(o_ptr + q_ptrs, mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(ACC_DTYPE)
        do = do.to(ACC_DTYPE)
    lse = tl.load(lse_ptr + lbase + rows, mask=rmask, other=float("inf"))
    dq = tl.zeros((BLOCK_M, BLOCK_D), ACC_DTYPE)
    for j0 in range(0, n, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < n
        kv_mask = cmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + base + cols[:, None] * ld + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + base + cols[:, None] * ld + dims[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(ACC_DTYPE)
            v = v.to(ACC_DTYPE)
        valid_k = cmask
        if HAS_MASK:
            valid_k = valid_k & (tl.load(mask_ptr + b * N + cols, mask=cmask, other=1) == 0)
        _, ds = _bwd_tile(
            q, k, v, do, o, lse, rmask[:, None] & valid_k[None, :], scale, ACC_DTYPE, INPUT_PRECISION, BY_HAND
        )
        dq += _mm(ds.to(k.dtype), k, ACC_DTYPE, INPUT_PRECISION, BY_HAND)
    tl.store(dq_ptr + q_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


# None: fp64 products by hand on a GPU only; tests set True to run that path under the interpreter.
FP64_BY_HAND: bool | None = None
# The score kernel's key block cap (None: 256 on a GPU, 1024 interpreted); tests set 16 to walk several blocks.
CLS_BLOCK: int | None = None
# Autotuning pays for itself only on real sizes (see _configs); ViT-B/16 at batch 64 is ~2e9.
AUTOTUNE_WORK = 1 << 26
# Autotune lists: BLOCK_M and BLOCK_N >= 64 (every tl.dot of the forward and both backward kernels then has
# the 64 rows per warpgroup Hopper's wgmma needs). The backward kernels hold two [BLOCK, D] fp32
# accumulators plus their operand tiles: 8 warps keep them in registers at D = 64 (with 4 warps they sit at
# 254 registers and Triton 3.6 spills); (128, 64) with 4 warps spills in the forward. Compiled-code table:
# benchmarks/results/gpu/compiled_sm90.md.
CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
    for bm, bn, w, st in ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3))
]
BWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
    for bm, bn, w, st in ((64, 64, 8, 2), (64, 64, 8, 3), (128, 64, 8, 2))
]
BWD_WARPS = 8  # the backward's default (GPU) tiles: the forward's, with 8 warps
_KEY = ["N_KEY", "BLOCK_D", "HAS_MASK", "VARLEN"]


def _config(q, cu_seqlens, max_seqlen):
    """(B, H, N, T, D, default tiles, common constexpr kwargs) for padded or packed q."""
    interpreted = _interpreted()
    if cu_seqlens is not None:
        T, H, D = q.shape
        B, N = cu_seqlens.numel() - 1, max_seqlen
    else:
        B, H, N, D = q.shape
        T = 0
    # Under the interpreter the cost is per program and per op: few, large blocks.
    # fp64 products by hand on a GPU (see _mm), in 16-wide tiles that keep the 3-D product in registers
    by_hand = q.dtype == torch.float64 and (not interpreted if FP64_BY_HAND is None else FP64_BY_HAND)
    block = _pow2(N, 16, 128 if interpreted else (16 if by_hand else 64))
    kw = dict(
        VARLEN=cu_seqlens is not None,
        ACC_DTYPE=_acc_dtype(q.dtype),
        INPUT_PRECISION=_dot_precision(q.dtype),
        UPCAST=interpreted and q.dtype in (torch.bfloat16, torch.float16),
        BY_HAND=by_hand,
        BLOCK_D=_pow2(D, 16, 1 << 16),
    )
    tiles = dict(BLOCK_M=block, BLOCK_N=block, num_warps=4, num_stages=1 if interpreted else 2)
    return B, H, N, T, D, tiles, kw


def _launch(name, kernel, q, N, B, H, tiles, axis0, args, kw, configs=None):
    """Program (query or key block, b*H + h), the block index fastest: the programs of one (b, h),
    which share its K/V (or Q/dO) rows, run next to each other (the grouped order for attention).
    Config: ``_configs.launch`` (table, autotune on a GPU for real sizes, else ``tiles``); fp64 by
    hand is never tuned (its 16-wide tiles are the only ones that fit registers)."""
    n_key = _configs.bucket(N)[0]
    _configs.launch(
        name,
        kernel,
        lambda meta: (triton.cdiv(N, meta[axis0]), B * H),
        args,
        dict(H=H, N_KEY=n_key, **kw),
        device=q.device,
        dtype=q.dtype,
        bucket=(kw["BLOCK_D"], n_key, kw["HAS_MASK"], kw["VARLEN"]),
        fallback=tiles,
        work=B * H * N * N * q.shape[-1],
        threshold=AUTOTUNE_WORK,
        configs=None if kw["BY_HAND"] else (configs or CONFIGS),
        key=_KEY,
    )


def attention_fwd(q, k, v, mask, cu_seqlens, max_seqlen, scale, scores_mode, out, lse, scores, sink=False) -> None:
    """Same contract as ``torch.ops.lotus_kernels_C.attention_fwd`` (see csrc/bindings.cpp), plus ``sink``:
    "cls" scores come out with the sink rule applied (in the score kernel), and ``cu_seqlens`` may be
    int32 as well as int64 (read as is: no cast)."""
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous() and out.is_contiguous()
    B, H, N, T, D, tiles, kw = _config(q, cu_seqlens, max_seqlen)
    if N == 0 or B == 0:
        return
    cls = scores_mode == 1
    # "cls": the forward stores the first query's raw scores (s0, laid out like lse), one small kernel
    # turns them into final scores (sink included); "received" is computed from lse in PyTorch, in
    # query chunks, and its sink applied by the caller.
    s0 = _backend.new_output(lse.shape, lse) if cls else lse
    cu = cu_seqlens if cu_seqlens is not None else q  # placeholders for pointers a variant never reads
    args = (q, k, v, mask if mask is not None else q, cu, out, lse, s0, N, T, D, scale)
    _launch(
        "attention_fwd",
        _attention_fwd_kernel,
        q,
        N,
        B,
        H,
        tiles,
        "BLOCK_M",
        args,
        dict(HAS_MASK=mask is not None, CLS=cls, **kw),
    )
    if cls:
        _finish_cls_scores(s0, lse, mask, cu_seqlens, scores, B, N, T, H, sink)
    elif scores_mode:
        if cu_seqlens is None:
            scores.copy_(scores_from_lse(q, k, lse, mask, scale, scores_mode))
        else:
            scores.copy_(scores_from_lse_varlen(q, k, lse, cu_seqlens, scale, scores_mode))


def _finish_cls_scores(s0, lse, mask, cu_seqlens, scores, B, N, T, H, sink) -> None:
    """``_cls_scores_kernel``: the final "cls" scores from the first query's raw scores and lse."""
    interpreted = _interpreted()
    cap = CLS_BLOCK or (1024 if interpreted else 256)
    _cls_scores_kernel[(B,)](
        s0,
        lse,
        mask if mask is not None else s0,
        cu_seqlens if cu_seqlens is not None else s0,
        scores,
        N,
        T,
        H,
        HAS_MASK=mask is not None,
        VARLEN=cu_seqlens is not None,
        SINK=bool(sink),
        BLOCK=_pow2(N, 16, cap),
        BLOCK_H=_pow2(H, 1, 64 if interpreted else 16),
    )


# The cls-row kernel's key block (None: 128, 1024 interpreted); tests set 16 to walk several blocks.
CLS_ROW_BLOCK: int | None = None
CLS_ROW_WARPS = 4


def cls_row_scores(q, k, mask, cu_seqlens, max_seqlen, scale, sink, out) -> None:
    """out = the final "cls" scores ([B, N], or [T] packed; sink rule applied when ``sink``) from q's first
    row per sequence and head and k alone, for when the attention output comes from another kernel
    (PyTorch's SDPA): ``_cls_row_kernel`` (B * H programs: raw first-query scores + lse), then
    ``_cls_scores_kernel`` as on the fused path. q, k [B, H, N, D] or packed [T, H, D] (cu_seqlens int64
    or int32, read as is)."""
    assert q.is_contiguous() and k.is_contiguous() and out.is_contiguous()
    if cu_seqlens is not None:
        T, H, D = q.shape
        B, N = cu_seqlens.numel() - 1, max_seqlen
        shape = (H, T)
    else:
        B, H, N, D = q.shape
        T = 0
        shape = (B, H, N)
    if B == 0 or q.numel() == 0 or N == 0:
        return
    s0 = _backend.new_output(shape, out)
    lse = _backend.new_output(shape, out)  # read at each sequence's first query only
    cu = cu_seqlens if cu_seqlens is not None else q
    interpreted = _interpreted()
    _cls_row_kernel[(B * H,)](
        q,
        k,
        mask if mask is not None else q,
        cu,
        s0,
        lse,
        N,
        T,
        D,
        scale,
        H=H,
        HAS_MASK=mask is not None,
        VARLEN=cu_seqlens is not None,
        ACC_DTYPE=_acc_dtype(q.dtype),
        BLOCK_N=_pow2(N, 16, CLS_ROW_BLOCK or (1024 if interpreted else 128)),
        BLOCK_D=_pow2(D, 16, 1 << 16),
        num_warps=CLS_ROW_WARPS,
        num_stages=1 if interpreted else 2,
    )
    _finish_cls_scores(s0, lse, mask, cu_seqlens, out, B, N, T, H, sink)


def cu_seqlens_ok(cu_seqlens, T, max_seqlen) -> torch.Tensor:
    """A 0-d int32 tensor, 1 iff ``cu_seqlens`` is valid for T tokens and ``max_seqlen`` (see
    ``_cu_seqlens_ok_kernel``); for ``torch._assert_async``, without reading it back."""
    ok = torch.empty((), dtype=torch.int32, device=cu_seqlens.device)
    block = 1024 if _interpreted() else 256
    _cu_seqlens_ok_kernel[(1,)](cu_seqlens, ok, cu_seqlens.numel() - 1, T, max_seqlen, BLOCK=block)
    return ok


def attention_bwd(dout, q, k, v, out, lse, mask, cu_seqlens, max_seqlen, scale, dq, dk, dv) -> None:
    """Same contract as ``torch.ops.lotus_kernels_C.attention_bwd`` (see csrc/bindings.cpp)."""
    for t in (dout, q, k, v, out, lse, dq, dk, dv):
        assert t.is_contiguous()
    B, H, N, T, D, tiles, kw = _config(q, cu_seqlens, max_seqlen)
    if N == 0 or B == 0:
        return
    args = (q, k, v, dout, out, lse, mask if mask is not None else q, cu_seqlens if cu_seqlens is not None else q)
    kw = dict(HAS_MASK=mask is not None, **kw)
    if not (_interpreted() or kw["BY_HAND"]):
        tiles = {**tiles, "num_warps": BWD_WARPS}
    _launch(
        "attention_bwd_dkdv",
        _attention_bwd_dkdv_kernel,
        q,
        N,
        B,
        H,
        tiles,
        "BLOCK_N",
        (*args, dk, dv, N, T, D, scale),
        kw,
        BWD_CONFIGS,
    )
    _launch(
        "attention_bwd_dq",
        _attention_bwd_dq_kernel,
        q,
        N,
        B,
        H,
        tiles,
        "BLOCK_M",
        (*args, dq, N, T, D, scale),
        kw,
        BWD_CONFIGS,
    )


def scores_from_lse(q, k, lse, mask, scale, mode, chunk: int = 128) -> torch.Tensor:
    """[B, N] raw scores (before the sink rule) from the forward's lse, never materialising N x N
    for more than ``chunk`` queries at a time."""
    acc = lse.dtype
    kf = k.to(acc)
    if mode == 1:
        p = torch.exp((q[:, :, :1].to(acc) @ kf.transpose(-2, -1)) * scale - lse[:, :, :1, None])[:, :, 0]
        if mask is not None:
            p = p.masked_fill(mask[:, None, :], 0.0)
        return p.mean(1)
    B, H, N, _ = q.shape
    total = torch.zeros(B, H, N, dtype=acc, device=q.device)
    valid_q = None if mask is None else (~mask).to(acc)
    for i0 in range(0, N, chunk):
        p = torch.exp(
            (q[:, :, i0 : i0 + chunk].to(acc) @ kf.transpose(-2, -1)) * scale - lse[:, :, i0 : i0 + chunk, None]
        )
        if valid_q is not None:
            p = p * valid_q[:, None, i0 : i0 + chunk, None]
        total += p.sum(2)
    if mask is None:
        return total.mean(1) / N
    total = total.masked_fill(mask[:, None, :], 0.0)
    return total.mean(1) / valid_q.sum(1).clamp_min(1)[:, None]


def scores_from_lse_varlen(q, k, lse, cu_seqlens, scale, mode) -> torch.Tensor:
    """[T] raw scores of packed sequences (q, k [T, H, D], lse [H, T])."""
    acc = lse.dtype
    lens = cu_seqlens.diff()
    first = torch.repeat_interleave(cu_seqlens[:-1], lens)  # each token's sequence start
    if mode == 1:  # O(T * H * D): each token's key against its sequence's first query
        dots = (q[first].to(acc) * k.to(acc)).sum(-1) * scale  # [T, H]
        return torch.exp(dots - lse[:, first].T).mean(1)
    out = torch.empty(q.shape[0], dtype=acc, device=q.device)
    for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        if e > s:
            seq = lambda x: x[s:e].transpose(0, 1).unsqueeze(0)  # noqa: E731
            out[s:e] = scores_from_lse(seq(q), seq(k), lse[None, :, s:e], None, scale, mode)[0]
    return out

"""Triton kernels for ``gather_tokens`` / ``scatter_tokens`` (semantics: ``lotus_kernels.ops.token_gather``).

Launchers take contiguous tensors and a caller-allocated ``out`` (possibly NaN-poisoned) that they
write completely.

* gather: a 2-D grid of (blocks of rows m = b*K + k, blocks of channels); each program copies
  ``x[b, idx[b, k], cblock]`` for its rows.
* scatter: deterministic, no atomics. One program per (b, channel block) owns the slab
  ``out[b, :, cblock]`` (under the interpreter, one program per several images: fewer programs
  run faster there): it zeroes the slab, then walks k = 0..K-1 in chunks of BLOCK_K, in order.
  Within a chunk the rows that share a token are summed (a 0/1 equality matrix times the rows, in
  fp32, fp64 for float64) and only the first of them read-modify-writes ``out[b, token, cblock]``,
  so a chunk's writes never collide and duplicates accumulate in a fixed order. Partial sums are
  stored in the output dtype between chunks (for bf16/fp16, rounded once per chunk).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _acc_dtype, _add_distinct_rows, _bf16_by_hand, _gather_blocks, _scatter_blocks


# ---------------------------------------------------------------- gather
@triton.jit
def _gather_tokens_kernel(x_ptr, idx_ptr, out_ptr, M, K, N, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # m = b*K + k
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < M
    mask = rmask[:, None] & (cols < C)[None, :]
    tok = tl.load(idx_ptr + rows, mask=rmask, other=0)
    src_row = ((rows // K) * N + tok) * C
    vals = tl.load(x_ptr + src_row[:, None] + cols[None, :], mask=mask)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], vals, mask=mask)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
    """out[b, k] = x[b, idx[b, k]]: x [B, N, C], idx [B, K] int64, out [B, K, C]."""
    B, N, C = x.shape
    K = idx.shape[1]
    M = B * K
    assert x.is_contiguous() and idx.is_contiguous() and out.is_contiguous()
    assert out.shape == (B, K, C) and out.dtype == x.dtype and idx.dtype == torch.int64
    if M == 0 or C == 0:
        return
    BLOCK_R, BLOCK_C = _gather_blocks(M, C)
    grid = (triton.cdiv(M, BLOCK_R), triton.cdiv(C, BLOCK_C))
    _gather_tokens_kernel[grid](x, idx, out, M, K, N, C, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=4)


# ---------------------------------------------------------------- scatter (deterministic)
@triton.jit
def _scatter_tokens_kernel(
    src_ptr,
    idx_ptr,
    out_ptr,
    B,
    K,
    N,
    C,
    G,
    ACC_DTYPE: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (g, j) owns images g*G .. g*G + G - 1 (G = 1 on a GPU) and channel block j."""
    g0 = tl.program_id(0).to(tl.int64) * G
    nb = tl.minimum(B - g0, G)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    out_g = out_ptr + g0 * N * C  # out rows of the program's images: b_local * N + token
    # 1) zero this program's slab out[g0:g0+nb, :, cblock] (no other program touches it)
    zero = tl.zeros([BLOCK_R, BLOCK_C], dtype=out_ptr.dtype.element_ty)
    for r0 in range(0, nb * N, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        tl.store(out_g + rows[:, None] * C + cols[None, :], zero, mask=(rows < nb * N)[:, None] & cmask[None, :])
    # the zeroes and the read-modify-writes below may be spread over threads differently
    tl.debug_barrier()
    # 2) chunks of BLOCK_K rows of src, in order, each added by _add_distinct_rows; the loads
    #    stay inline (this kernel's addressing; a helper call costs ~1 ms under the interpreter)
    src_g = src_ptr + g0 * K * C
    idx_g = idx_ptr + g0 * K
    js = tl.arange(0, BLOCK_K)
    for k0 in range(0, nb * K, BLOCK_K):
        ks = k0 + js  # b_local * K + k
        kmask = ks < nb * K
        tok = tl.load(idx_g + ks, mask=kmask, other=0)
        dst = tl.where(kmask, (ks // K) * N + tok, -1)
        v = tl.load(src_g + ks[:, None] * C + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0).to(
            ACC_DTYPE
        )
        _add_distinct_rows(out_g + cols, dst, C, dst, v, js, kmask, cmask, ACC_DTYPE, BF16_BY_HAND)
        tl.debug_barrier()  # these stores are visible to the next chunk's loads, whatever the layout


def scatter_tokens(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
    """out[b, m] = sum of src[b, k] with idx[b, k] == m (zero if none): src [B, K, C], out [B, N, C]."""
    B, K, C = src.shape
    N = out.shape[1]
    assert src.is_contiguous() and idx.is_contiguous() and out.is_contiguous()
    assert out.shape == (B, N, C) and out.dtype == src.dtype and idx.shape == (B, K)
    assert idx.dtype == torch.int64
    if out.numel() == 0:
        return
    G, BLOCK_R, BLOCK_K, BLOCK_C = _scatter_blocks(B, N, K, C)
    grid = (triton.cdiv(B, G), triton.cdiv(C, BLOCK_C))
    # num_stages=1: no software pipelining, so no out-row load is hoisted above the previous stores
    _scatter_tokens_kernel[grid](
        src,
        idx,
        out,
        B,
        K,
        N,
        C,
        G,
        ACC_DTYPE=_acc_dtype(src.dtype),
        BF16_BY_HAND=_bf16_by_hand(src.dtype),
        BLOCK_R=BLOCK_R,
        BLOCK_K=BLOCK_K,
        BLOCK_C=BLOCK_C,
        num_warps=4,
        num_stages=1,
    )

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

import os

import torch
import triton
import triton.language as tl


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _bf16_by_hand(dtype: torch.dtype) -> bool:
    """The interpreter rounds fp32 -> bf16 toward zero; a GPU rounds to nearest even. Kernels with
    BF16_BY_HAND round by hand instead: fp32 bits + 0x7FFF + (bit 16), keep the top half (NaNs are
    truncated, which keeps them NaN). Written out in each kernel: under the interpreter a call to
    a @triton.jit helper costs milliseconds."""
    return _interpreted() and dtype == torch.bfloat16


# ---------------------------------------------------------------- gather
@triton.jit
def _gather_tokens_kernel(x_ptr, idx_ptr, out_ptr, M, K, N, C,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
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
    if _interpreted():  # few, large programs: the interpreter's cost is per program and per op
        BLOCK_C = _pow2(C, 16, 1024)
        BLOCK_R = _pow2(M, 1, max(1, 16384 // BLOCK_C))
        num_warps = 4
    else:
        BLOCK_C = _pow2(C, 16, 256)
        BLOCK_R = max(1, 2048 // BLOCK_C)
        num_warps = 4
    grid = (triton.cdiv(M, BLOCK_R), triton.cdiv(C, BLOCK_C))
    _gather_tokens_kernel[grid](x, idx, out, M, K, N, C,
                                BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=num_warps)


# ---------------------------------------------------------------- scatter (deterministic)
@triton.jit
def _scatter_tokens_kernel(src_ptr, idx_ptr, out_ptr, B, K, N, C, G,
                           ACC_DTYPE: tl.constexpr, BF16_BY_HAND: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
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
        tl.store(out_g + rows[:, None] * C + cols[None, :], zero,
                 mask=(rows < nb * N)[:, None] & cmask[None, :])
    # the zeroes and the read-modify-writes below may be spread over threads differently
    tl.debug_barrier()
    # 2) chunks of BLOCK_K rows of src, in order: sum the rows of a chunk that go to one out row
    #    (equality matrix @ rows, exact 0/1 weights, ACC_DTYPE accumulation), then let the first
    #    of them add that sum to its out row: distinct rows, so a chunk's writes never collide.
    src_g = src_ptr + g0 * K * C
    idx_g = idx_ptr + g0 * K
    js = tl.arange(0, BLOCK_K)
    for k0 in range(0, nb * K, BLOCK_K):
        ks = k0 + js  # b_local * K + k
        kmask = ks < nb * K
        tok = tl.load(idx_g + ks, mask=kmask, other=0)
        dst = tl.where(kmask, (ks // K) * N + tok, -1)
        v = tl.load(src_g + ks[:, None] * C + cols[None, :], mask=kmask[:, None] & cmask[None, :],
                    other=0).to(ACC_DTYPE)
        same = dst[:, None] == dst[None, :]
        sums = tl.dot(same.to(ACC_DTYPE), v, input_precision="ieee", out_dtype=ACC_DTYPE)
        earlier = tl.sum((same & (js[None, :] < js[:, None])).to(tl.int32), axis=1)
        write = kmask & (earlier == 0)
        ptrs = out_g + tl.where(write, dst, 0)[:, None] * C + cols[None, :]
        wmask = write[:, None] & cmask[None, :]
        acc = tl.load(ptrs, mask=wmask, other=0, cache_modifier=".cg").to(ACC_DTYPE)
        acc += sums
        if BF16_BY_HAND:  # round to nearest even like a GPU; the interpreter's cast truncates
            bits = acc.to(tl.uint32, bitcast=True)
            bits = tl.where(acc == acc, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16, bits >> 16)
            tl.store(ptrs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=wmask)
        else:
            tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=wmask)
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
    if _interpreted():  # one program for as many images as fit: the cost is per program and op
        G = max(1, min(B, 4096 // max(N, K, 1)))
        BLOCK_C = _pow2(C, 16, 1024)
        BLOCK_R = _pow2(G * N, 1, max(1, 16384 // BLOCK_C))
        BLOCK_K = _pow2(G * K, 16, 128)
    else:
        G = 1
        BLOCK_C = _pow2(C, 32, 128)
        BLOCK_R = max(1, 2048 // BLOCK_C)
        BLOCK_K = 32
    grid = (triton.cdiv(B, G), triton.cdiv(C, BLOCK_C))
    # num_stages=1: no software pipelining, so no out-row load is hoisted above the previous stores
    _scatter_tokens_kernel[grid](src, idx, out, B, K, N, C, G, ACC_DTYPE=_acc_dtype(src.dtype),
                                 BF16_BY_HAND=_bf16_by_hand(src.dtype),
                                 BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_C=BLOCK_C,
                                 num_warps=4, num_stages=1)

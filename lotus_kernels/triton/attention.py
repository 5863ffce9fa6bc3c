"""Triton forward kernel for ``ops.attention`` (semantics: ``lotus_kernels.ops.attention``).

Flash-style: one program per (block of BLOCK_M queries, b*H + h) walks the keys in blocks of
BLOCK_N with an online softmax in fp32 (fp64 for float64), and writes ``out`` and ``lse``
(+inf for a query that sees no unpadded key, whose out is 0). The head dim is padded to a power of
two >= 16 (``tl.dot``'s minimum) with masked loads. Under the interpreter bf16/fp16 tiles are
upcast to fp32 before ``tl.dot`` (its numpy dot mishandles bf16 operands: errors of 1e8 otherwise). There is no Triton backward yet: the op's
backward runs the PyTorch formula from the saved lse, and the scores are computed from lse in
PyTorch (``scores_from_lse``), O(B*H*N*D) for "cls" and in query chunks for "received".
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _attention_fwd_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr, N, D, scale,
                          HAS_MASK: tl.constexpr, ACC_DTYPE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, H):
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    base = bh * N * D
    rmask = rows < N
    dmask = dims < D
    q = tl.load(q_ptr + base + rows[:, None] * D + dims[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(ACC_DTYPE)
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    l_i = tl.zeros((BLOCK_M,), ACC_DTYPE)
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC_DTYPE)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        kv_mask = cmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + base + cols[:, None] * D + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + base + cols[:, None] * D + dims[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(ACC_DTYPE)
            v = v.to(ACC_DTYPE)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=ACC_DTYPE) * scale
        else:
            s = tl.dot(q, tl.trans(k), out_dtype=ACC_DTYPE) * scale
        valid = cmask
        if HAS_MASK:
            padded = tl.load(mask_ptr + b * N + cols, mask=cmask, other=1)
            valid = valid & (padded == 0)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no unpadded key yet: keep exps at 0, not NaN
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee", out_dtype=ACC_DTYPE)
        else:
            pv = tl.dot(p.to(v.dtype), v, out_dtype=ACC_DTYPE)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    empty = l_i == 0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(out_ptr + base + rows[:, None] * D + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(lse_ptr + bh * N + rows, lse, mask=rmask)


def attention_fwd(q, k, v, mask, scale, scores_mode, out, lse, scores) -> None:
    """Same contract as ``torch.ops.lotus_kernels_C.attention_fwd`` (see csrc/bindings.cpp)."""
    B, H, N, D = q.shape
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous() and out.is_contiguous()
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    # Under the interpreter the cost is per program and per op: few, large blocks.
    cap = 128 if interpreted else 64
    block = max(16, min(cap, triton.next_power_of_2(N)))
    block_d = max(16, triton.next_power_of_2(D))
    acc = tl.float64 if q.dtype == torch.float64 else tl.float32
    grid = (triton.cdiv(N, block), B * H)
    _attention_fwd_kernel[grid](q, k, v, mask if mask is not None else q, out, lse, N, D, scale,
                                HAS_MASK=mask is not None, ACC_DTYPE=acc,
                                IEEE=q.dtype in (torch.float32, torch.float64) or interpreted,
                                UPCAST=interpreted and q.dtype in (torch.bfloat16, torch.float16),
                                BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, H=H)
    if scores_mode:
        scores.copy_(scores_from_lse(q, k, lse, mask, scale, scores_mode))


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
        p = torch.exp((q[:, :, i0:i0 + chunk].to(acc) @ kf.transpose(-2, -1)) * scale - lse[:, :, i0:i0 + chunk, None])
        if valid_q is not None:
            p = p * valid_q[:, None, i0:i0 + chunk, None]
        total += p.sum(2)
    if mask is None:
        return total.mean(1) / N
    total = total.masked_fill(mask[:, None, :], 0.0)
    return total.mean(1) / valid_q.sum(1).clamp_min(1)[:, None]

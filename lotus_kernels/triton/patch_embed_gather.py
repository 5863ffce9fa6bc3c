"""Triton kernels for ``im2col_gather``, ``col2im_scatter`` and the fused ``patch_embed_gather``
(semantics: ``lotus_kernels.ops.patch_embed_gather``).

Geometry: images [B, Cin, H, W], patch (ph, pw), grid GH x GW = (H/ph) x (W/pw) patches in row-major
order, L = Cin*ph*pw columns per patch in Conv2d weight order (c, dy, dx). Kept patch p = idx[b, k]
covers pixels (p // GW * ph + dy, p % GW * pw + dx), so the column l of row m = b*K + k lives at
images offset ``patch_base(b, p) + patch_inner(l)`` and is never materialised by the fused kernel.

Launchers take contiguous tensors and a caller-allocated ``out`` (possibly NaN-poisoned) that they
write completely. ``col2im_scatter`` is deterministic (no atomics): one program per (b, column
block) (several images per program under the interpreter) zeroes the pixels it owns, then adds
the kept patches in order k = 0..K-1, in chunks whose rows that share a patch are summed first
(as ``scatter_tokens`` does, see its module).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _configs
from ._common import (
    _acc_dtype,
    _add_distinct_rows,
    _bf16_by_hand,
    _dot_in_acc_dtype,
    _dot_precision,
    _gather_blocks,
    _interpreted,
    _pow2,
    _scatter_blocks,
    _store_bf16_rne,
)

# The fused kernel's tiles on a GPU (one config: the embedding is ~1% of a ViT step).
GPU_TILES = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)

# Address arithmetic, written out in each kernel (a call to a @triton.jit helper costs
# milliseconds under the interpreter):
#   patch base   = b * CHW + (tok // GW) * (PH * W) + (tok % GW) * PW     pixel (0, 0, 0) of patch tok
#   column inner = (l // (PH*PW)) * HW + (l % (PH*PW) // PW) * W + l % PW  (c, dy, dx) of column l


# ---------------------------------------------------------------- im2col_gather
@triton.jit
def _im2col_gather_kernel(
    img_ptr,
    idx_ptr,
    out_ptr,
    M,
    K,
    L,
    CHW,
    HW,
    W,
    GW,
    PH: tl.constexpr,
    PW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # m = b*K + k
    cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    rmask = rows < M
    mask = rmask[:, None] & (cols < L)[None, :]
    tok = tl.load(idx_ptr + rows, mask=rmask, other=0)
    base = (rows // K) * CHW + (tok // GW) * (PH * W) + (tok % GW) * PW
    r = cols % (PH * PW)
    inner = (cols // (PH * PW)) * HW + (r // PW) * W + r % PW
    vals = tl.load(img_ptr + base[:, None] + inner[None, :], mask=mask)
    tl.store(out_ptr + rows[:, None] * L + cols[None, :], vals, mask=mask)


def im2col_gather(images: torch.Tensor, idx: torch.Tensor, ph: int, pw: int, out: torch.Tensor) -> None:
    """out[b, k] = the kept patch idx[b, k] of images[b], flattened (c, dy, dx): out [B, K, Cin*ph*pw]."""
    B, Cin, H, W = images.shape
    K = idx.shape[1]
    L, M = Cin * ph * pw, B * K
    assert images.is_contiguous() and idx.is_contiguous() and out.is_contiguous()
    assert out.shape == (B, K, L) and out.dtype == images.dtype and idx.dtype == torch.int64
    assert H % ph == 0 and W % pw == 0
    if out.numel() == 0:
        return
    BLOCK_R, BLOCK_L = _gather_blocks(M, L)
    grid = (triton.cdiv(M, BLOCK_R), triton.cdiv(L, BLOCK_L))
    _im2col_gather_kernel[grid](
        images,
        idx,
        out,
        M,
        K,
        L,
        Cin * H * W,
        H * W,
        W,
        W // pw,
        PH=ph,
        PW=pw,
        BLOCK_R=BLOCK_R,
        BLOCK_L=BLOCK_L,
        num_warps=4,
    )


# ---------------------------------------------------------------- col2im_scatter (deterministic)
@triton.jit
def _col2im_scatter_kernel(
    cols_ptr,
    idx_ptr,
    out_ptr,
    B,
    K,
    L,
    NP,
    CHW,
    HW,
    W,
    GW,
    G,
    PH: tl.constexpr,
    PW: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Program (g, j) owns images g*G .. g*G + G - 1 (G = 1 on a GPU) and column block j."""
    g0 = tl.program_id(0).to(tl.int64) * G
    nb = tl.minimum(B - g0, G)
    ls = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    lmask = ls < L
    r = ls % (PH * PW)
    inner = (ls // (PH * PW)) * HW + (r // PW) * W + r % PW
    out_g = out_ptr + g0 * CHW + inner  # column ls of the patch at the origin of image g0
    # 1) zero the pixels this program owns: columns ls of every patch of its images. Patches tile
    #    an image without overlap, so the programs of an image own disjoint pixel sets covering it.
    zero = tl.zeros([BLOCK_R, BLOCK_L], dtype=out_ptr.dtype.element_ty)
    for p0 in range(0, nb * NP, BLOCK_R):
        ps = p0 + tl.arange(0, BLOCK_R)  # b_local * NP + patch
        pp = ps % NP
        poff = (ps // NP) * CHW + (pp // GW) * (PH * W) + (pp % GW) * PW
        tl.store(out_g[None, :] + poff[:, None], zero, mask=(ps < nb * NP)[:, None] & lmask[None, :])
    tl.debug_barrier()
    # 2) chunks of BLOCK_K kept patches, in order, each added by _add_distinct_rows; the loads
    #    stay inline (this kernel's addressing; a helper call costs ~1 ms under the interpreter)
    cols_g = cols_ptr + g0 * K * L
    idx_g = idx_ptr + g0 * K
    js = tl.arange(0, BLOCK_K)
    for k0 in range(0, nb * K, BLOCK_K):
        ks = k0 + js  # b_local * K + k
        kmask = ks < nb * K
        tok = tl.load(idx_g + ks, mask=kmask, other=0)
        bl = ks // K
        dst = tl.where(kmask, bl * NP + tok, -1)
        v = tl.load(cols_g + ks[:, None] * L + ls[None, :], mask=kmask[:, None] & lmask[None, :], other=0).to(ACC_DTYPE)
        poff = bl * CHW + (tok // GW) * (PH * W) + (tok % GW) * PW
        _add_distinct_rows(out_g, poff, 1, dst, v, js, kmask, lmask, ACC_DTYPE, BF16_BY_HAND)
        tl.debug_barrier()  # these stores are visible to the next chunk's loads, whatever the layout


def col2im_scatter(cols: torch.Tensor, idx: torch.Tensor, ph: int, pw: int, out: torch.Tensor) -> None:
    """Adjoint of ``im2col_gather``: cols [B, K, Cin*ph*pw] summed into zeros out [B, Cin, H, W]."""
    B, K, L = cols.shape
    _, Cin, H, W = out.shape
    assert cols.is_contiguous() and idx.is_contiguous() and out.is_contiguous()
    assert L == Cin * ph * pw and out.shape[0] == B and out.dtype == cols.dtype
    assert idx.shape == (B, K) and idx.dtype == torch.int64 and H % ph == 0 and W % pw == 0
    if out.numel() == 0:
        return
    NP = (H // ph) * (W // pw)
    G, BLOCK_R, BLOCK_K, BLOCK_L = _scatter_blocks(B, NP, K, L)
    grid = (triton.cdiv(B, G), triton.cdiv(L, BLOCK_L))
    # num_stages=1: no software pipelining, so no pixel load is hoisted above the previous stores
    _col2im_scatter_kernel[grid](
        cols,
        idx,
        out,
        B,
        K,
        L,
        NP,
        Cin * H * W,
        H * W,
        W,
        W // pw,
        G,
        PH=ph,
        PW=pw,
        ACC_DTYPE=_acc_dtype(cols.dtype),
        BF16_BY_HAND=_bf16_by_hand(cols.dtype),
        BLOCK_R=BLOCK_R,
        BLOCK_K=BLOCK_K,
        BLOCK_L=BLOCK_L,
        num_warps=4,
        num_stages=1,
    )


# ---------------------------------------------------------------- fused patch_embed_gather
@triton.jit
def _patch_embed_gather_kernel(
    img_ptr,
    idx_ptr,
    w_ptr,
    bias_ptr,
    pos_ptr,
    out_ptr,
    M,
    K,
    D,
    L,
    CHW,
    HW,
    W,
    GW,
    PH: tl.constexpr,
    PW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_ACC_DTYPE: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[m, n] = sum_l A[m, l] * Wt[l, n] (+ bias[n]) (+ pos[idx[m], n]), A = im2col of kept
    patches read straight from the images, Wt = weight viewed [D, L], transposed."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(D, BLOCK_N)
    pid_m = pid // num_n  # consecutive programs share one block of rows (its image reads hit L2)
    pid_n = pid % num_n
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # m = b*K + k
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    nmask = ns < D
    tok = tl.load(idx_ptr + rows, mask=rmask, other=0)
    a_base = (rows // K) * CHW + (tok // GW) * (PH * W) + (tok % GW) * PW
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    for l0 in range(0, L, BLOCK_K):
        ls = l0 + tl.arange(0, BLOCK_K)
        lmask = ls < L
        r = ls % (PH * PW)
        inner = (ls // (PH * PW)) * HW + (r // PW) * W + r % PW
        a = tl.load(img_ptr + a_base[:, None] + inner[None, :], mask=rmask[:, None] & lmask[None, :], other=0)
        w = tl.load(w_ptr + ns[None, :].to(tl.int64) * L + ls[:, None], mask=lmask[:, None] & nmask[None, :], other=0)
        if DOT_IN_ACC_DTYPE:  # exact: a product of two bf16 values fits in fp32
            a = a.to(ACC_DTYPE)
            w = w.to(ACC_DTYPE)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ns, mask=nmask, other=0).to(ACC_DTYPE)[None, :]
    mask = rmask[:, None] & nmask[None, :]
    if HAS_POS:
        acc += tl.load(pos_ptr + tok[:, None] * D + ns[None, :], mask=mask, other=0).to(ACC_DTYPE)
    out_ptrs = out_ptr + rows[:, None] * D + ns[None, :]
    if BF16_BY_HAND:  # round to nearest even like a GPU; the interpreter's cast truncates
        _store_bf16_rne(out_ptrs, acc, mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def patch_embed_gather(
    images: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """out[b, k] = im2col(images[b])[idx[b, k]] @ weight.view(D, -1).T (+ bias) (+ pos[idx[b, k]]).

    images [B, Cin, H, W], idx [B, K] int64, weight [D, Cin, ph, pw], bias [D] or None,
    pos [GH*GW, D] or None, out [B, K, D]; all float tensors share one dtype. Accumulates in fp32
    (fp64 for float64) and rounds once, after the bias and positional rows are added."""
    B, Cin, H, W = images.shape
    D, wc, ph, pw = weight.shape
    K = idx.shape[1]
    L, M, NP = Cin * ph * pw, B * K, (H // ph) * (W // pw)
    assert wc == Cin and H % ph == 0 and W % pw == 0
    assert images.is_contiguous() and idx.is_contiguous() and weight.is_contiguous() and out.is_contiguous()
    assert idx.dtype == torch.int64 and out.shape == (B, K, D)
    assert weight.dtype == images.dtype == out.dtype
    if bias is not None:
        assert bias.is_contiguous() and bias.shape == (D,) and bias.dtype == images.dtype
    if pos is not None:
        assert pos.is_contiguous() and pos.shape == (NP, D) and pos.dtype == images.dtype
    if out.numel() == 0:
        return
    if _interpreted():  # large tiles: the interpreter's cost is per program and per op
        tiles = dict(
            BLOCK_M=_pow2(M, 16, 128), BLOCK_N=_pow2(D, 16, 128), BLOCK_K=_pow2(L, 16, 256), num_warps=4, num_stages=1
        )
    else:
        tiles = GPU_TILES
    args = (
        images,
        idx,
        weight,
        bias if bias is not None else out,  # out: a placeholder pointer, unread
        pos if pos is not None else out,
        out,
        M,
        K,
        D,
        L,
        Cin * H * W,
        H * W,
        W,
        W // pw,
    )
    const = dict(
        PH=ph,
        PW=pw,
        HAS_BIAS=bias is not None,
        HAS_POS=pos is not None,
        ACC_DTYPE=_acc_dtype(images.dtype),
        INPUT_PRECISION=_dot_precision(images.dtype),
        # the interpreter's tl.dot multiplies bf16 operands' raw bits: upcast them there
        DOT_IN_ACC_DTYPE=_dot_in_acc_dtype(images.dtype),
        BF16_BY_HAND=_bf16_by_hand(images.dtype),
    )
    # the package's launch policy: a committed table entry if there is one, else these tiles (no autotune list)
    _configs.launch(
        "patch_embed_gather",
        _patch_embed_gather_kernel,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(D, meta["BLOCK_N"]),),
        args,
        const,
        device=images.device,
        dtype=images.dtype,
        bucket=_configs.bucket(M, D, L),
        fallback=tiles,
    )

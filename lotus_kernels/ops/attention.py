"""``attention``: softmax attention that can also emit per-patch scores from the same pass.

attention(q, k, v) -> out                                  q, k, v [B, H, N, D]
attention(q, k, v, return_scores="cls") -> (out, scores)   scores[b, j] = P[b, :, 0, j] averaged over heads
attention(..., return_scores="received")                   scores[b, j] = P[b, :, i, j] averaged over heads
                                                           and over unpadded queries i
attention(q, k, v, cu_seqlens=cu)                          packed varlen: q, k, v [T, H, D], sequence b is
                                                           tokens cu[b] .. cu[b+1] and attends only within
                                                           itself; scores come back per token, [T]

P = softmax(scale * q k^T) with padded keys (``key_padding_mask`` True) excluded. Scores are what
token-dropping methods rank patches by; computing them inside the kernel avoids materialising the
[B, H, N, N] attention map that the explicit-softmax path needs just to read one row or column sums.

Conventions:
  * a query whose keys are all padded (a fully padded image) gets out = 0, not NaN, and zero
    gradients; its lse is +inf. Padded *queries* still attend to the unpadded keys (as in
    ``nn.MultiheadAttention``); only ``received`` skips them when averaging.
  * scores are float32 (float64 for float64 inputs), carry no gradient, and are 0 at padded keys.
  * ``sink="mean"`` replaces scores[:, 0] (the class token / attention sink) by the mean of
    scores[:, 1:] over unpadded keys (0 when there are none; left 0 if key 0 is padded). It only
    touches the scores, never ``out``. ``sink=None`` leaves scores[:, 0] as computed.
  * packed varlen (``cu_seqlens`` [B + 1], int64 or int32, 0 = cu[0] <= cu[1] <= ... <= cu[B] = T):
    every rule above holds per sequence ("cls" is each sequence's first token's attention, the
    sink is each sequence's first token); empty sequences are allowed and contribute no tokens.
    It excludes ``key_padding_mask`` (packing needs no padding). lse is [H, T] there.
  * lse (saved for the backward) is float32, float64 for float64 inputs (float32 lse would cap a
    float64 backward at ~1e-7 relative accuracy).

The backward is flash-style: P is recomputed from q, k and lse, dS = P * (dP - rowsum(dO * O)).
Backends: reference (PyTorch; varlen by a loop over sequences), cpu (C++ forward + backward; the sink
rule in PyTorch after it), triton (forward + backward kernels; "cls" scores, sink included, from one
small kernel after the forward; "received" in PyTorch from the saved lse). Padded and packed
inputs go through the same kernels, which walk (sequence, head) pairs at per-sequence offsets and
row strides. There is no CUDA C++ kernel yet: CUDA tensors default to triton (else the reference),
and forcing the cuda backend raises NotImplementedError.

Where the output comes from (``DEFAULT_PATH``, per device type; ``LOTUS_KERNELS_ATTENTION_PATH``
forces one): "fused" is the backend's own kernel above, which emits the scores from its pass; "sdpa"
takes ``out`` (and its backward) from PyTorch's ``scaled_dot_product_attention`` (flash / cuDNN /
memory-efficient, whichever torch picks; packed sequences through ``torch.nn.attention.varlen`` where
torch has it, for bf16 / fp16 on CUDA, else the fused kernel) and the "cls" scores from one small kernel
over each sequence's first query row (Triton on a GPU: ``triton.attention.cls_row_scores``; PyTorch
ops on the CPU backend), sink rule included. "received" scores always take the fused kernel (they need
every query's lse). The choice is the measured faster one: see ``DEFAULT_PATH``.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .. import _backend, _checks

SCORE_MODES = {None: 0, "cls": 1, "received": 2}
SINKS = (None, "mean")
ENV_PATH = "LOTUS_KERNELS_ATTENTION_PATH"
PATHS = ("sdpa", "fused")
# Where the attention output comes from, per device type (module docstring). CUDA: "sdpa": torch's
# flash / cuDNN kernels are tuned per GPU generation, and the cls-row kernel reads K once more
# (predicted 1.1-1.25x SDPA at ViT-B / batch 64, docs/design/gpu_kernels.md; our fused Triton kernel has
# SDPA's roofline but not its tuning): `make gpu-check` times both ("attention" section); change it from
# that measurement. CPU: "fused" (benchmarks/results/attention.md: fused + cls scores vs SDPA + the cls
# row in PyTorch, ViT-S, 1 thread).
DEFAULT_PATH = {"cuda": "sdpa", "cpu": "fused"}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- reference (ground truth)
def _safe_mask(key_padding_mask):
    """(attend mask [B,1,1,N] for SDPA, fully padded images [B]): a fully padded image attends to
    everything (then zeroed), because SDPA would return NaN for a row with no allowed key."""
    if key_padding_mask is None:
        return None, None
    empty = key_padding_mask.all(1)
    attend = ~key_padding_mask | empty[:, None]
    return attend[:, None, None, :], empty


def attention_probs_reference(q, k, key_padding_mask=None, scale=None) -> torch.Tensor:
    """The explicit [B, H, N, N] attention map in the accumulation dtype (0 for padded keys and for
    every query of a fully padded image)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = _acc_dtype(q.dtype)
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale
    if key_padding_mask is None:
        return s.softmax(-1)
    attend, empty = _safe_mask(key_padding_mask)
    p = s.masked_fill(~attend, float("-inf")).softmax(-1)
    return p.masked_fill(empty[:, None, None, None], 0.0)


def scores_reference(p: torch.Tensor, mode: str, key_padding_mask=None) -> torch.Tensor:
    """[B, N] scores from the [B, H, N, N] attention map ``p`` (before the sink rule)."""
    if mode == "cls":
        return p[:, :, 0, :].mean(1)
    if key_padding_mask is None:
        return p.mean(2).mean(1)
    valid = (~key_padding_mask).to(p.dtype)  # queries to average over
    n = valid.sum(1).clamp_min(1)
    return (p * valid[:, None, :, None]).sum(2).mean(1) / n[:, None]


def apply_sink(scores: torch.Tensor, key_padding_mask=None) -> torch.Tensor:
    """scores[:, 0] := mean of scores[:, 1:] over unpadded keys (0 if none; 0 stays if key 0 is padded)."""
    rest = scores[:, 1:]
    valid = torch.ones_like(rest, dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask[:, 1:]
    n = valid.sum(1)
    mean = torch.where(valid, rest, 0).sum(1) / n.clamp_min(1)
    if key_padding_mask is not None:
        mean = mean.masked_fill(key_padding_mask[:, 0], 0.0)
    return torch.cat([mean[:, None].to(scores.dtype), rest], dim=1)


def attention_reference(q, k, v, *, scale=None, key_padding_mask=None, return_scores=None, sink="mean"):
    """The definition: ``F.scaled_dot_product_attention`` for out, an explicit softmax for scores."""
    attend, empty = _safe_mask(key_padding_mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=scale)
    if empty is not None:
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    if return_scores is None:
        return out
    with torch.no_grad():
        sc = scores_reference(attention_probs_reference(q, k, key_padding_mask, scale), return_scores, key_padding_mask)
        if sink == "mean":
            sc = apply_sink(sc, key_padding_mask)
    return out, sc


def _fwd_reference(q, k, v, mask, scale, mode):
    acc = _acc_dtype(q.dtype)
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale
    if mask is not None:
        s = s.masked_fill(mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    lse = torch.where(torch.isneginf(lse), float("inf"), lse)  # no unpadded key: P = exp(s - inf) = 0
    p = torch.exp(s - lse[..., None])
    out = (p @ v.to(acc)).to(q.dtype)
    mode_name = {1: "cls", 2: "received"}.get(mode)
    scores = scores_reference(p, mode_name, mask) if mode_name else lse.new_empty(0)
    return out, lse, scores


def _bwd_reference(dout, q, k, v, out, lse, mask, scale):
    acc = lse.dtype
    qf, kf, vf, do = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    s = (qf @ kf.transpose(-2, -1)) * scale
    p = torch.exp(s - lse[..., None])
    if mask is not None:
        p = p.masked_fill(mask[:, None, None, :], 0.0)
    dv = p.transpose(-2, -1) @ do
    dp = do @ vf.transpose(-2, -1)
    delta = (do * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    return (ds @ kf).to(q.dtype), (ds.transpose(-2, -1) @ qf).to(q.dtype), dv.to(q.dtype)


def _sequences(cu_seqlens):
    """[(start, end)] of each packed sequence (host ints)."""
    cu = cu_seqlens.tolist()
    return list(zip(cu[:-1], cu[1:]))


def _as_batch(x, s, e):  # tokens s..e of a packed [T, H, D] tensor as a [1, H, n, D] batch
    return x[s:e].transpose(0, 1).unsqueeze(0)


def attention_reference_varlen(q, k, v, cu_seqlens, *, scale=None, return_scores=None, sink="mean"):
    """The varlen definition: ``attention_reference`` on each packed sequence alone, concatenated."""
    outs, scores = [], []
    for s, e in _sequences(cu_seqlens):
        if e == s:
            continue
        r = attention_reference(
            _as_batch(q, s, e),
            _as_batch(k, s, e),
            _as_batch(v, s, e),
            scale=scale,
            return_scores=return_scores,
            sink=sink,
        )
        o, sc = (r, None) if return_scores is None else r
        outs.append(o[0].transpose(0, 1))
        scores.append(sc)
    out = torch.cat(outs) if outs else q * 0
    if return_scores is None:
        return out
    acc = _acc_dtype(q.dtype)
    return out, (torch.cat([sc[0] for sc in scores]) if scores else q.new_zeros(0, dtype=acc))


def apply_sink_varlen(scores: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``apply_sink`` per packed sequence: scores[cu[b]] := mean of the rest of sequence b (0 if it has
    one token); empty sequences have no tokens to touch. Per token, so nothing is read back to the host."""
    lens = cu_seqlens.diff()
    T = scores.shape[0]
    seg = torch.repeat_interleave(torch.arange(len(lens), device=scores.device), lens, output_size=T)
    sums = scores.new_zeros(len(lens)).index_add_(0, seg, scores)
    first = torch.arange(T, device=scores.device) == cu_seqlens[:-1][seg]  # each sequence's first token
    sink = (sums[seg] - scores) / (lens[seg] - 1).clamp_min(1).to(scores.dtype)
    return torch.where(first, sink, scores)


def _fwd_reference_varlen(q, k, v, cu_seqlens, scale, mode):
    T, H, _ = q.shape
    acc = _acc_dtype(q.dtype)
    out = q.new_zeros(q.shape)
    lse = q.new_zeros((H, T), dtype=acc)
    scores = q.new_zeros((T,) if mode else (0,), dtype=acc)
    for s, e in _sequences(cu_seqlens):
        if e == s:
            continue
        o, l, sc = _fwd_reference(_as_batch(q, s, e), _as_batch(k, s, e), _as_batch(v, s, e), None, scale, mode)
        out[s:e] = o[0].transpose(0, 1)
        lse[:, s:e] = l[0]
        if mode:
            scores[s:e] = sc[0]
    return out, lse, scores


def _bwd_reference_varlen(dout, q, k, v, out, lse, cu_seqlens, scale):
    grads = [torch.zeros_like(q) for _ in range(3)]
    for s, e in _sequences(cu_seqlens):
        if e == s:
            continue
        part = _bwd_reference(*(_as_batch(t, s, e) for t in (dout, q, k, v, out)), lse[None, :, s:e], None, scale)
        for g, p in zip(grads, part):
            g[s:e] = p[0].transpose(0, 1)
    return tuple(grads)


# ---------------------------------------------------------------- checks
def _check(q, k, v, scale, key_padding_mask, return_scores, sink, cu_seqlens=None, max_seqlen=None) -> int:
    """Validates every argument; returns the longest packed sequence (0 when not packed)."""
    packed = cu_seqlens is not None
    layout = "[T, H, D] (packed, with cu_seqlens)" if packed else "[B, H, N, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(name, t, dtypes=_checks.FLOAT_DTYPES)
        if t.dim() != (3 if packed else 4):
            raise ValueError(
                f"{name}: expected a {3 if packed else 4}-D tensor {layout}, got "
                f"{t.dim()}-D with shape {tuple(t.shape)}"
            )
    _checks.same_dtype(q=q, k=k, v=v)
    if k.shape != q.shape:
        raise ValueError(f"k: expected shape {tuple(q.shape)} (like q {layout}), got {tuple(k.shape)}")
    if v.shape != q.shape:
        raise ValueError(f"v: expected shape {tuple(q.shape)} (like q {layout}), got {tuple(v.shape)}")
    if packed:
        if q.shape[1] == 0 or q.shape[2] == 0:
            raise ValueError(f"q: expected H >= 1 heads and D >= 1 channels, got shape {tuple(q.shape)}")
    elif q.shape[2] == 0 or q.shape[3] == 0:
        raise ValueError(f"q: expected N >= 1 tokens and D >= 1 channels, got shape {tuple(q.shape)}")
    if key_padding_mask is not None:
        if packed:
            raise ValueError(
                "key_padding_mask: cannot be combined with cu_seqlens (packed sequences need no "
                "padding: drop the padded tokens instead)"
            )
        _checks.tensor("key_padding_mask", key_padding_mask, ndim=2)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"key_padding_mask: expected a bool tensor (True = padded key), got "
                f"{str(key_padding_mask.dtype).replace('torch.', '')}"
            )
        if tuple(key_padding_mask.shape) != (q.shape[0], q.shape[2]):
            raise ValueError(
                f"key_padding_mask: expected shape ({q.shape[0]}, {q.shape[2]}) ([B, N]), "
                f"got {tuple(key_padding_mask.shape)}"
            )
    _checks.same_device(q=q, k=k, v=v, key_padding_mask=key_padding_mask)
    if return_scores not in SCORE_MODES:
        raise ValueError(f"return_scores: expected None, 'cls' or 'received', got {return_scores!r}")
    if sink not in SINKS:
        raise ValueError(f"sink: expected 'mean' or None, got {sink!r}")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}")
    if not packed:
        if max_seqlen is not None:
            raise ValueError("max_seqlen: only meaningful together with cu_seqlens")
        return 0
    return _check_cu_seqlens(cu_seqlens, q, max_seqlen)


def _check_cu_seqlens(cu, q, max_seqlen) -> int:
    """cu_seqlens [B + 1] int64/int32 on q's device, 0 = cu[0] <= ... <= cu[B] = T; returns the
    longest sequence (the kernels' grid). The kernels index memory with these values, so they are
    checked: read on the host where that is free (CPU) or when ``max_seqlen`` is not given (the grid
    needs it: one sync); on a GPU with ``max_seqlen`` given, checked on the device instead (no host
    sync; see ``_checks.index_range``), and ``max_seqlen`` is used as the longest."""
    _checks.tensor("cu_seqlens", cu, ndim=1)
    if cu.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"cu_seqlens: expected dtype int64 or int32, got {str(cu.dtype).replace('torch.', '')}")
    _checks.same_device(q=q, cu_seqlens=cu)
    if cu.numel() == 0:
        raise ValueError("cu_seqlens: expected B + 1 >= 1 offsets (starting at 0), got an empty tensor")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise ValueError(f"max_seqlen: expected a non-negative int (the longest sequence), got {max_seqlen!r}")
    T = q.shape[0]
    if max_seqlen is not None and not _checks.host_reads_are_free(cu.device):
        if _kernel_backend(cu.device) == "triton":  # one small kernel instead of ~10 PyTorch launches
            ok = _backend.triton_kernels("attention").cu_seqlens_ok(_contig(cu), T, max_seqlen)
        else:
            lens = cu.diff()
            ok = (cu[0] == 0) & (cu[-1] == T)
            if lens.numel():
                ok = ok & (lens.min() >= 0) & (lens.max() <= max_seqlen)
        _checks.device_assert(
            ok,
            f"cu_seqlens: expected non-decreasing offsets from 0 to T = {T} with no sequence "
            f"longer than max_seqlen = {max_seqlen} (set {_checks.ENV_SYNC_CHECKS}=1 for the "
            "offending value)",
        )
        return max_seqlen
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"cu_seqlens: expected to start at 0, got cu_seqlens[0] = {vals[0]}")
    for i, (a, b) in enumerate(zip(vals[:-1], vals[1:])):
        if b < a:
            raise ValueError(
                f"cu_seqlens: expected non-decreasing offsets, got cu_seqlens[{i}] = {a} > cu_seqlens[{i + 1}] = {b}"
            )
    if vals[-1] != T:
        raise ValueError(f"cu_seqlens: expected to end at T = {T} (q's token count), got cu_seqlens[-1] = {vals[-1]}")
    longest = max((b - a for a, b in zip(vals[:-1], vals[1:])), default=0)
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"max_seqlen: expected an int >= the longest sequence ({longest}), got {max_seqlen!r}")
    return longest


def _kernel_backend(device: torch.device) -> str:
    return _backend.select(device, "attention")


# ---------------------------------------------------------------- the SDPA path
def _find_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch without it (< 2.10): packed sequences keep the fused kernel
        return None
    return varlen_attn


VARLEN_SDPA = _find_varlen_attn()


def _varlen_sdpa_ok(device_type: str, dtype: torch.dtype) -> bool:
    """torch's varlen attention runs flash / cuDNN: CUDA, bf16 / fp16 only."""
    return VARLEN_SDPA is not None and device_type == "cuda" and dtype in (torch.bfloat16, torch.float16)


def _path(q, backend: str, scores_mode: int, packed: bool) -> str:
    """ "sdpa" or "fused" for these inputs on ``backend`` (module docstring)."""
    return _path_of(backend, q.device.type, q.dtype, scores_mode, packed, packed and q.shape[0] == 0)


@torch.compiler.assume_constant_result  # a Python decision: torch.compile takes its result as a constant
def _path_of(backend: str, device_type: str, dtype: torch.dtype, scores_mode: int, packed: bool, empty: bool) -> str:
    forced = os.environ.get(ENV_PATH)
    if forced is not None and forced not in PATHS:
        raise ValueError(f"{ENV_PATH}: expected one of {', '.join(PATHS)}, got {forced!r}")
    if backend == "reference" or scores_mode == SCORE_MODES["received"]:
        return "fused"
    path = forced or DEFAULT_PATH.get(device_type, "fused")
    if path == "sdpa" and packed and (empty or not _varlen_sdpa_ok(device_type, dtype)):
        return "fused"
    return path


@torch.compiler.assume_constant_result
def _kernel_backend_of(device_type: str, index) -> str:
    return _kernel_backend(torch.device(device_type, index))


def _sdpa_out(q, k, v, scale, key_padding_mask, cu_seqlens, max_seqlen):
    """The attention output (differentiable) from PyTorch's attention kernels, with this op's rules for
    padding (``attention_reference``'s: a fully padded image gets 0)."""
    if cu_seqlens is None:
        attend, empty = _safe_mask(key_padding_mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=scale)
        return out if empty is None else out.masked_fill(empty[:, None, None, None], 0.0)
    cu = cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)
    return VARLEN_SDPA(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale)


def _cls_row_torch(q, k, key_padding_mask, scale, sink):
    """ "cls" scores of padded q, k [B, H, N, D] from the first query row only, in PyTorch ops (the CPU
    backend's cls-row kernel: a [B, H, 1, N] product and a softmax)."""
    acc = _acc_dtype(q.dtype)
    s = (q[:, :, :1].to(acc) @ k.to(acc).transpose(-2, -1))[:, :, 0] * scale  # [B, H, N]
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, :], float("-inf"))
    p = torch.softmax(s, -1)
    if key_padding_mask is not None:  # a fully padded image: 0, not NaN
        p = p.nan_to_num(0.0)
    scores = p.mean(1)
    return apply_sink(scores, key_padding_mask) if sink else scores


@torch.library.custom_op("lotus_kernels::attention_cls_scores", mutates_args=())
def _cls_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    scale: float,
    sink: bool,
) -> torch.Tensor:
    """Final "cls" scores (sink rule applied when ``sink``) from q's first row and k: the score half of
    the "sdpa" path."""
    backend = _kernel_backend(q.device)
    scores_shape = _shapes(q, cu_seqlens is not None, 1)[1]
    if backend == "triton":
        scores = _backend.new_output(scores_shape, q, _acc_dtype(q.dtype))
        _backend.triton_kernels("attention").cls_row_scores(
            q.contiguous(),
            k.contiguous(),
            _contig(key_padding_mask),
            _contig(cu_seqlens),
            max_seqlen,
            scale,
            sink,
            scores,
        )
        return scores
    assert cu_seqlens is None, "packed sequences take the fused path off CUDA"
    return _cls_row_torch(q, k, key_padding_mask, scale, sink)


@_cls_scores.register_fake
def _(q, k, key_padding_mask, cu_seqlens, max_seqlen, scale, sink):
    return q.new_empty(_shapes(q, cu_seqlens is not None, 1)[1], dtype=_acc_dtype(q.dtype))


# ---------------------------------------------------------------- registered ops
def _shapes(q, packed: bool, scores_mode: int):
    """(lse shape, scores shape) for q [B, H, N, D] or packed [T, H, D]."""
    if packed:
        T, H, _ = q.shape
        return (H, T), ((T,) if scores_mode else (0,))
    B, H, N, _ = q.shape
    return (B, H, N), ((B, N) if scores_mode else (0,))


def _contig(t):
    return None if t is None else t.contiguous()


def _apply_sink_any(scores, key_padding_mask, cu_seqlens):
    return apply_sink(scores, key_padding_mask) if cu_seqlens is None else apply_sink_varlen(scores, cu_seqlens)


@torch.library.custom_op("lotus_kernels::attention_fwd", mutates_args=())
def _attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    scale: float,
    scores_mode: int,
    sink: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, scores): scores final (the sink rule applied when ``sink``)."""
    backend = _kernel_backend(q.device)
    packed = cu_seqlens is not None
    if backend == "reference":
        if packed:
            out, lse, scores = _fwd_reference_varlen(q, k, v, cu_seqlens, scale, scores_mode)
        else:
            out, lse, scores = _fwd_reference(q, k, v, key_padding_mask, scale, scores_mode)
        if sink and scores_mode:
            scores = _apply_sink_any(scores, key_padding_mask, cu_seqlens)
        return out, lse, scores
    acc = _acc_dtype(q.dtype)
    lse_shape, scores_shape = _shapes(q, packed, scores_mode)
    out = _backend.new_output(q.shape, q)
    lse = _backend.new_output(lse_shape, q, acc)
    scores = _backend.new_output(scores_shape, q, acc)
    if q.numel() == 0:  # no tokens at all (packed, every sequence empty): nothing to launch
        return out, lse, scores
    args = (q.contiguous(), k.contiguous(), v.contiguous(), _contig(key_padding_mask))
    if backend == "triton":  # cls scores come out of its score kernel final (sink included); int32 offsets read as is
        _backend.triton_kernels("attention").attention_fwd(
            *args, _contig(cu_seqlens), max_seqlen, scale, scores_mode, out, lse, scores, sink=sink
        )
        if sink and scores_mode == 2:
            scores = _apply_sink_any(scores, key_padding_mask, cu_seqlens)
        return out, lse, scores
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int64).contiguous()  # the C++ kernels read int64
    _backend.launch(backend, "attention", "attention_fwd", *args, cu, max_seqlen, scale, scores_mode, out, lse, scores)
    if sink and scores_mode:
        scores = _apply_sink_any(scores, key_padding_mask, cu)
    return out, lse, scores


@_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, scores_mode, sink):
    lse_shape, scores_shape = _shapes(q, cu_seqlens is not None, scores_mode)
    acc = _acc_dtype(q.dtype)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=acc), q.new_empty(scores_shape, dtype=acc)


@torch.library.custom_op("lotus_kernels::attention_bwd", mutates_args=())
def _attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = _kernel_backend(q.device)
    if backend == "reference":
        if cu_seqlens is not None:
            return _bwd_reference_varlen(dout, q, k, v, out, lse, cu_seqlens, scale)
        return _bwd_reference(dout, q, k, v, out, lse, key_padding_mask, scale)
    dq, dk, dv = (_backend.new_output(q.shape, q) for _ in range(3))
    if q.numel() == 0:
        return dq, dk, dv
    if backend != "triton" and cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int64)  # the C++ kernels read int64 (Triton's either)
    _backend.launch(
        backend,
        "attention",
        "attention_bwd",
        dout.contiguous(),
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        out.contiguous(),
        lse.contiguous(),
        _contig(key_padding_mask),
        _contig(cu_seqlens),
        max_seqlen,
        scale,
        dq,
        dk,
        dv,
    )
    return dq, dk, dv


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _fwd_setup(ctx, inputs, output):
    q, k, v, mask, cu_seqlens, max_seqlen, scale, _, _ = inputs
    out, lse, scores = output
    ctx.save_for_backward(q, k, v, out, lse, mask, cu_seqlens)
    ctx.scale, ctx.max_seqlen = scale, max_seqlen
    ctx.mark_non_differentiable(lse, scores)  # so the caller needs no detach


def _fwd_backward(ctx, dout, _dlse, _dscores):  # lse and scores are not differentiable
    q, k, v, out, lse, mask, cu_seqlens = ctx.saved_tensors
    if dout is None:
        return (None,) * 9
    dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, mask, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None


_attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


# ---------------------------------------------------------------- public API
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    return_scores: str | None = None,
    sink: str | None = "mean",
):
    """softmax(scale * q k^T) v for q, k, v [B, H, N, D]; ``scale`` defaults to D ** -0.5.

    ``key_padding_mask`` [B, N] bool, True = padded key (excluded from every softmax).
    ``cu_seqlens`` [B + 1] int64/int32: packed varlen instead, q, k, v [T, H, D] holding B sequences
    back to back (sequence b = tokens cu_seqlens[b] .. cu_seqlens[b + 1], possibly empty), each
    attending only within itself; ``max_seqlen`` (optional, as in flash-attention) is checked to be
    >= the longest. ``return_scores``: None -> out; "cls" or "received" -> (out, scores [B, N], or
    [T] when packed) (see the module docstring for the definitions, padding and the ``sink`` rule).
    Differentiable in q, k, v."""
    q, k, v = _checks.autocast_inputs(q, k, v)
    longest = _check(q, k, v, scale, key_padding_mask, return_scores, sink, cu_seqlens, max_seqlen)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    mode = SCORE_MODES[return_scores]
    if _path(q, _kernel_backend_of(q.device.type, q.device.index), mode, cu_seqlens is not None) == "sdpa":
        out = _sdpa_out(q, k, v, scale, key_padding_mask, cu_seqlens, longest)
        if return_scores is None:
            return out
        return out, _cls_scores(q.detach(), k.detach(), key_padding_mask, cu_seqlens, longest, scale, sink == "mean")
    out, _, scores = _attention_fwd(q, k, v, key_padding_mask, cu_seqlens, longest, scale, mode, sink == "mean")
    return out if return_scores is None else (out, scores)

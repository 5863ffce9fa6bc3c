"""What every non-timm family shares: the keep arguments, one transformer block written once over
a few named parts (for the packed ragged path and the patch scores), and the patched-class machinery.

A family module describes its model by
  * ``embed(model, images, idx)``: prefix tokens + the kept patches' embeddings [B, P + K, D]
    (``ops.patch_embed_gather``: dropped patches are never unfolded nor multiplied);
  * ``block_parts(block)`` -> ``BlockParts``: norms, fused or separate q/k/v, out projection, layer
    scales, MLP, as the block's own modules (so a sparsified linear is used as it is);
and the forwards it needs. The [B, K] path runs the model's own blocks; only the ragged path and
``patch_scores`` go through ``run_block``, which computes the same pre-norm block with
``ops.attention`` (packed varlen / scores).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from .. import _checks
from ..ops.attention import attention
from ..select import random_keep, select_keep
from ..vit_ragged import Packing, _drop_path, check_ragged_keep
from ..vit_scores import apply_sink_rule, check_rules


def _identity(x):
    return x


@dataclasses.dataclass
class BlockParts:
    """One pre-norm block: x += ls1(proj(attn(qkv(norm1(x))))); x += ls2(mlp(norm2(x)))."""

    norm1: Callable
    qkv: Callable  # [..., C] -> (q, k, v), each [..., H, hd]
    proj: Callable  # [..., H * hd] -> [..., C] (out projection and its dropout)
    norm2: Callable
    mlp: Callable
    scale: float
    ls1: Callable = _identity
    ls2: Callable = _identity
    drop_path1: nn.Module | None = None  # timm-style DropPath (one draw per image)
    drop_path2: nn.Module | None = None
    attn_dropout: float = 0.0  # the block's attention-probability dropout


def attend(
    parts: BlockParts,
    h: torch.Tensor,
    pk: Packing | None = None,
    return_scores: str | None = None,
    sink: str | None = None,
):
    """The block's attention on h [B, N, C] (or packed [1, T, C] with ``pk``): (output, scores or None)."""
    q, k, v = parts.qkv(h)
    if pk is not None:
        out = attention(q[0], k[0], v[0], scale=parts.scale, cu_seqlens=pk.cu, max_seqlen=pk.longest)
        return parts.proj(out.flatten(-2)[None]), None
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, hd]
    res = attention(q, k, v, scale=parts.scale, return_scores=return_scores, sink=sink)
    out, scores = res if return_scores else (res, None)
    return parts.proj(out.transpose(1, 2).flatten(-2)), scores


def _dp(mod, x, pk):
    if mod is None:
        return x
    return _drop_path(mod, x, pk) if pk is not None else mod(x)


def run_block(parts: BlockParts, x: torch.Tensor, pk: Packing | None = None, return_scores: str | None = None):
    """The block on x; with ``return_scores`` ("cls" / "received", not packed) also its attention scores."""
    if pk is not None and parts.attn_dropout > 0 and torch.is_grad_enabled() and _training(parts):
        raise NotImplementedError(
            f"attention dropout (p = {parts.attn_dropout}) is not supported with ragged keep_idx in train mode"
        )
    a, scores = attend(parts, parts.norm1(x), pk, return_scores)
    x = x + _dp(parts.drop_path1, parts.ls1(a), pk)
    x = x + _dp(parts.drop_path2, parts.ls2(parts.mlp(parts.norm2(x))), pk)
    return (x, scores) if return_scores else x


def _training(parts: BlockParts) -> bool:
    return getattr(parts.norm1, "training", True)


def split_qkv(fused: torch.Tensor, heads: int):
    """[..., 3 * C] (q | k | v) -> three [..., H, hd]."""
    return fused.unflatten(-1, (3, heads, -1)).unbind(-3)


def separate_qkv(q_lin, k_lin, v_lin, heads: int):
    def qkv(h):
        return tuple(lin(h).unflatten(-1, (heads, -1)) for lin in (q_lin, k_lin, v_lin))

    return qkv


# ---------------------------------------------------------------- keep arguments
def check_keep_args(keep_idx, keep_ratio, scores) -> bool:
    """Whether a kept-patch forward is asked for (False: the model's own forward)."""
    if keep_idx is None and keep_ratio is None:
        if scores is not None:
            raise ValueError("scores: given without keep_ratio; pass keep_ratio=r to keep the top patches")
        return False
    if keep_idx is not None and (keep_ratio is not None or scores is not None):
        raise ValueError("keep_idx: give either keep_idx or keep_ratio (+ scores), not both")
    return True


def keep_indices(images: torch.Tensor, n: int, *, keep_idx=None, keep_ratio=None, scores=None) -> torch.Tensor:
    """The [B, K] patch indices a kept-patch forward uses (values checked by the ops)."""
    if isinstance(keep_idx, (list, tuple)):
        raise ValueError(
            "keep_idx: a ragged list of index tensors has no single [B, K] index; call the model with it instead"
        )
    if keep_idx is not None:
        _checks.index_tensor("keep_idx", keep_idx, batch=images.shape[0], batch_name="images")
        if not torch.compiler.is_compiling():  # named here; under compile the op's own check names ``idx``
            _checks.index_range("keep_idx", keep_idx, n)
        return keep_idx
    if scores is None:
        return random_keep(images.shape[0], n, keep_ratio, device=images.device)
    _checks.tensor("scores", scores, ndim=2)
    if tuple(scores.shape) != (images.shape[0], n):
        raise ValueError(
            f"scores: expected shape ({images.shape[0]}, {n}) (one score per patch), got {tuple(scores.shape)}"
        )
    return select_keep(scores, keep_ratio).to(images.device)


def tensor_images(images) -> None:
    _checks.tensor("images", images, ndim=4)


def check_grid(images: torch.Tensor, size: tuple[int, int], patch: tuple[int, int], hint: str = "") -> int:
    """Number of patches of ``images`` at the model's input ``size``; a mismatch names ``images``."""
    _checks.tensor("images", images, ndim=4)
    if tuple(images.shape[-2:]) != tuple(size):
        raise ValueError(
            f"images: expected spatial size {tuple(size)} (the model's patch grid "
            f"{size[0] // patch[0]}x{size[1] // patch[1]} of {patch[0]}x{patch[1]} patches), got "
            f"{tuple(images.shape[-2:])}{hint}"
        )
    return (size[0] // patch[0]) * (size[1] // patch[1])


# ---------------------------------------------------------------- ragged
def pack(images: torch.Tensor, keep_idx, n: int, embed: Callable) -> tuple[torch.Tensor, Packing, int]:
    """Embed each image's own kept patches and pack them: (x [1, T, C], packing, number of prefix
    tokens P). Embedded as one [B, kmax] batch (shorter lists padded with their last index); the
    padding rows never reach a block."""
    check_ragged_keep(images, keep_idx, n)
    kept = [len(i) for i in keep_idx]
    kmax = max(kept)
    padded = torch.stack([torch.cat([i, i[-1:].expand(kmax - len(i))]) for i in keep_idx])
    x = embed(padded)
    p = x.shape[1] - kmax
    pk = Packing([k + p for k in kept], images.device)
    rows = pk.seg * x.shape[1] + pk.pos
    pk.rows, pk.width = rows, x.shape[1]
    return x.reshape(-1, x.shape[-1])[rows][None], pk, p


def unpack(x: torch.Tensor, pk: Packing) -> torch.Tensor:
    """Packed [T, C] -> padded [B, P + kmax, C] (zeros where an image has fewer tokens)."""
    out = x.new_zeros(pk.num * pk.width, x.shape[-1]).index_copy(0, pk.rows, x)
    return out.view(pk.num, pk.width, x.shape[-1])


def pool_first(x: torch.Tensor, pk: Packing) -> torch.Tensor:
    """Each image's first token (its class token) from packed [T, C]."""
    return x[pk.cu[:-1]]


def pool_mean(x: torch.Tensor, pk: Packing, skip: int) -> torch.Tensor:
    """Mean of each image's tokens after its first ``skip`` (the patch tokens) from packed [T, C]."""
    w = (pk.pos >= skip).to(x.dtype)
    counts = x.new_zeros(pk.num).index_add_(0, pk.seg, w)
    return x.new_zeros(pk.num, x.shape[1]).index_add(0, pk.seg, x * w[:, None]) / counts[:, None]


# ---------------------------------------------------------------- patch scores
@torch.no_grad()
def patch_scores(
    x: torch.Tensor,
    blocks: list[BlockParts],
    n_prefix: int,
    sink: str | None,
    return_flagged: bool,
    which: str = "last",
):
    """[B, N] scores from the last block's attention (``which="last"``) or the mean over every
    block's (``"mean"``) on all tokens x [B, P + N, C] (blocks before the last applied here):
    class-token attention where there is a class token (P > 0), else the mean attention each patch
    receives. ``sink`` as in ``vit_scores.vit_patch_scores``; "first" only ever
    touches the class token's own score, so with no class token it leaves the scores as they are."""
    check_rules(sink, which)
    mode = "cls" if n_prefix > 0 else "received"
    total = None
    for parts in blocks[:-1]:
        if which == "last":
            x = run_block(parts, x)
            continue
        x, s = run_block(parts, x, return_scores=mode)
        total = s[:, n_prefix:] if total is None else total + s[:, n_prefix:]
    last = blocks[-1]
    _, scores = attend(last, last.norm1(x), None, mode, "mean" if sink == "first" and n_prefix > 0 else None)
    scores = scores[:, n_prefix:]
    if total is not None:
        scores = (total + scores) / len(blocks)
    return apply_sink_rule(scores, x[:, n_prefix:], sink, return_flagged)


# ---------------------------------------------------------------- patched classes
def patched_class(cls: type, mixin: type, namespace: dict, module: str) -> type:
    """``Lotus<cls>``: a subclass of (mixin, cls) defined in ``module``'s namespace under a stable
    name, so that pickling (``torch.save(model)``) finds it."""
    if issubclass(cls, mixin):
        return cls
    name = f"Lotus{cls.__name__}"
    new = namespace.get(name)
    if new is None:
        new = type(name, (mixin, cls), {"__module__": module, "__qualname__": name})
        namespace[name] = new
    elif new.__bases__ != (mixin, cls):
        raise TypeError(f"model: cannot patch {cls.__module__}.{cls.__qualname__}: name {name} is taken")
    return new

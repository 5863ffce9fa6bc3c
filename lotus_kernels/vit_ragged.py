"""Ragged kept patches: every image of a batch keeps its own number of patches.

``model(images, keep_idx=[idx_0, idx_1, ...])`` (after ``patch_vit``) packs the kept tokens of all
images (each image's prefix tokens first, then its kept patches) into one sequence of T tokens, so
LayerNorms, MLPs and projections run on exactly T tokens (no padding), and each block's attention
runs through ``ops.attention(..., cu_seqlens=...)``: an image attends only to its own tokens. The
head then reads each image's class token (or the mean of its own patch tokens for
``global_pool="avg"``). Per image this is the same network as ``model(image, keep_idx=idx[None])``.

Supported: timm ``Block`` + ``Attention`` blocks (q/k norm, LayerScale, DropPath per image, proj
dropout, gates), ``global_pool`` "token" / "avg" / "max" / "avgmax", gradient checkpointing. Not
supported (clear error): attention dropout in train mode (the fused op has no dropout on P),
attention pooling heads, other block types. Every image must keep at least one patch (an empty
index tensor is an error, as K = 0 is for the [B, K] path).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from . import _checks
from .ops.attention import attention


def check_ragged_keep(images: torch.Tensor, keep_idx, num_patches: int) -> None:
    """keep_idx: one 1-D int64 index tensor per image, each non-empty, values in [0, num_patches).
    Shapes, dtypes and devices are checked per image on the host; the values once for the whole
    batch (one range check of all indices together: no host sync on a GPU, see ``_checks.index_range``)."""
    if len(keep_idx) != images.shape[0]:
        raise ValueError(
            f"keep_idx: got {len(keep_idx)} index tensors for a batch of {images.shape[0]} images "
            f"(expected one per image)"
        )
    for i, idx in enumerate(keep_idx):
        name = f"keep_idx[{i}]"
        _checks.tensor(name, idx, ndim=1)
        if idx.dtype != torch.int64:
            raise TypeError(f"{name}: expected an int64 index tensor, got {str(idx.dtype).replace('torch.', '')}")
        if idx.device != images.device:
            raise ValueError(f"{name}: expected a tensor on {images.device} (like images), got one on {idx.device}")
        if idx.numel() == 0:
            raise ValueError(f"{name}: expected at least one patch index (an image must keep >= 1 patch)")
    if _checks.host_reads_are_free(images.device):  # name the image whose index is bad
        for i, idx in enumerate(keep_idx):
            _checks.index_range(f"keep_idx[{i}]", idx, num_patches)
    else:
        _checks.index_range("keep_idx", torch.cat(list(keep_idx)), num_patches)


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor of host ints on ``device`` without a host sync (a plain copy to a GPU waits
    for the stream; a pinned, non-blocking one does not)."""
    t = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def check_ragged_model(model) -> None:
    from timm.layers import Attention, DropPath
    from timm.models.vision_transformer import Block

    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise NotImplementedError(
                f"model.blocks[{i}]: ragged keep_idx needs timm Block + Attention, got "
                f"{type(blk).__name__} / {type(getattr(blk, 'attn', None)).__name__}"
            )
        for name in ("drop_path1", "drop_path2"):
            if not isinstance(getattr(blk, name), (nn.Identity, DropPath)):
                raise NotImplementedError(f"model.blocks[{i}].{name}: expected Identity or timm DropPath")
        if model.training and blk.attn.attn_drop.p > 0:
            raise NotImplementedError(
                f"model.blocks[{i}].attn.attn_drop: attention dropout (p = "
                f"{blk.attn.attn_drop.p}) is not supported with ragged keep_idx in train mode"
            )
    if getattr(model, "attn_pool", None) is not None:
        raise NotImplementedError("model.attn_pool: attention-pooling heads are not supported with ragged keep_idx")
    if model.global_pool not in ("token", "avg", "max", "avgmax"):
        raise NotImplementedError(
            f"model.global_pool: {model.global_pool!r} is not supported with ragged keep_idx "
            f"(expected 'token', 'avg', 'max' or 'avgmax')"
        )


class Packing:
    """Where each image's tokens sit in the packed [T, C] sequence. Built from host ints (the list
    lengths), so nothing here reads a device tensor back."""

    def __init__(self, lengths: list[int], device: torch.device):
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        self.num = len(lengths)
        self.total = cu[-1]  # T
        self.longest = max(lengths)
        self.lengths = _to_device(lengths, device)  # [B] tokens per image
        self.cu = _to_device(cu, device)  # [B + 1]
        self.seg = torch.repeat_interleave(
            torch.arange(self.num, device=device), self.lengths, output_size=self.total
        )  # [T]; output_size: no sync
        self.pos = torch.arange(self.total, device=device) - self.cu[self.seg]  # position in image


def _drop_path(mod: nn.Module, x: torch.Tensor, pk: Packing) -> torch.Tensor:
    """timm DropPath per image (not per packed sequence): one Bernoulli draw per image."""
    if isinstance(mod, nn.Identity) or not mod.training or mod.drop_prob == 0.0:
        return x
    keep = 1.0 - mod.drop_prob
    r = x.new_empty(pk.num).bernoulli_(keep)
    if keep > 0.0 and mod.scale_by_keep:
        r.div_(keep)
    return x * r[pk.seg][None, :, None]


def _attention_packed(attn, x: torch.Tensor, pk: Packing) -> torch.Tensor:
    """timm ``Attention.forward`` on the packed x [1, T, C], attending within each image."""
    T = x.shape[1]
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(T, 3, attn.num_heads, attn.head_dim).unbind(1)  # [T, H, hd] each
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = attention(q, k, v, scale=attn.scale, cu_seqlens=pk.cu, max_seqlen=pk.longest)
    out = out.reshape(1, T, attn.num_heads * attn.head_dim)
    out = attn.norm(out) if hasattr(attn, "norm") else out
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def _block_packed(blk, x: torch.Tensor, pk: Packing) -> torch.Tensor:
    x = x + _drop_path(blk.drop_path1, blk.ls1(_attention_packed(blk.attn, blk.norm1(x), pk)), pk)
    return x + _drop_path(blk.drop_path2, blk.ls2(blk.mlp(blk.norm2(x))), pk)


def _pool_packed(model, x: torch.Tensor, pk: Packing) -> torch.Tensor:
    """timm's ``global_pool_nlc`` per image on packed x [T, C] -> [B, C] (weights instead of a
    boolean selection of the pooled tokens, which would read the mask back to size its result)."""
    if model.global_pool == "token":
        return x[pk.cu[:-1]]
    use = torch.ones_like(pk.seg, dtype=torch.bool) if model.pool_include_prefix else pk.pos >= model.num_prefix_tokens
    w = use.to(x.dtype)
    B = pk.num
    counts = x.new_zeros(B).index_add_(0, pk.seg, w)
    mean = x.new_zeros(B, x.shape[1]).index_add(0, pk.seg, x * w[:, None]) / counts[:, None]
    if model.global_pool == "avg":
        return mean
    xs = torch.where(use[:, None], x, float("-inf"))
    mx = x.new_full((B, x.shape[1]), float("-inf")).scatter_reduce(0, pk.seg[:, None].expand_as(xs), xs, "amax")
    return mx if model.global_pool == "max" else 0.5 * (mx + mean)


def forward_ragged(model, images: torch.Tensor, keep_idx) -> torch.Tensor:
    """Logits [B, classes] of ``model`` run on each image's own kept patches (see module docstring)."""
    check_ragged_keep(images, keep_idx, model.patch_embed.num_patches)
    check_ragged_model(model)
    kept = [len(i) for i in keep_idx]  # host ints: no device read
    kmax = max(kept)
    # Embed as one [B, kmax] batch (the shorter lists padded with their own last index), then keep
    # each image's real rows: the padding rows never reach a block.
    padded = torch.stack([torch.cat([i, i[-1:].expand(kmax - len(i))]) for i in keep_idx])
    x = model.embed_kept(images, padded)  # [B, P + kmax, C]
    n_prefix = x.shape[1] - kmax
    pk = Packing([k + n_prefix for k in kept], images.device)
    rows = pk.seg * x.shape[1] + pk.pos  # image-major row of each packed token
    x = model.norm_pre(x.reshape(-1, x.shape[-1])[rows])[None]  # [1, T, C]
    for blk in model.blocks:
        if model.grad_checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(_block_packed, blk, x, pk, use_reentrant=False)
        else:
            x = _block_packed(blk, x, pk)
    x = model.norm(x)[0]
    x = model.fc_norm(_pool_packed(model, x, pk))
    return model.head(model.head_drop(x))

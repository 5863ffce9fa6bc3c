"""Patch scores of a timm ViT from its last block's class-token attention, without an attention map.

``vit_patch_scores(model, images)`` (also ``model.patch_scores(images)`` after ``patch_vit``) runs one
no-grad forward up to the last block and replaces only that block's attention by
``ops.attention(..., return_scores="cls")``: the scores come out of the fused kernel, instead of the
usual recipe (``fused_attn = False`` plus a hook on the softmax) that materialises [B, H, N, N].
"""
from __future__ import annotations

import torch

from . import _checks
from .ops.attention import attention


def attention_forward_with_scores(attn, x: torch.Tensor, return_scores: str = "cls", sink: str | None = "mean"):
    """timm ``Attention.forward`` (qkv, q/k norm, softmax attention, norm, gate, proj) on x [B, N, C],
    with the softmax done by ``ops.attention``. Returns (block output [B, N, C], scores [B, N])."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out, scores = attention(q, k, v, scale=attn.scale, return_scores=return_scores, sink=sink)
    out = out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)
    out = attn.norm(out) if hasattr(attn, "norm") else out
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), scores


def _check_scorable(model) -> None:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    if model.cls_token is None:
        raise ValueError("model: patch scores are class-token attention, but this model has no class token")
    last = model.blocks[-1]
    if type(last) is not Block or type(last.attn) is not Attention:
        raise ValueError(f"model.blocks[-1]: expected a timm Block with timm Attention, got "
                         f"{type(last).__name__} / {type(getattr(last, 'attn', None)).__name__}")


@torch.no_grad()
def vit_patch_scores(model, images: torch.Tensor) -> torch.Tensor:
    """[B, num_patches] float scores: class-token attention of the last block, averaged over heads,
    with the sink rule applied to the full row (scores[:, 0], the class token itself, replaced by the
    mean of the others), then prefix tokens dropped. Higher = more attended. Every patch is scored
    (timm's PatchDropout is skipped even in train mode)."""
    _checks.tensor("images", images, ndim=4)
    _check_scorable(model)
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    for blk in model.blocks[:-1]:
        x = blk(x)
    last = model.blocks[-1]
    _, scores = attention_forward_with_scores(last.attn, last.norm1(x), "cls", "mean")
    return scores[:, model.num_prefix_tokens:]

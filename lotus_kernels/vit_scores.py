"""Patch scores of a timm ViT from its class-token attention, without an attention map.

``vit_patch_scores(model, images)`` (also ``model.patch_scores(images)`` after ``patch_vit``) runs one
no-grad forward up to the last block and replaces only that block's attention by
``ops.attention(..., return_scores="cls")``: the scores come out of the fused kernel, instead of the
usual recipe (``fused_attn = False`` plus a hook on the softmax) that materialises [B, H, N, N].
With ``blocks="mean"`` every block's attention goes through the kernel and the scores are the mean
over blocks (earlier blocks' class-token attention often finds the object when the last block's
does not: docs/design/lotus-transfer.md measures it).
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


def _check_scorable(model, every_block: bool = False) -> None:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    if model.cls_token is None:
        raise ValueError("model: patch scores are class-token attention, but this model has no class token")
    n = len(model.blocks)
    for i in range(n) if every_block else [n - 1]:
        blk = model.blocks[i]
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise ValueError(
                f"model.blocks[{i - n if i == n - 1 else i}]: expected a timm Block with timm Attention, got "
                f"{type(blk).__name__} / {type(getattr(blk, 'attn', None)).__name__}"
            )


SINK_RULES = (None, "first", "outlier", "norm")
BLOCK_RULES = ("last", "mean")  # whose class-token attention scores a patch: the last block's, or every block's mean
OUTLIER_Z = 5.0  # token norms: roughly symmetric, a clear gap for artifact tokens
OUTLIER_Z_LOG = 3.5  # attention shares are heavy-tailed (near log-normal): judged on log scale


def outliers(values: torch.Tensor, z: float = OUTLIER_Z) -> torch.Tensor:
    """Bool [B, N]: entries of each row more than ``z`` robust standard deviations above the row's
    median (robust SD = 1.4826 * median absolute deviation, floored at 1e-3 of the median so a
    near-constant row flags nothing by rounding). At most half a row can be flagged."""
    v = values.float()
    med = v.median(dim=1, keepdim=True).values
    mad = (v - med).abs().median(dim=1, keepdim=True).values * 1.4826
    mad = torch.maximum(mad, 1e-3 * med.abs() + 1e-12)
    return (v - med) > z * mad


def apply_patch_sink(scores: torch.Tensor, flagged: torch.Tensor) -> torch.Tensor:
    """``scores`` [B, N] with every flagged patch replaced by the mean score of the image's unflagged
    patches (a row with every patch flagged is left as it is)."""
    keep = ~flagged
    mean = (scores * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
    return torch.where(flagged & keep.any(1, keepdim=True), mean.to(scores.dtype), scores)


def check_rules(sink, blocks) -> None:
    """A ValueError naming the argument unless ``sink`` and ``blocks`` are known rules."""
    if sink not in SINK_RULES:
        raise ValueError(f"sink: expected one of {', '.join(map(repr, SINK_RULES))}, got {sink!r}")
    if blocks not in BLOCK_RULES:
        raise ValueError(f"blocks: expected one of {', '.join(map(repr, BLOCK_RULES))}, got {blocks!r}")


def apply_sink_rule(scores: torch.Tensor, patch_tokens: torch.Tensor, sink, return_flagged: bool):
    """The patch-level sink rules on [B, N] ``scores`` ("outlier": outlier attention shares, "norm":
    outlier norms of ``patch_tokens`` [B, N, C] entering the last block -> the mean score; the other
    rules change no patch), every family's last step of ``patch_scores``."""
    if sink == "outlier":
        flagged = outliers(scores.clamp_min(1e-30).log(), OUTLIER_Z_LOG)
    elif sink == "norm":
        flagged = outliers(patch_tokens.float().norm(dim=-1))
    else:
        flagged = torch.zeros_like(scores, dtype=torch.bool)
    if sink in ("outlier", "norm"):
        scores = apply_patch_sink(scores, flagged)
    return (scores, flagged) if return_flagged else scores


@torch.no_grad()
def vit_patch_scores(
    model, images: torch.Tensor, sink: str | None = "first", *, blocks: str = "last", return_flagged: bool = False
):
    """[B, num_patches] float scores: class-token attention of the last block (``blocks="last"``) or
    the mean over every block (``"mean"``), averaged over heads, prefix tokens dropped. Higher = more
    attended. Every patch is scored (timm's PatchDropout is skipped even in train mode). ``sink`` decides which tokens count as attention sinks:

      None       raw scores
      "first"    LOTUS's literal rule: the first token's own score (the class token's attention to
                 itself) becomes the mean of the rest. It never touches a patch, so the patch scores
                 equal ``None``'s: kept for comparison with the paper
      "outlier"  patches whose attention share is an outlier get the mean score of the other patches:
                 log(share) more than 3.5 robust SDs above the image's median (``outliers``; on a
                 linear scale the heavy tail would flag every well-attended patch). These are the
                 single patches that take most of the class token's attention, like the high-norm
                 artifact tokens of "Vision Transformers Need Registers" (Darcet et al., 2024)
      "norm"     the same, flagging patches whose token norm entering the last block is more than 5
                 robust SDs above the median (the registers paper's own criterion)

    ``return_flagged``: also return the bool [B, num_patches] mask of patches the rule changed."""
    _checks.tensor("images", images, ndim=4)
    check_rules(sink, blocks)
    _check_scorable(model, every_block=blocks == "mean")
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    p = model.num_prefix_tokens
    total = None
    for blk in model.blocks[:-1]:
        if blocks == "last":
            x = blk(x)
            continue
        # timm's Block.forward with the attention through the kernel, which also gives its scores
        a, s = attention_forward_with_scores(blk.attn, blk.norm1(x), "cls", None)
        x = x + blk.drop_path1(blk.ls1(a))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        total = s[:, p:] if total is None else total + s[:, p:]
    last = model.blocks[-1]
    _, scores = attention_forward_with_scores(last.attn, last.norm1(x), "cls", "mean" if sink == "first" else None)
    scores = scores[:, p:]
    if total is not None:
        scores = (total + scores) / len(model.blocks)
    return apply_sink_rule(scores, x[:, p:], sink, return_flagged)

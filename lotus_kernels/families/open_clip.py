"""open_clip's image tower ``open_clip.transformer.VisionTransformer`` (``model.visual`` of a CLIP).

The kept path embeds the class token and the kept patches (``positional_embedding`` added, as
open_clip's ``_embeds`` does), skips the tower's ``patch_dropout`` (the patches are already dropped:
unlike ``patch_dropout``, which embeds every patch and acts in training only, this never embeds the
dropped ones and acts in eval mode too), then runs the tower's own ``ln_pre``, ``transformer``,
``_pool`` and ``proj``. Ragged keep lists and patch scores need the standard
``ResidualAttentionBlock`` (nn.MultiheadAttention) and token / average pooling without an
attentional pooler; the [B, K] path takes any tower. open_clip has no run-time position
interpolation: images must be ``image_size``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._keep_forward import KeepForwardMixin
from ..ops import patch_embed_gather
from . import _common

HEAD_NAMES = ("attn_pool", "attn_pool_contrastive")


def classes() -> tuple:
    from open_clip.transformer import VisionTransformer

    return (VisionTransformer,)


def check(model) -> None:
    conv = model.conv1
    if not isinstance(conv, nn.Conv2d) or tuple(conv.stride) != tuple(conv.kernel_size) or any(conv.padding):
        raise ValueError("model.conv1: expected a non-overlapping patch Conv2d (stride == kernel, no padding)")


def check_images(model, images) -> int:
    return _common.check_grid(
        images,
        tuple(model.image_size),
        tuple(model.patch_size),
        " (open_clip resizes position embeddings when loading weights, not per call)",
    )


def embed(model, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[B, 1 + K, D] before ``ln_pre``: class token, kept patches, positional table added."""
    conv = model.conv1
    pos = model.positional_embedding.to(images.dtype)
    x = patch_embed_gather(
        images, idx, conv.weight.to(images.dtype), None if conv.bias is None else conv.bias.to(images.dtype), pos[1:]
    )
    cls = (model.class_embedding.to(x.dtype) + pos[0])[None, None].expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1)


def block_parts(blk) -> _common.BlockParts:
    from open_clip.transformer import ResidualAttentionBlock

    if type(blk) is not ResidualAttentionBlock or hasattr(blk, "ln_1_kv"):
        raise NotImplementedError(
            f"{type(blk).__name__}: ragged keep_idx / patch_scores need open_clip's "
            "ResidualAttentionBlock (nn.MultiheadAttention self-attention)"
        )
    mha = blk.attn
    heads = mha.num_heads

    def qkv(h):
        return _common.split_qkv(F.linear(h, mha.in_proj_weight, mha.in_proj_bias), heads)

    return _common.BlockParts(
        norm1=blk.ln_1,
        qkv=qkv,
        proj=mha.out_proj,
        norm2=blk.ln_2,
        mlp=blk.mlp,
        scale=(mha.embed_dim // heads) ** -0.5,
        ls1=blk.ls_1,
        ls2=blk.ls_2,
        attn_dropout=mha.dropout,
    )


def _output(model, pooled, tokens):
    if model.proj is not None:
        pooled = pooled @ model.proj
    return (pooled, tokens) if model.output_tokens else pooled


class KeptPatchesMixin(KeepForwardMixin):
    """Adds the kept-patch path to open_clip's VisionTransformer (see lotus_kernels.families). The
    patched class's ``forward`` wraps open_clip's (``_keep_forward``): torch.fx traces and TorchScript
    compiles open_clip's own forward."""

    _lotus_family = "open_clip"

    def forward_keep(self, args: tuple, kwargs: dict, keep_idx, keep_ratio, scores):
        if not _common.check_keep_args(keep_idx, keep_ratio, scores):
            return super().forward(*args, **kwargs)
        x = self._images_only(args, kwargs)
        n = check_images(self, x)
        if isinstance(keep_idx, (list, tuple)):
            return self._forward_ragged(x, keep_idx, n)
        idx = _common.keep_indices(x, n, keep_idx=keep_idx, keep_ratio=keep_ratio, scores=scores)
        t = self.transformer(self.ln_pre(embed(self, x, idx)))
        pooled, tokens = self._pool(t)
        return _output(self, pooled, tokens)

    def _forward_ragged(self, x, keep_idx, n):
        if self.attn_pool is not None or self.pool_type not in ("tok", "avg") or self.output_tokens:
            raise NotImplementedError(
                "keep_idx: ragged keep lists need token or average pooling without attentional pooler nor output_tokens"
            )
        t, pk, p = _common.pack(x, keep_idx, n, lambda idx: embed(self, x, idx))
        t = self.ln_pre(t)
        for blk in self.transformer.resblocks:
            t = _common.run_block(block_parts(blk), t, pk)
        t = t[0]
        if not self.final_ln_after_pool:
            t = self.ln_post(t)
        pooled = _common.pool_first(t, pk) if self.pool_type == "tok" else _common.pool_mean(t, pk, p)
        if self.final_ln_after_pool:
            pooled = self.ln_post(pooled)
        return _output(self, pooled, None)

    def keep_indices(self, images, *, keep_idx=None, keep_ratio=None, scores=None) -> torch.Tensor:
        return _common.keep_indices(
            images, check_images(self, images), keep_idx=keep_idx, keep_ratio=keep_ratio, scores=scores
        )

    def patch_scores(
        self, images: torch.Tensor, sink: str | None = "first", *, blocks: str = "last", return_flagged: bool = False
    ):
        """[B, N] class-token attention of the last block (``blocks="mean"``: the mean over every
        block), averaged over heads."""
        n = check_images(self, images)
        all_idx = torch.arange(n, device=images.device).expand(images.shape[0], n)
        with torch.no_grad():
            x = self.ln_pre(embed(self, images, all_idx))
        return _common.patch_scores(
            x, [block_parts(b) for b in self.transformer.resblocks], 1, sink, return_flagged, blocks
        )


def patch(model):
    check(model)
    model.__class__ = _common.patched_class(type(model), KeptPatchesMixin, globals(), __name__)
    return model

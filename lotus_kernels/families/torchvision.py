"""torchvision ``VisionTransformer`` (vit_b_16, vit_l_32, ...): the kept-patch forward.

The class token and ``encoder.pos_embedding`` are added as torchvision adds them (its Encoder adds
the positional table to the concatenated sequence; here the patch rows go into the fused patch
embedding and the class row onto the class token: the same sums). The [B, K] path then runs the
model's own ``encoder.layers``, ``encoder.ln`` and ``heads``. torchvision has no positional
interpolation: images must be ``model.image_size`` square, as its own forward asserts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._keep_forward import KeepForwardMixin
from ..ops import patch_embed_gather
from . import _common

try:
    from torchvision.models.vision_transformer import VisionTransformer
except ImportError:  # pragma: no cover - torchvision is a dependency
    VisionTransformer = None

CLASSES = (VisionTransformer,) if VisionTransformer is not None else ()
HEAD_NAMES = ("heads",)


def check(model) -> None:
    if not isinstance(model.conv_proj, nn.Conv2d):
        raise ValueError(
            "model.conv_proj: a convolutional stem (conv_stem_configs) is not supported by patch_vit; "
            "expected the plain patch Conv2d"
        )
    for i, blk in enumerate(model.encoder.layers):
        mha = blk.self_attention
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ValueError(
                f"model.encoder.layers[{i}].self_attention: expected a fused in_proj (q, k, v of the model width)"
            )


def num_patches(model) -> int:
    return (model.image_size // model.patch_size) ** 2


def check_images(model, images) -> int:
    s, p = model.image_size, model.patch_size
    return _common.check_grid(images, (s, s), (p, p), " (torchvision ViTs have no position-embedding interpolation)")


def embed(model, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[B, 1 + K, D]: class token, then the kept patches, positional table added, encoder dropout."""
    pos = model.encoder.pos_embedding
    x = patch_embed_gather(images, idx, model.conv_proj.weight, model.conv_proj.bias, pos[:, 1:])
    cls = (model.class_token + pos[:, :1]).expand(x.shape[0], -1, -1)
    return model.encoder.dropout(torch.cat([cls, x], dim=1))


def block_parts(blk) -> _common.BlockParts:
    mha = blk.self_attention
    heads = mha.num_heads

    def qkv(h):
        return _common.split_qkv(F.linear(h, mha.in_proj_weight, mha.in_proj_bias), heads)

    return _common.BlockParts(
        norm1=blk.ln_1,
        qkv=qkv,
        proj=lambda o: blk.dropout(mha.out_proj(o)),
        norm2=blk.ln_2,
        mlp=blk.mlp,
        scale=(mha.embed_dim // heads) ** -0.5,
        attn_dropout=mha.dropout,
    )


class KeptPatchesMixin(KeepForwardMixin):
    """Adds the kept-patch path to torchvision's VisionTransformer (see lotus_kernels.families). The
    patched class's ``forward`` wraps torchvision's (``_keep_forward``): torch.fx traces and
    TorchScript compiles torchvision's own forward."""

    _lotus_family = "torchvision"

    def forward_keep(self, args: tuple, kwargs: dict, keep_idx, keep_ratio, scores):
        if not _common.check_keep_args(keep_idx, keep_ratio, scores):
            return super().forward(*args, **kwargs)
        x = self._images_only(args, kwargs)
        n = check_images(self, x)
        if isinstance(keep_idx, (list, tuple)):
            t, pk, _ = _common.pack(x, keep_idx, n, lambda idx: embed(self, x, idx))
            for blk in self.encoder.layers:
                t = _common.run_block(block_parts(blk), t, pk)
            return self.heads(_common.pool_first(self.encoder.ln(t[0]), pk))
        idx = _common.keep_indices(x, n, keep_idx=keep_idx, keep_ratio=keep_ratio, scores=scores)
        t = self.encoder.ln(self.encoder.layers(embed(self, x, idx)))
        return self.heads(t[:, 0])

    def keep_indices(self, images, *, keep_idx=None, keep_ratio=None, scores=None) -> torch.Tensor:
        return _common.keep_indices(
            images, check_images(self, images), keep_idx=keep_idx, keep_ratio=keep_ratio, scores=scores
        )

    def patch_scores(
        self, images: torch.Tensor, sink: str | None = "first", *, blocks: str = "last", return_flagged: bool = False
    ):
        """[B, N] class-token attention of the last encoder layer (``blocks="mean"``: the mean over every
        encoder layer), averaged over heads."""
        n = check_images(self, images)
        all_idx = torch.arange(n, device=images.device).expand(images.shape[0], n)
        with torch.no_grad():
            x = embed(self, images, all_idx)
        return _common.patch_scores(x, [block_parts(b) for b in self.encoder.layers], 1, sink, return_flagged, blocks)


def patch(model):
    check(model)
    model.__class__ = _common.patched_class(type(model), KeptPatchesMixin, globals(), __name__)
    return model

"""Hugging Face ``transformers`` vision transformers: ViT, DeiT, DINOv2, CLIP-vision, SigLIP-vision.

Any model class holding exactly one of the embeddings modules below (``ViTModel``,
``ViTForImageClassification``, ``DeiTForImageClassificationWithTeacher``, ``Dinov2Model``,
``CLIPVisionModel(WithProjection)``, ``SiglipVisionModel``, ...) is patched. The kept-patch forward
runs the model's **own** forward, with its embeddings module (patched too) returning the prefix
tokens plus the kept patches' embeddings (``ops.patch_embed_gather``) instead of every patch's:
so the encoder, final norm, pooler, classifier, ``labels`` -> loss, ``output_hidden_states`` and the
output class are the model's own, on P + K tokens. Pooling that reads token 0 (ViT, DeiT, CLIP,
DINOv2) or averages the patch tokens (DINOv2's classifier) or attends over them (SigLIP's head) then
acts on the kept patches only.

Resolution: the model's own rule. ViT / DeiT / CLIP / SigLIP need ``image_size`` unless called with
``interpolate_pos_encoding=True``; DINOv2 always interpolates; the table comes from the embeddings'
own ``interpolate_pos_encoding``. Ragged keep lists (``forward_ragged``) pack every image's tokens into
one varlen sequence through the generic block of ``_common`` (the layer's own modules, ``ops.attention``
with ``cu_seqlens``), then apply the class's own norm, pooling and head per image, for the classes in
``RAGGED_CLASSES`` (logits / pooled outputs; no labels or hidden-state lists).
"""

from __future__ import annotations

import torch
from torch import nn

from .._keep_forward import KeepForwardMixin
from ..ops import patch_embed_gather
from . import _common

_EMBEDDINGS = {
    # class name: (module, number of prefix tokens, always interpolates)
    "ViTEmbeddings": ("vit", 1, False),
    "DeiTEmbeddings": ("deit", 2, False),
    "Dinov2Embeddings": ("dinov2", 1, True),
    "CLIPVisionEmbeddings": ("clip", 1, False),
    "SiglipVisionEmbeddings": ("siglip", 0, False),
}
HEAD_NAMES = ("classifier", "cls_classifier", "distillation_classifier", "visual_projection", "pooler", "head")


def _embedding_classes() -> dict[type, tuple]:
    import importlib

    out = {}
    for name, (mod, p, interp) in _EMBEDDINGS.items():
        try:
            m = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
        except ImportError:
            continue
        cls = getattr(m, name, None)
        if cls is not None:
            out[cls] = (p, interp)
    return out


def classes() -> tuple:
    from transformers import PreTrainedModel

    return (PreTrainedModel,)


def head_names(model) -> set[str]:
    names = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in HEAD_NAMES}
    return names


def _find_embeddings(model) -> tuple[str, nn.Module]:
    known = _embedding_classes()
    found = [(n, m) for n, m in model.named_modules() if type(m) in known or isinstance(m, _KeptEmbeddingsMixin)]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise TypeError(
            f"model: patch_vit supports transformers models with one vision embeddings module "
            f"({', '.join(_EMBEDDINGS)}); {type(model).__name__} has {what}"
        )
    return found[0]


def _info(emb) -> tuple[int, bool]:
    """(number of prefix tokens, always interpolates), remembered at patch time (no import under compile)."""
    info = emb.__dict__.get("_lotus_info")
    if info is not None:
        return info
    for cls, info in _embedding_classes().items():
        if isinstance(emb, cls):
            return info
    raise TypeError(f"embeddings: unsupported {type(emb).__name__}")


def _conv(emb) -> nn.Conv2d:
    pe = getattr(emb, "patch_embeddings", None)
    return pe.projection if pe is not None else emb.patch_embedding


def _size(emb) -> tuple[tuple[int, int], tuple[int, int]]:
    """(image size, patch size) the positional table was made for."""
    conv = _conv(emb)
    pe = getattr(emb, "patch_embeddings", None)
    size = pe.image_size if pe is not None else emb.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return size, tuple(conv.kernel_size)


def _pos_table(emb) -> torch.Tensor:
    """[1, P + N, D] positional table (prefix rows first)."""
    if hasattr(emb, "position_embeddings"):
        return emb.position_embeddings
    return emb.position_embedding.weight[None]


def _prefix_tokens(emb) -> list[torch.Tensor]:
    """The [1, 1, D] prefix tokens in sequence order."""
    if hasattr(emb, "class_embedding"):  # CLIP: a [D] vector
        return [emb.class_embedding[None, None]]
    return [t for t in (getattr(emb, "cls_token", None), getattr(emb, "distillation_token", None)) if t is not None]


def grid(emb, images: torch.Tensor, interpolate: bool) -> tuple[int, torch.Tensor]:
    """(number of patches, positional table [1, P + N, D] for this image size)."""
    p, always = _info(emb)
    size, patch = _size(emb)
    pos = _pos_table(emb)
    _common.tensor_images(images)
    h, w = images.shape[-2:]
    if (h, w) == size:
        return (h // patch[0]) * (w // patch[1]), pos
    if not (interpolate or always):
        _common.check_grid(
            images,
            size,
            patch,
            "; pass interpolate_pos_encoding=True to interpolate the position embeddings to another size",
        )
    if h % patch[0] or w % patch[1]:
        raise ValueError(f"images: expected height and width divisible by the patch size {patch}, got {(h, w)}")
    n = (h // patch[0]) * (w // patch[1])
    pos = emb.interpolate_pos_encoding(pos.new_zeros(1, p + n, pos.shape[-1]), h, w)
    return n, pos


def embed(emb, images: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[B, P + K, D]: the prefix tokens, then the kept patches, positional table added (+ dropout)."""
    conv = _conv(emb)
    prefix = _prefix_tokens(emb)
    p = len(prefix)
    x = patch_embed_gather(images.to(conv.weight.dtype), idx, conv.weight, conv.bias, pos[:, p:])
    if p:
        toks = torch.cat([t + pos[:, i : i + 1] for i, t in enumerate(prefix)], dim=1)
        x = torch.cat([toks.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
    drop = getattr(emb, "dropout", None)
    return drop(x) if drop is not None else x


class _KeptEmbeddingsMixin:
    """The embeddings module of a patched model: with a pending keep index (set by the model's kept
    forward around its own forward call), the kept tokens; otherwise its own forward."""

    def forward(self, pixel_values, *args, **kwargs):
        pending = self.__dict__.get("_lotus_keep")
        if pending is None:
            return super().forward(pixel_values, *args, **kwargs)
        idx, pos = pending
        return embed(self, pixel_values, idx, pos)


# ---------------------------------------------------------------- blocks (patch scores)
def _first(obj, *names):
    for n in names:
        m = getattr(obj, n, None)
        if m is not None:
            return m
    return None


def block_parts(layer) -> _common.BlockParts:
    norm1 = _first(layer, "layernorm_before", "norm1", "layer_norm1")
    norm2 = _first(layer, "layernorm_after", "norm2", "layer_norm2")
    attn = _first(layer, "attention", "self_attn")
    if hasattr(attn, "q_proj"):  # transformers >= 5.10 (and CLIP / SigLIP in every version)
        q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
        out = _first(attn, "o_proj", "out_proj")
        heads = _first(attn, "num_attention_heads", "num_heads")
    else:  # ViT / DeiT / DINOv2 before 5.10: attention.attention.{query,key,value}, attention.output.dense
        inner = getattr(attn, "attention", None)
        q, k, v = (getattr(inner, n, None) for n in ("query", "key", "value"))
        so = getattr(attn, "output", None)
        out = None if getattr(so, "dense", None) is None else (lambda o: so.dropout(so.dense(o)))
        heads = getattr(inner, "num_attention_heads", None)
        attn = inner
    mlp = getattr(layer, "mlp", None)
    if mlp is None and hasattr(layer, "intermediate"):  # ViTIntermediate + ViTOutput (which adds the residual)
        inter, output = layer.intermediate, layer.output

        def mlp(h):
            return output.dropout(output.dense(inter(h)))

    if None in (norm1, norm2, q, k, v, out, mlp, heads):
        raise NotImplementedError(f"{type(layer).__name__}: this layer layout is not supported by patch_scores")
    scale = _first(attn, "scaling", "scale")
    if scale is None:
        scale = (q.out_features // heads) ** -0.5
    drop = getattr(layer, "dropout", None)  # ViT / DeiT >= 5.10: after the attention and after the MLP
    if isinstance(drop, nn.Dropout):
        out_, mlp_ = out, mlp
        out, mlp = (lambda o: drop(out_(o))), (lambda h: drop(mlp_(h)))
    ls1 = getattr(layer, "layer_scale1", None) or _common._identity
    ls2 = getattr(layer, "layer_scale2", None) or _common._identity
    return _common.BlockParts(
        norm1=norm1,
        qkv=_common.separate_qkv(q, k, v, heads),
        proj=out,
        norm2=norm2,
        mlp=mlp,
        scale=scale,
        ls1=ls1,
        ls2=ls2,
    )


def _encoder_parts(model, emb_name: str):
    """(pre-norm, list of layers) of the transformer that owns the embeddings."""
    owner_name = emb_name.rsplit(".", 1)[0] if "." in emb_name else ""
    owner = model.get_submodule(owner_name)
    layers = getattr(owner, "layers", None)
    if layers is None:
        enc = owner.encoder
        layers = _first(enc, "layers", "layer")
    pre = _first(owner, "pre_layrnorm", "pre_layernorm") or _common._identity
    return pre, list(layers)


# ---------------------------------------------------------------- the patched model
class KeptPatchesMixin(KeepForwardMixin):
    """Adds the kept-patch path to a transformers vision model (see module docstring). The patched
    class's ``forward`` wraps the model's own (``_keep_forward``), so tracers that read the forward's
    signature (torch.fx, ``torch.jit.trace``, ``torch.export``) see the model's own inputs."""

    _lotus_family = "transformers"

    def forward_keep(self, args: tuple, kwargs: dict, keep_idx, keep_ratio, scores):
        if not _common.check_keep_args(keep_idx, keep_ratio, scores):
            return super().forward(*args, **kwargs)
        images = args[0] if args else kwargs.get("pixel_values")
        if kwargs.get("bool_masked_pos") is not None:
            raise ValueError(
                "bool_masked_pos: not supported together with keep_idx / keep_ratio (dropped patches "
                "are not masked, they are gone)"
            )
        emb = self.get_submodule(self._lotus_embeddings)
        n, pos = grid(emb, images, bool(kwargs.get("interpolate_pos_encoding")))
        if isinstance(keep_idx, (list, tuple)):
            return forward_ragged(self, images, keep_idx, n, pos, kwargs)
        idx = _common.keep_indices(images, n, keep_idx=keep_idx, keep_ratio=keep_ratio, scores=scores)
        emb._lotus_keep = (idx, pos)
        try:
            return super().forward(*args, **kwargs)
        finally:
            emb._lotus_keep = None

    def keep_indices(
        self, images, *, keep_idx=None, keep_ratio=None, scores=None, interpolate_pos_encoding: bool = False
    ) -> torch.Tensor:
        n, _ = grid(self.get_submodule(self._lotus_embeddings), images, interpolate_pos_encoding)
        return _common.keep_indices(images, n, keep_idx=keep_idx, keep_ratio=keep_ratio, scores=scores)

    def patch_scores(
        self,
        images: torch.Tensor,
        sink: str | None = "first",
        *,
        blocks: str = "last",
        return_flagged: bool = False,
        interpolate_pos_encoding: bool = False,
    ):
        """[B, N] last-layer attention scores (``blocks="mean"``: the mean over every layer's):
        class-token attention (ViT, DeiT, DINOv2, CLIP), or the mean attention each patch receives
        (SigLIP: no class token). Averaged over heads."""
        emb = self.get_submodule(self._lotus_embeddings)
        n, pos = grid(emb, images, interpolate_pos_encoding)
        pre, layers = _encoder_parts(self, self._lotus_embeddings)
        all_idx = torch.arange(n, device=images.device).expand(images.shape[0], n)
        with torch.no_grad():
            x = pre(embed(emb, images, all_idx, pos))
        return _common.patch_scores(x, [block_parts(b) for b in layers], _info(emb)[0], sink, return_flagged, blocks)


# ---------------------------------------------------------------- ragged keep lists
RAGGED_CLASSES = (
    "ViTModel",
    "ViTForImageClassification",
    "DeiTModel",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
    "Dinov2Model",
    "Dinov2ForImageClassification",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "SiglipVisionModel",
)


def _base_class_name(model) -> str:
    return next(c.__name__ for c in type(model).__mro__ if not issubclass(c, KeepForwardMixin))


def forward_ragged(model, images, keep_idx, n, pos, kwargs):
    """Each image on its own kept patches, packed into one varlen sequence (no padded token in any
    layer), then the class's own norm, pooling and head per image. Returns the class's output type
    with ``last_hidden_state`` padded to the longest image ([B, P + kmax, D], zeros past each image's
    tokens) and the pooled output / logits per image."""
    from transformers import modeling_outputs as mo

    name = _base_class_name(model)
    if name not in RAGGED_CLASSES:
        raise NotImplementedError(
            f"keep_idx: ragged keep lists are supported for {', '.join(RAGGED_CLASSES)}; "
            f"got {name} (pass a [B, K] index tensor)"
        )
    extra = sorted(k for k, v in kwargs.items() if v not in (None, False) and k != "interpolate_pos_encoding")
    if extra:
        raise NotImplementedError(
            f"keep_idx: ragged keep lists take no {', '.join(extra)} (logits / pooled outputs only)"
        )
    emb_name = model._lotus_embeddings
    emb = model.get_submodule(emb_name)
    owner = model.get_submodule(emb_name.rsplit(".", 1)[0] if "." in emb_name else "")
    pre, layers = _encoder_parts(model, emb_name)
    p = _info(emb)[0]
    x, pk, _ = _common.pack(images, keep_idx, n, lambda idx: embed(emb, images.to(_conv(emb).weight.dtype), idx, pos))
    x = pre(x)
    for layer in layers:
        if model.training and getattr(getattr(layer, "drop_path", None), "drop_prob", 0.0) > 0:
            raise NotImplementedError("keep_idx: ragged keep lists do not support DINOv2 drop_path in training")
        x = _common.run_block(block_parts(layer), x, pk)
    x = x[0]
    if hasattr(owner, "layernorm"):  # ViT, DeiT, DINOv2: a final norm on every token
        x = owner.layernorm(x)
    if name.startswith("Siglip"):
        x = owner.post_layernorm(x)
        pooled = _siglip_pool(owner, x, pk) if getattr(owner, "use_head", False) else None
    elif name.startswith("CLIP"):
        pooled = owner.post_layernorm(_common.pool_first(x, pk))
    elif name.startswith("ViT"):
        pooled = owner.pooler(_common.unpack(x, pk)) if getattr(owner, "pooler", None) is not None else None
    elif name.startswith("DeiT"):
        pooled = owner.pooler(_common.unpack(x, pk)) if getattr(owner, "pooler", None) is not None else None
    else:  # Dinov2Model: the class token
        pooled = _common.pool_first(x, pk)
    hidden = _common.unpack(x, pk)
    first = _common.pool_first(x, pk)
    if name == "ViTForImageClassification" or name == "DeiTForImageClassification":
        return mo.ImageClassifierOutput(logits=model.classifier(first))
    if name == "DeiTForImageClassificationWithTeacher":
        second = x[pk.cu[:-1] + 1]
        cls_logits, dist_logits = model.cls_classifier(first), model.distillation_classifier(second)
        return _deit_teacher_output(model, cls_logits, dist_logits)
    if name == "Dinov2ForImageClassification":
        return mo.ImageClassifierOutput(logits=model.classifier(torch.cat([first, _common.pool_mean(x, pk, p)], 1)))
    if name == "CLIPVisionModelWithProjection":
        from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

        return CLIPVisionModelOutput(image_embeds=model.visual_projection(pooled), last_hidden_state=hidden)
    return mo.BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


def _deit_teacher_output(model, cls_logits, dist_logits):
    from transformers.models.deit.modeling_deit import DeiTForImageClassificationWithTeacherOutput

    return DeiTForImageClassificationWithTeacherOutput(
        logits=(cls_logits + dist_logits) / 2, cls_logits=cls_logits, distillation_logits=dist_logits
    )


def _siglip_pool(owner, x, pk):
    """SigLIP's attention-pooling head per image: its probe attends to the image's own tokens only."""
    head = owner.head
    h = _common.unpack(x, pk)
    pad = torch.arange(h.shape[1], device=h.device)[None, :] >= pk.lengths[:, None]
    probe = head.probe.expand(h.shape[0], -1, -1)
    out = head.attention(probe, h, h, key_padding_mask=pad, need_weights=False)[0]
    out = out + head.mlp(head.layernorm(out))
    return out[:, 0]


def patch(model):
    name, emb = _find_embeddings(model)
    if not isinstance(_conv(emb), nn.Conv2d):
        raise ValueError(f"model.{name}: expected a Conv2d patch projection")
    emb.__class__ = _common.patched_class(type(emb), _KeptEmbeddingsMixin, globals(), __name__)
    emb._lotus_keep = None
    emb._lotus_info = _info(emb)
    model.__class__ = _common.patched_class(type(model), KeptPatchesMixin, globals(), __name__)
    model._lotus_embeddings = name
    return model

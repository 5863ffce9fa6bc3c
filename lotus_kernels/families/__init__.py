"""``patch_vit`` for every supported ViT family, dispatched by the model's class.

    timm          timm.models.vision_transformer.VisionTransformer   (lotus_kernels.vit)
    torchvision   torchvision.models.VisionTransformer (vit_b_16, ...) (families.torchvision)
    hf            transformers ViT / DeiT / DINOv2 / CLIP-vision / SigLIP-vision models (families.hf)
    open_clip     open_clip.transformer.VisionTransformer (a CLIP model's .visual)  (families.open_clip)

Same contract for each: ``model(images)`` is the model's own forward, untouched;
``model(images, keep_idx=idx)`` / ``keep_ratio=r`` (+ ``scores=s``) / ragged ``keep_idx=[...]``
run the network on the kept patches only (never embedded otherwise, train and eval mode alike);
``model.patch_scores(images)`` gives [B, N] last-block attention scores. The model's class is swapped
for a ``Lotus<Class>`` subclass: parameters, ``state_dict`` and ``torch.save`` are as before.
"""

from __future__ import annotations

from torch import nn

FAMILIES = ("timm", "torchvision", "hf", "open_clip")


def _family(model):
    """(name, module) of the family ``model`` belongs to, or None."""
    from .. import vit
    from . import torchvision as tv

    if vit.VisionTransformer is not None and isinstance(model, vit.VisionTransformer):
        return "timm", None
    if tv.CLASSES and isinstance(model, tv.CLASSES):
        return "torchvision", tv
    # by the defining modules of the class and its bases (a patched model's class is Lotus<Class>)
    mods = {c.__module__.split(".", 1)[0] for c in type(model).__mro__}
    if "transformers" in mods:
        from . import hf

        if isinstance(model, hf.classes()):
            return "hf", hf
    if "open_clip" in mods:
        from . import open_clip

        if isinstance(model, open_clip.classes()):
            return "open_clip", open_clip
    return None


SUPPORTED = (
    "timm VisionTransformer; torchvision VisionTransformer; transformers ViT/DeiT/Dinov2/CLIPVision/"
    "SiglipVision models; open_clip VisionTransformer (a CLIP model's .visual)"
)


def patch_vit(model: nn.Module) -> nn.Module:
    """Give ``model`` the kept-patch forward and ``patch_scores`` (in place; returns the model)."""
    fam = _family(model)
    if fam is None:
        raise TypeError(
            f"model: patch_vit does not support {type(model).__module__}.{type(model).__qualname__}; "
            f"supported: {SUPPORTED}"
        )
    name, module = fam
    if name == "timm":
        from ..vit import patch_vit as patch_timm

        return patch_timm(model)
    return module.patch(model)


def head_names(model: nn.Module) -> set[str]:
    """Module names of the classifier / projection heads of every family model inside ``model`` (itself
    included), kept dense by sparsify_ by default."""
    names = set()
    for prefix, sub in model.named_modules():
        fam = _family(sub)
        if fam is None or fam[1] is None:
            continue
        own = sub.named_modules()
        heads = (
            fam[1].head_names(sub)
            if hasattr(fam[1], "head_names")
            else {n for n, _ in own if n.rsplit(".", 1)[-1] in fam[1].HEAD_NAMES}
        )
        names.update(f"{prefix}.{n}" if prefix else n for n in heads)
    return names

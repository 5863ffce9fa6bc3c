"""``patch_vit``: run a timm ``VisionTransformer`` on the kept patches only.

After ``patch_vit(model)``:
  model(images)                               unchanged (timm's own forward)
  model(images, keep_idx=idx)                 the whole network on patches idx [B, K] (prefix tokens kept)
  model(images, keep_ratio=r, scores=s)       keep the top ceil(r*N) patches by s [B, N]
  model(images, keep_ratio=r)                 keep a uniformly random ceil(r*N) patches per image
  model(images, keep_idx=[idx_0, idx_1, ...]) ragged: image i keeps patches idx_i (1-D int64, its own
                                              length >= 1; an empty list is an error), all images packed
                                              into one varlen sequence (vit_ragged.py)
  model.patch_scores(images)                  [B, N] last-block (or mean-of-blocks) class-token attention (vit_scores.py)

Dropped patches are never embedded (``ops.patch_embed_gather``) and never enter a block, in train
and eval mode alike (timm's ``PatchDropout`` only acts in training and embeds every patch first).
The model's class is swapped for a subclass defined in this module, so ``torch.save(model)`` and
``state_dict`` work as before (the parameters are untouched). torch.fx traces, and TorchScript
compiles, timm's own forward (``_keep_forward``, docs/design/fx_torchscript.md).
"""

from __future__ import annotations

import torch
from torch import nn

from . import _checks
from ._keep_forward import KeepForwardMixin
from .ops import gather_tokens, patch_embed_gather
from .select import random_keep, select_keep
from .vit_ragged import forward_ragged
from .vit_scores import vit_patch_scores

try:
    from timm.models.vision_transformer import VisionTransformer
except ImportError:  # timm is a dependency, but keep the kernels importable without it
    VisionTransformer = None


class KeptPatchesMixin(KeepForwardMixin):
    """Adds the kept-patch path to a timm VisionTransformer subclass. Each subclass gets a ``forward``
    on top of the base class's (``_keep_forward``): ``forward(images, ..., *, keep_idx=None,
    keep_ratio=None, scores=None)``. torch.fx traces and TorchScript scripts the base forward."""

    _lotus_family = "timm"
    _forward_doc = """forward(images, *args, keep_idx=None, keep_ratio=None, scores=None, **kwargs)

    Without keep_idx / keep_ratio: the model's own forward on (images, *args, **kwargs). With them: the
    network on the kept patches only (see ``lotus_kernels.vit``). torch.fx traces and TorchScript
    compiles the model's own forward (see ``lotus_kernels._keep_forward``)."""

    def forward_keep(self, args: tuple, kwargs: dict, keep_idx, keep_ratio, scores):
        """The base forward on (args, kwargs) when no keep argument is given, else the kept-patch path."""
        if keep_idx is None and keep_ratio is None:
            if scores is not None:
                raise ValueError("scores: given without keep_ratio; pass keep_ratio=r to keep the top patches")
            return super().forward(*args, **kwargs)
        x = self._images_only(args, kwargs)
        if isinstance(keep_idx, (list, tuple)):
            if keep_ratio is not None or scores is not None:
                raise ValueError("keep_idx: give either keep_idx or keep_ratio (+ scores), not both")
            _checks.tensor("images", x, ndim=4)
            return forward_ragged(self, x, keep_idx)
        keep_idx = self.keep_indices(x, keep_idx=keep_idx, keep_ratio=keep_ratio, scores=scores)
        return self.forward_head(self.forward_features_kept(x, keep_idx))

    def patch_scores(
        self, images: torch.Tensor, sink: str | None = "first", *, blocks: str = "last", return_flagged: bool = False
    ):
        """[B, N] patch scores from the last block's class-token attention (``blocks="mean"``: the
        mean over every block's), with the attention-sink rule ``sink`` (None / "first" / "outlier" /
        "norm", see ``vit_scores``)."""
        return vit_patch_scores(self, images, sink, blocks=blocks, return_flagged=return_flagged)

    def keep_indices(self, images, *, keep_idx=None, keep_ratio=None, scores=None) -> torch.Tensor:
        """The [B, K] patch indices the kept-patch path will use."""
        n = self.patch_embed.num_patches
        _checks.tensor("images", images, ndim=4)
        if isinstance(keep_idx, (list, tuple)):
            raise ValueError(
                "keep_idx: a ragged list of index tensors has no single [B, K] index; call the model with it instead"
            )
        if keep_idx is not None:
            if keep_ratio is not None or scores is not None:
                raise ValueError("keep_idx: give either keep_idx or keep_ratio (+ scores), not both")
            _checks.index_tensor("keep_idx", keep_idx, batch=images.shape[0], batch_name="images")
            return keep_idx
        if scores is None:
            return random_keep(images.shape[0], n, keep_ratio, device=images.device)
        _checks.tensor("scores", scores, ndim=2)
        if tuple(scores.shape) != (images.shape[0], n):
            raise ValueError(
                f"scores: expected shape ({images.shape[0]}, {n}) (one score per patch), got {tuple(scores.shape)}"
            )
        return select_keep(scores, keep_ratio).to(images.device)

    def embed_kept(self, images: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """Prefix tokens + embeddings of the kept patches, positional embedding added: [B, P + K, D]."""
        pe = self.patch_embed
        if pe.strict_img_size and tuple(images.shape[-2:]) != tuple(pe.img_size):
            raise ValueError(f"images: expected spatial size {tuple(pe.img_size)}, got {tuple(images.shape[-2:])}")
        n_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        pos = self.pos_embed
        pos_prefix = None if pos is None or n_prefix == 0 else pos[:, :n_prefix]
        pos_patch = None if pos is None else pos[:, n_prefix:]
        if isinstance(pe.norm, nn.Identity):
            x = patch_embed_gather(images, keep_idx, pe.proj.weight, pe.proj.bias, pos_patch)
        else:  # the norm sits between projection and positional embedding: cannot fuse the add
            x = pe.norm(patch_embed_gather(images, keep_idx, pe.proj.weight, pe.proj.bias))
            if pos_patch is not None:
                x = x + gather_tokens(pos_patch.expand(x.shape[0], -1, -1), keep_idx)
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        if prefix:
            p = torch.cat(prefix, dim=1)
            x = torch.cat([p if pos_prefix is None else p + pos_prefix, x], dim=1)
        return self.pos_drop(x)

    def forward_features_kept(self, images: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(self.embed_kept(images, keep_idx))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            from timm.models._manipulate import checkpoint_seq

            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)


_patched_classes: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if issubclass(cls, KeptPatchesMixin):
        return cls
    if cls not in _patched_classes:
        name = f"Lotus{cls.__name__}"
        if name in globals() and globals()[name] not in _patched_classes.values():
            raise TypeError(f"model: cannot patch {cls.__module__}.{cls.__qualname__}: name {name} is taken")
        # Defined at module level under a stable name so that pickling (torch.save) finds it.
        new = type(name, (KeptPatchesMixin, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = new
        _patched_classes[cls] = new
    return _patched_classes[cls]


if VisionTransformer is not None:
    LotusVisionTransformer = _patched_class(VisionTransformer)


def _check_supported(model) -> None:
    if VisionTransformer is None:
        raise ImportError("patch_vit needs timm (pip install timm)")
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model: expected a timm VisionTransformer, got {type(model).__name__}")
    pe = model.patch_embed
    proj = getattr(pe, "proj", None)
    if (
        not isinstance(proj, nn.Conv2d)
        or tuple(proj.stride) != tuple(proj.kernel_size)
        or any(proj.padding)
        or proj.groups != 1
        or tuple(proj.dilation) != (1, 1)
    ):
        raise ValueError("model.patch_embed.proj: expected a non-overlapping Conv2d (stride == kernel, no padding)")
    if getattr(model, "dynamic_img_size", False) or getattr(pe, "dynamic_img_pad", False):
        raise ValueError("model: dynamic_img_size / dynamic_img_pad ViTs are not supported by patch_vit")
    if not getattr(pe, "flatten", True) or getattr(pe, "output_fmt", "NCHW") not in ("NCHW", "NLC") and pe.flatten:
        raise ValueError("model.patch_embed: expected a flattening patch embedding (timm default)")


def patch_vit(model: nn.Module) -> nn.Module:
    """Give a timm ``VisionTransformer`` the kept-patch forward (in place; returns the model)."""
    _check_supported(model)
    model.__class__ = _patched_class(type(model))
    return model

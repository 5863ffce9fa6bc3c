"""Stage 2, model: a timm ViT by name, or the small default ViT, patched for kept-patch training.

``--model lotus_vit`` (the default) is a timm ``VisionTransformer`` at the data's native resolution
(patch 4 on 32x32: 64 patches), small enough to pretrain on 2 CPU cores. Any other name goes to
``timm.create_model`` (``--pretrained`` fetches timm's weights where the hub is reachable).
``--checkpoint PATH`` loads local weights with ``weights_only=True``.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from lotus_kernels import patch_vit, sparsify_

from .errors import LotusError

DEFAULT_MODEL = "lotus_vit"


def build(cfg: dict, num_classes: int, img_size: int) -> VisionTransformer:
    """A fresh model for ``cfg`` (weights: random, ``--pretrained`` or ``--checkpoint``), patched."""
    name = cfg["model"]
    if name == DEFAULT_MODEL:
        if cfg.get("pretrained"):
            raise LotusError(f"--pretrained: there are no pretrained weights for {DEFAULT_MODEL}; "
                             "name a timm model with --model (e.g. vit_tiny_patch16_224)")
        if img_size % cfg["patch_size"]:
            raise LotusError(f"--patch-size: {cfg['patch_size']} does not divide the image size {img_size}")
        model = VisionTransformer(img_size=img_size, patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"],
                                  depth=cfg["depth"], num_heads=cfg["heads"], mlp_ratio=cfg["mlp_ratio"],
                                  num_classes=num_classes)
    else:
        try:
            model = timm.create_model(name, pretrained=bool(cfg.get("pretrained")), num_classes=num_classes,
                                      img_size=img_size)
        except Exception as e:
            if "Unknown model" in str(e):
                raise LotusError(f"--model: timm has no model {name!r}")
            if not cfg.get("pretrained"):
                raise LotusError(f"--model {name}: {type(e).__name__}: {e}".splitlines()[0])
            # the hub is unreachable, or has no weights under that name
            raise LotusError(f"--pretrained: cannot fetch timm weights for {name} ({type(e).__name__}: {e}); "
                             "offline, pass --checkpoint PATH or train from scratch".splitlines()[0])
        if not isinstance(model, VisionTransformer):
            raise LotusError(f"--model: {name} is a {type(model).__name__}, expected a timm VisionTransformer")
    if cfg.get("checkpoint"):
        load_checkpoint(model, cfg["checkpoint"])
    return patch_vit(model)


def _state_dict_of(obj) -> dict:
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("expected a state_dict (name -> tensor), or a dict with one under 'model'")
    return obj


def load_checkpoint(model: torch.nn.Module, path) -> None:
    """Local weights into ``model``; a missing, corrupt or mismatched file is a LotusError."""
    path = Path(path)
    if not path.is_file():
        raise LotusError(f"--checkpoint: file not found: {path}")
    try:
        sd = _state_dict_of(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:
        raise LotusError(f"--checkpoint: cannot read {path} ({type(e).__name__}: {e})".splitlines()[0])
    # Checkpoints of a sparsified model carry masks: a pruned layer's weight is already zero there.
    sd = {k: v for k, v in sd.items() if not k.endswith(".mask")}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise LotusError(f"--checkpoint: {path} does not match the model: {detail[:300]}")


def with_masks(model, masks: dict | None):
    """``model`` with ``masks`` applied through ``sparsify_`` (MaskedLinear layers), or as is."""
    return sparsify_(model, masks=masks) if masks else model


def count_sparsity(masks: dict) -> float:
    """Fraction of pruned weights over all masked layers."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / max(total, 1)

"""Stage 2, model: a timm ViT by name, or the small default ViT, patched for kept-patch training.

``--model lotus_vit`` (the default) is a timm ``VisionTransformer`` at the data's native resolution
(patch 4 on 32x32: 64 patches), small enough to pretrain on 2 CPU cores; its data config (input
size, CIFAR mean / std) is attached as timm's ``pretrained_cfg``, so every model's transform comes
from ``timm.data.resolve_model_data_config``. Any other name goes to ``timm.create_model`` at its
own input size (``--img-size`` overrides); ``--pretrained`` fetches timm's weights where the hub is
reachable.

``--checkpoint`` loads local weights (``weights_only``): a file (``.safetensors``, or a torch file
holding a state_dict, or a dict with it under ``state_dict`` / ``model`` and optionally the data
config under ``pretrained_cfg``), or a directory in the hub's layout (``config.json`` with
``pretrained_cfg`` + ``model.safetensors`` or ``pytorch_model.bin``). Weights pass through timm's
``checkpoint_filter_fn`` (position embeddings resampled to the model's grid); a classifier with
another number of classes is replaced by a fresh head (fine-tuning a pretrained model on new
labels); any other mismatch is an error.

Other ViT families (``model_families.py``): ``--model tv:vit_b_16`` (torchvision, ``--checkpoint`` a local
state_dict), ``hf:DIR`` (a transformers model saved in a local directory: config, weights and
preprocessor config), ``open_clip:ViT-B-32`` (``--checkpoint`` a local open_clip file). Their input
size and normalisation come from the model's own config.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from lotus_kernels import patch_vit, sparsify_

from . import data as data_mod
from . import model_families as families
from .errors import LotusError

DEFAULT_MODEL = "lotus_vit"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")


def build(cfg: dict, num_classes: int, img_size: int | None) -> VisionTransformer:
    """A fresh model for ``cfg`` (weights: random, ``--pretrained`` or ``--checkpoint``), patched.

    ``img_size`` None: the model's own input size (timm models; ``lotus_vit`` needs a size)."""
    name = cfg["model"]
    if families.is_family_spec(name):
        return families.build(cfg, num_classes, img_size)
    if name == DEFAULT_MODEL:
        if cfg.get("pretrained"):
            raise LotusError(
                f"--pretrained: there are no pretrained weights for {DEFAULT_MODEL}; "
                "name a timm model with --model (e.g. vit_tiny_patch16_224)"
            )
        img_size = int(img_size or 32)
        if img_size % cfg["patch_size"]:
            raise LotusError(f"--patch-size: {cfg['patch_size']} does not divide the image size {img_size}")
        model = VisionTransformer(
            img_size=img_size,
            patch_size=cfg["patch_size"],
            embed_dim=cfg["embed_dim"],
            depth=cfg["depth"],
            num_heads=cfg["heads"],
            mlp_ratio=cfg["mlp_ratio"],
            num_classes=num_classes,
        )
        model.pretrained_cfg = data_mod.default_config(img_size)
    else:
        kwargs = {} if img_size is None else {"img_size": int(img_size)}
        try:
            model = timm.create_model(name, pretrained=bool(cfg.get("pretrained")), num_classes=num_classes, **kwargs)
        except Exception as e:
            if "Unknown model" in str(e):
                raise LotusError(f"--model: timm has no model {name!r}")
            if not cfg.get("pretrained"):
                raise LotusError(f"--model {name}: {type(e).__name__}: {e}".splitlines()[0])
            # the hub is unreachable, or has no weights under that name
            raise LotusError(
                f"--pretrained: cannot fetch timm weights for {name} ({type(e).__name__}: {e}); "
                "offline, pass --checkpoint PATH or train from scratch".splitlines()[0]
            )
        if not isinstance(model, VisionTransformer):
            raise LotusError(
                f"--model: {name} is a {type(model).__name__}, expected a timm VisionTransformer "
                "(e.g. vit_tiny_patch16_224, vit_base_patch16_224.augreg_in21k)"
            )
        size = model.patch_embed.img_size
        patch = model.patch_embed.patch_size
        if size[0] % patch[0] or size[1] % patch[1]:
            raise LotusError(f"--img-size: {size[0]} is not a multiple of {name}'s patch size {patch[0]}")
    if cfg.get("checkpoint"):
        load_checkpoint(model, cfg["checkpoint"])
    return patch_vit(model)


def data_config(model, cfg: dict) -> dict:
    """The model's data config (timm's ``resolve_model_data_config``): its input size, and the
    interpolation / crop / mean / std of its pretrained config or checkpoint; ``--crop-pct``
    overrides the crop."""
    from timm.data import resolve_model_data_config

    if isinstance(model, families.FamilyViT):
        conf = dict(model.pretrained_cfg)
        if cfg.get("crop_pct") is not None:
            conf["crop_pct"] = cfg["crop_pct"]
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in conf.items() if k in data_mod.CONFIG_KEYS}
    args = {"input_size": (3, *model.patch_embed.img_size)}
    if cfg.get("crop_pct") is not None:
        args["crop_pct"] = cfg["crop_pct"]
    conf = resolve_model_data_config(model, args=args)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in conf.items() if k in data_mod.CONFIG_KEYS}


# ---------------------------------------------------------------- checkpoints
def _weights_and_config(path: Path):
    """(state_dict, data config from the checkpoint or None) of a checkpoint file or hub directory."""
    conf = None
    if path.is_dir():
        cj = path / "config.json"
        if cj.is_file():
            try:
                conf = json.loads(cj.read_text()).get("pretrained_cfg")
            except (ValueError, AttributeError) as e:
                raise LotusError(f"--checkpoint: cannot read {cj} ({type(e).__name__}: {e})".splitlines()[0])
        files = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
        if not files:
            raise LotusError(f"--checkpoint: directory {path} holds none of {', '.join(WEIGHT_FILES)}")
        path = files[0]
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LotusError(f"--checkpoint: cannot read {path} ({type(e).__name__}: {e})".splitlines()[0])
    if isinstance(obj, dict) and isinstance(obj.get("pretrained_cfg"), dict):
        conf = obj["pretrained_cfg"]
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LotusError(
            f"--checkpoint: {path} holds no state_dict (name -> tensor), nor one under 'state_dict' or 'model'"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}, conf


def load_checkpoint(model: torch.nn.Module, path) -> dict:
    """Local weights into ``model`` (and the checkpoint's data config into its ``pretrained_cfg``);
    a missing, corrupt or mismatched checkpoint is a LotusError. Returns what was done."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(path)
    if not path.exists():
        raise LotusError(f"--checkpoint: file not found: {path}")
    sd, conf = _weights_and_config(path)
    # Checkpoints of a sparsified model carry masks: a pruned layer's weight is already zero there.
    sd = {k: v for k, v in sd.items() if not k.endswith(".mask")}
    try:
        sd = checkpoint_filter_fn(sd, model)
    except Exception as e:
        raise LotusError(f"--checkpoint: {path} does not match the model ({type(e).__name__}: {e})".splitlines()[0])
    info = {"head": "loaded"}
    head = model.get_classifier()
    hw = sd.get("head.weight")
    if (
        isinstance(head, torch.nn.Linear)
        and hw is not None
        and hw.ndim == 2
        and hw.shape[1] == head.in_features
        and hw.shape[0] != head.out_features
    ):
        # a pretrained classifier for other labels: keep the model's fresh head
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        sd.update({f"head.{k}": v for k, v in head.state_dict().items()})
        info["head"] = f"new ({hw.shape[0]} classes in the checkpoint, {head.out_features} in the data)"
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise LotusError(f"--checkpoint: {path} does not match the model: {detail[:300]}")
    if conf:
        bad = [k for k in ("mean", "std") if k in conf and len(conf[k]) != 3]
        if bad:
            raise LotusError(f"--checkpoint: {path}'s pretrained_cfg {bad[0]} must have 3 values, got {conf[bad[0]]}")
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **conf}
        info["data_config"] = "checkpoint"
    return info


def with_masks(model, masks: dict | None):
    """``model`` with ``masks`` applied through ``sparsify_`` (MaskedLinear layers), or as is."""
    return sparsify_(model, masks=masks) if masks else model


def count_sparsity(masks: dict) -> float:
    """Fraction of pruned weights over all masked layers."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / max(total, 1)

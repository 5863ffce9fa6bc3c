"""``--model`` for the other ViT families: ``tv:NAME``, ``hf:DIR``, ``open_clip:NAME``.

The pipeline speaks to a timm-shaped classifier (``patch_embed.{img_size, patch_size, num_patches}``,
``num_prefix_tokens``, ``pretrained_cfg``, ``patch_drop``, logits out, ``patch_scores``); ``FamilyViT``
gives a patched model of another family that surface, so nothing else in ``lotus/`` changes.

  tv:vit_b_16         torchvision's builder with ``num_classes``; ``--checkpoint``: a local state_dict
                      (torchvision's keys; a classifier for other labels is replaced). Data config:
                      the default weights' transforms (resize 256, crop 224, ImageNet mean / std)
  hf:DIR              a transformers model saved in DIR (config.json + weights, preprocessor_config.json
                      for mean / std / size / resample); ViT / DeiT / DINOv2 load as image classifiers
                      with ``num_labels`` (a mismatched head is re-initialised), CLIP / SigLIP as the
                      vision tower + a fresh linear head on the pooled output
  open_clip:ViT-B-32  open_clip's config; ``--checkpoint``: a local open_clip checkpoint; the image
                      tower + a fresh linear head on its embedding; data config: the tower's
                      ``preprocess_cfg`` (mean / std / size / interpolation)
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from lotus_kernels import patch_vit
from lotus_kernels.select import random_keep

from .errors import LotusError

PREFIXES = ("tv:", "hf:", "open_clip:")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "lanczos"}


def is_family_spec(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIXES)


class FamilyViT(nn.Module):
    """A patched ViT of another family as the pipeline's classifier: ``net`` (+ ``head`` on its
    pooled output where the model has no classifier). ``patch_drop`` (timm's PatchDropout, set by the
    patch-dropout baseline) drops the same number of random patches in training, through the kept path."""

    def __init__(
        self,
        net: nn.Module,
        *,
        img_size: int,
        patch_size: int,
        num_prefix_tokens: int,
        pretrained_cfg: dict,
        head: nn.Module | None = None,
        call_kwargs: dict | None = None,
    ):
        super().__init__()
        self.net = net
        self.head = head
        n = (img_size // patch_size) ** 2
        self.patch_embed = SimpleNamespace(
            img_size=(img_size, img_size), patch_size=(patch_size, patch_size), num_patches=n
        )
        self.num_prefix_tokens = num_prefix_tokens
        self.pretrained_cfg = pretrained_cfg
        self.patch_drop = nn.Identity()
        self.call_kwargs = dict(call_kwargs or {})

    def _logits(self, out):
        if not isinstance(out, torch.Tensor):
            out = out.logits if getattr(out, "logits", None) is not None else out.pooler_output
        return out if self.head is None else self.head(out)

    def forward(self, images, keep_idx=None, keep_ratio=None, scores=None):
        prob = getattr(self.patch_drop, "prob", 0.0)
        if keep_idx is None and keep_ratio is None and self.training and prob > 0:
            n = self.patch_embed.num_patches
            k = max(1, int(n * (1.0 - prob)))  # timm PatchDropout's count
            keep_idx = random_keep(images.shape[0], n, k / n, device=images.device)
        return self._logits(
            self.net(images, keep_idx=keep_idx, keep_ratio=keep_ratio, scores=scores, **self.call_kwargs)
        )

    def patch_scores(self, images, sink="first", *, blocks="last", return_flagged=False):
        return self.net.patch_scores(images, sink, blocks=blocks, return_flagged=return_flagged, **self.call_kwargs)

    # timm's classifier surface, which the linear probe (lotus/probe.py) and checkpoint loading use.
    def _classifier_slot(self) -> tuple[nn.Module, str]:
        """(parent, attribute) of the final linear layer: our head (open_clip, CLIP / SigLIP towers),
        torchvision's ``heads.head``, or transformers' ``classifier``."""
        if self.head is not None:
            return self, "head"
        heads = getattr(self.net, "heads", None)
        if heads is not None and hasattr(heads, "head"):
            return heads, "head"
        if hasattr(self.net, "classifier"):
            return self.net, "classifier"
        raise TypeError(f"{type(self.net).__name__}: no classifier layer found (heads.head / classifier)")

    def get_classifier(self) -> nn.Module:
        parent, name = self._classifier_slot()
        return getattr(parent, name)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh linear classifier for ``num_classes`` on the same features (timm's method)."""
        parent, name = self._classifier_slot()
        old = getattr(parent, name)
        setattr(parent, name, nn.Linear(old.in_features, num_classes).to(old.weight.device, old.weight.dtype))

    def forward_features(self, images):
        """Pre-logits features [B, D]: the forward with the classifier replaced by the identity (the
        net's own pooling, e.g. DINOv2's class token + mean patch token, stays)."""
        parent, name = self._classifier_slot()
        head = getattr(parent, name)
        setattr(parent, name, nn.Identity())
        try:
            return self.forward(images)
        finally:
            setattr(parent, name, head)

    def forward_head(self, features, pre_logits: bool = False):
        return features if pre_logits else self.get_classifier()(features)


def build(cfg: dict, num_classes: int, img_size: int | None) -> FamilyViT:
    name = cfg["model"]
    if cfg.get("pretrained"):
        raise LotusError(
            f"--pretrained: not used with --model {name}; give local weights with "
            + ("the hf: directory" if name.startswith("hf:") else "--checkpoint PATH")
        )
    kind, _, arg = name.partition(":")
    if not arg:
        raise LotusError(f"--model: {name!r} names no model after '{kind}:'")
    if kind == "tv":
        return _torchvision(arg, num_classes, img_size, cfg.get("checkpoint"))
    if kind == "hf":
        if cfg.get("checkpoint"):
            raise LotusError("--checkpoint: not used with --model hf:DIR (the weights are DIR's)")
        return _hf(Path(arg), num_classes, img_size)
    return _open_clip(arg, num_classes, img_size, cfg.get("checkpoint"))


def _check_size(name, img_size, native):
    if img_size is not None and int(img_size) != native:
        raise LotusError(
            f"--img-size: {name} runs at its own size {native} (no position-embedding interpolation), got {img_size}"
        )


def _load_state(model: nn.Module, path, head_prefix: str) -> None:
    """A local state_dict into ``model``; a classifier (``head_prefix``) for other labels keeps the
    model's fresh one."""
    path = Path(path)
    if not path.is_file():
        raise LotusError(f"--checkpoint: file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LotusError(f"--checkpoint: cannot read {path} ({type(e).__name__}: {e})".splitlines()[0])
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    own = model.state_dict()
    for k in [k for k in sd if k.startswith(head_prefix)]:
        if k in own and sd[k].shape != own[k].shape:  # other labels: the fresh head stays
            sd[k] = own[k]
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise LotusError(f"--checkpoint: {path} does not match the model: {' '.join(str(e).split())[:300]}")


def _torchvision(arch: str, num_classes: int, img_size, checkpoint) -> FamilyViT:
    import torchvision.models as tvm
    from torchvision.models.vision_transformer import VisionTransformer

    try:
        net = tvm.get_model(arch, weights=None, num_classes=num_classes)
    except ValueError:
        raise LotusError(f"--model: torchvision has no model {arch!r} (e.g. tv:vit_b_16)")
    if not isinstance(net, VisionTransformer):
        raise LotusError(f"--model: tv:{arch} is a {type(net).__name__}, expected a torchvision VisionTransformer")
    _check_size(f"tv:{arch}", img_size, net.image_size)
    if checkpoint:
        _load_state(net, checkpoint, "heads.")
    t = tvm.get_model_weights(arch).DEFAULT.transforms()
    conf = {
        "input_size": (3, net.image_size, net.image_size),
        "interpolation": t.interpolation.value,
        "mean": tuple(t.mean),
        "std": tuple(t.std),
        "crop_pct": t.crop_size[0] / t.resize_size[0],
        "crop_mode": "center",
    }
    return FamilyViT(
        patch_vit(net), img_size=net.image_size, patch_size=net.patch_size, num_prefix_tokens=1, pretrained_cfg=conf
    )


def _hf_data_config(path: Path, size: int) -> dict:
    mean, std, resample, crop_pct = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 1.0
    pp = path / "preprocessor_config.json"
    if pp.is_file():
        try:
            p = json.loads(pp.read_text())
        except ValueError as e:
            raise LotusError(f"--model: cannot read {pp} ({e})")
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
        resample = PIL_RESAMPLE.get(p.get("resample"), resample)
        resize = p.get("size") or {}
        crop = p.get("crop_size") or {}
        short = resize.get("shortest_edge") if isinstance(resize, dict) else None
        if p.get("do_center_crop") and short and crop.get("height"):
            crop_pct = crop["height"] / short
    return {
        "input_size": (3, size, size),
        "interpolation": resample,
        "mean": mean,
        "std": std,
        "crop_pct": crop_pct,
        "crop_mode": "center",
    }


def _hf(path: Path, num_classes: int, img_size) -> FamilyViT:
    try:
        import transformers
    except ImportError:
        raise LotusError("--model hf:...: needs transformers (pip install lotus-kernels[hf])")
    if not (path / "config.json").is_file():
        raise LotusError(f"--model: hf:{path} is not a local transformers directory (no config.json)")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a re-initialised head is expected: no load report per build
    try:
        conf = transformers.AutoConfig.from_pretrained(path)
        kind = conf.model_type
        if kind in ("clip", "clip_vision_model", "siglip", "siglip_vision_model"):
            cls = transformers.CLIPVisionModel if kind.startswith("clip") else transformers.SiglipVisionModel
            net = cls.from_pretrained(path)
            head = nn.Linear(net.config.hidden_size, num_classes)
        else:
            conf.num_labels = num_classes  # a classifier for other labels is re-initialised
            net = transformers.AutoModelForImageClassification.from_pretrained(
                path, config=conf, ignore_mismatched_sizes=True
            )
            head = None
    except (OSError, ValueError) as e:
        raise LotusError(f"--model: cannot load hf:{path} ({type(e).__name__}: {e})".splitlines()[0])
    finally:
        transformers.logging.set_verbosity(verbosity)
    vc = net.config
    native, patch = int(vc.image_size), int(vc.patch_size)
    size = native if img_size is None else int(img_size)
    if size % patch:
        raise LotusError(f"--img-size: {size} is not a multiple of hf:{path}'s patch size {patch}")
    kwargs = {"interpolate_pos_encoding": True} if size != native and kind != "dinov2" else {}
    patch_vit(net)
    emb = net.get_submodule(net._lotus_embeddings)
    prefix = emb._lotus_info[0]
    return FamilyViT(
        net,
        img_size=size,
        patch_size=patch,
        num_prefix_tokens=prefix,
        pretrained_cfg=_hf_data_config(path, size),
        head=head,
        call_kwargs=kwargs,
    )


def _open_clip(arch: str, num_classes: int, img_size, checkpoint) -> FamilyViT:
    try:
        import open_clip
    except ImportError:
        raise LotusError("--model open_clip:...: needs open_clip (pip install lotus-kernels[open_clip])")
    if open_clip.get_model_config(arch) is None:
        raise LotusError(f"--model: open_clip has no model config {arch!r} (e.g. open_clip:ViT-B-32)")
    if checkpoint and not Path(checkpoint).is_file():
        raise LotusError(f"--checkpoint: file not found: {checkpoint}")
    try:
        model = open_clip.create_model(arch, pretrained=str(checkpoint) if checkpoint else None)
    except Exception as e:
        raise LotusError(
            f"--checkpoint: cannot load {checkpoint} into open_clip:{arch} ({type(e).__name__}: {e})".splitlines()[0]
        )
    visual = model.visual
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise LotusError(
            f"--model: open_clip:{arch}'s image tower is a {type(visual).__name__}, expected a VisionTransformer"
        )
    native, patch = int(visual.image_size[0]), int(visual.patch_size[0])
    _check_size(f"open_clip:{arch}", img_size, native)
    pc = getattr(visual, "preprocess_cfg", {}) or {}
    conf = {
        "input_size": (3, native, native),
        "interpolation": pc.get("interpolation", "bicubic"),
        "mean": tuple(pc.get("mean", IMAGENET[0])),
        "std": tuple(pc.get("std", IMAGENET[1])),
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    return FamilyViT(
        patch_vit(visual),
        img_size=native,
        patch_size=patch,
        num_prefix_tokens=1,
        pretrained_cfg=conf,
        head=nn.Linear(visual.output_dim, num_classes),
    )

"""The run's two tasks: a *source* task the start model is pretrained on, and the *target* task that
every later stage (linear probe, tickets, pruning, fine-tuning, evaluation) works on.

From one data set (``--data``) and its seeded train / validation split (``data.load_split``):
  source   the training images of ``source_classes`` (pretraining) and their validation images (the
           pretrained model's accuracy); empty with ``--pretrained`` / ``--checkpoint``, whose
           source task is the checkpoint's own (e.g. ImageNet-21k)
  target   the training images of ``target_classes`` minus a seeded *selection* split
           (``select_fraction`` of them, never trained on, where every choice is made), and their
           validation images (every reported accuracy; they choose nothing)
Labels are renumbered 0..k-1 within each task. With ``canvas`` > 0 every target set is composed on a
``canvas`` x ``canvas`` clutter of its *own* images' pieces (``lotus.canvas``), once per process; the
source images on the same canvas, on a plain background (``source_background``, the default: a model
pretrained on object-centric images, fine-tuned where the object is a minority of the frame) or on
clutter too.
"""

from __future__ import annotations

import json

import torch

from . import canvas as canvas_mod
from . import data as data_mod
from .errors import LotusError
from .rundir import stage_seed

_CACHE: dict = {}  # composed canvases are reused by every stage of a process


def parse_classes(text: str) -> list[int] | str:
    """'0-4' / '5,6,7' / '0-2,7' -> sorted class ids; 'all' and 'none' are kept as words."""
    text = text.strip()
    if text in ("all", "none"):
        return text
    out = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"expected class ids such as 0-4 or 5,6,7 (or all / none), got {text!r}")
    if not out or min(out) < 0:
        raise ValueError(f"expected class ids >= 0, got {text!r}")
    return sorted(out)


def resolve_classes(cfg: dict, num_classes: int) -> None:
    """Fill ``source_classes`` / ``target_classes`` (lists) in ``cfg``: by default, from scratch the
    first half of the classes is the source and the second half the target; with pretrained weights
    the source is the checkpoint's task and the target every class."""
    pretrained = cfg.get("recipe") == "pretrained"
    src, tgt = cfg.get("source_classes"), cfg.get("target_classes")
    half = num_classes // 2
    if tgt in (None, "auto"):
        tgt = "all" if pretrained else list(range(half, num_classes))
    if src in (None, "auto"):
        src = "none" if pretrained else list(range(half))
    tgt = list(range(num_classes)) if tgt == "all" else tgt
    src = [] if src == "none" else list(range(num_classes)) if src == "all" else src
    for name, cl in (("--source-classes", src), ("--target-classes", tgt)):
        bad = [c for c in cl if c >= num_classes]
        if bad:
            raise LotusError(f"{name}: class {bad[0]} does not exist; the data has classes 0..{num_classes - 1}")
    if len(tgt) < 2:
        raise LotusError(f"--target-classes: the target task needs at least 2 classes, got {tgt}")
    if len(src) == 1:
        raise LotusError(f"--source-classes: the source task needs at least 2 classes (or none), got {src}")
    cfg["source_classes"], cfg["target_classes"] = src, tgt


def check_source(cfg: dict) -> None:
    """A one-line LotusError if the resolved source task cannot produce the start model."""
    if cfg["source_classes"]:
        return
    if cfg.get("recipe") != "pretrained":
        raise LotusError(
            "--source-classes none: a model trained from scratch needs a source task "
            "(or pass --checkpoint / --pretrained)"
        )
    if cfg.get("pretrain_epochs"):
        raise LotusError(
            "--pretrain-epochs: no source classes to pretrain on (pass --source-classes, or "
            "--pretrain-epochs 0 to start from the checkpoint as it is)"
        )


def _canvas(images: data_mod.ImageSet, cfg: dict, name: str) -> data_mod.ImageSet:
    size = cfg.get("canvas") or 0
    if not size:
        return images
    if not images.source.in_memory:
        raise LotusError("--canvas: needs images held in memory (a .npz file or cifar10), not an ImageFolder")
    x = images.source.batch(images.index)
    side = cfg.get("image_side") or x.shape[-1]
    if x.shape[-1] != side:  # other data (``lotus evaluate``): objects at the run's size, then its canvas
        x = (
            torch.nn.functional.interpolate(
                x.float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False
            )
            .round()
            .clamp(0, 255)
            .to(torch.uint8)
        )
    background = cfg.get("source_background", "plain") if name.startswith("source/") else "clutter"
    canv, boxes = canvas_mod.compose(
        x, size, seed=stage_seed(cfg["seed"], f"canvas/{name}"), tile=cfg.get("canvas_tile"), background=background
    )
    src = data_mod.TensorSource(
        canv, images.y.clone(), images.num_classes, f"{images.source.name}@canvas{size}", boxes=boxes
    )
    return data_mod.ImageSet(src, torch.arange(len(images)), images.config, images.workers)


def _key(cfg: dict, what: str) -> str:
    return what + json.dumps({k: v for k, v in cfg.items() if k != "data_config"}, sort_keys=True, default=str)


def _split(cfg, split):
    return split or data_mod.load_split(cfg)


def target_sets(cfg: dict, split=None):
    """(train, select, val) of the target task. ``select`` is a seeded ``select_fraction`` of the
    target's training images, held out of all training; with fraction 0 it is the validation set
    itself (the report says so). ``split``: ``data.load_split(cfg)`` when already loaded."""
    key = _key(cfg, "target")
    if key in _CACHE and split is None:
        return _CACHE[key]
    tr, va = (s.for_classes(cfg["target_classes"]) for s in _split(cfg, split))
    for name, s in (("--target-classes", tr), ("--val-fraction", va)):
        if len(s) < 2:
            raise LotusError(f"{name}: the target task has {len(s)} image(s) in this split; need at least 2")
    frac = cfg.get("select_fraction", 0.0)
    if frac:
        n = len(tr)
        n_sel = max(1, round(frac * n))
        if n - n_sel < 1:
            raise LotusError(f"--select-fraction: {frac} leaves no training images")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(stage_seed(cfg["seed"], "select")))
        tr, sel = tr.subset(perm[n_sel:].sort().values), tr.subset(perm[:n_sel].sort().values)
        out = (_canvas(tr, cfg, "target/train"), _canvas(sel, cfg, "target/select"), _canvas(va, cfg, "target/val"))
    else:
        va = _canvas(va, cfg, "target/val")
        out = (_canvas(tr, cfg, "target/train"), va, va)
    if split is None:
        _CACHE[key] = out
    return out


def source_sets(cfg: dict, split=None):
    """(train, val) of the source task (None, None without source classes)."""
    if not cfg["source_classes"]:
        return None, None
    key = _key(cfg, "source")
    if key in _CACHE and split is None:
        return _CACHE[key]
    tr, va = (s.for_classes(cfg["source_classes"]) for s in _split(cfg, split))
    if len(tr) < 2:
        raise LotusError(f"--source-classes: the source task has {len(tr)} training image(s); need at least 2")
    out = _canvas(tr, cfg, "source/train"), (_canvas(va, cfg, "source/val") if len(va) >= 2 else None)
    if split is None:
        _CACHE[key] = out
    return out


def eval_set(source: str, cfg: dict) -> data_mod.ImageSet:
    """Every image of ``source`` (cifar10: its test split) that belongs to the run's target task,
    relabelled and composed like the run's target images (its own canvas clutter)."""
    images = data_mod.load_eval(source, cfg).for_classes(cfg["target_classes"])
    if len(images) == 0:
        raise LotusError(f"--data: {source} holds no image of the run's target classes {cfg['target_classes']}")
    return _canvas(images, cfg, "eval")

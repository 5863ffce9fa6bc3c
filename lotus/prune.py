"""Stage 4, two-step pruning: one-shot magnitude sweep -> essential sparsity -> ISP / ISSP masks.

one-shot  global magnitude pruning of every linear layer but the head (``sparsify_``), at each
          sparsity of a sweep, evaluated without any training
essential the largest sweep sparsity up to which every sparsity stays within ``tolerance``
          accuracy points of dense (contiguous from 0, so one lucky noisy point cannot set it)
ISP       Instant-Soup pruning: in ``rounds`` steps towards the target, ``K`` weak copies of the
          current model are fine-tuned briefly, each on its own random subset of the training data
          with its own seed; each prunes by magnitude to the round's sparsity, the K masks are merged
          by a vote (any / majority / all) and the copies' weights averaged (the soup)
ISSP      the same rounds, but copy k prunes at the round's sparsity + ``issp_offsets[k]`` and the
          masks are merged by union (a weight survives if any copy, at any sparsity, keeps it)

A vote or a union moves the sparsity away from the target: the merged masks' actual sparsity is
what gets reported. Masks are dicts {module name: bool [out, in], True = keep}, applied with
``lotus_kernels.sparsify_`` so every weak copy already trains on ``MaskedLinear``.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch

from lotus_kernels import sparsify_
from lotus_kernels.nn import MaskedLinear

from .data import Images
from .rundir import stage_seed

VOTES = ("any", "majority", "all")


def masks_of(model) -> dict[str, torch.Tensor]:
    return {n: m.mask.detach().clone() for n, m in model.named_modules() if isinstance(m, MaskedLinear)}


def magnitude_masks(model, sparsity: float) -> dict[str, torch.Tensor]:
    """Global magnitude masks of ``model`` at ``sparsity`` (``model`` is left untouched)."""
    return masks_of(sparsify_(copy.deepcopy(model), sparsity=float(sparsity)))


def sparsity_of(masks: dict) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / max(total, 1)


def sweep(model, sparsities, evaluate: Callable) -> list[dict]:
    """[{"sparsity", "accuracy"}] of one-shot magnitude pruning at each sparsity (no training)."""
    out = []
    for s in sparsities:
        pruned = sparsify_(copy.deepcopy(model), sparsity=float(s))
        out.append({"sparsity": float(s), "accuracy": evaluate(pruned)})
    return out


def essential_sparsity(points: list[dict], tolerance: float) -> float:
    """Largest sparsity such that it and every lower sweep sparsity are within ``tolerance``
    points of the dense (sparsity 0) accuracy."""
    points = sorted(points, key=lambda p: p["sparsity"])
    if not points or points[0]["sparsity"] != 0:
        raise ValueError("points: the sweep must include sparsity 0 (dense)")
    dense = points[0]["accuracy"]
    best = 0.0
    for p in points:
        if p["accuracy"] < dense - tolerance:
            break
        best = p["sparsity"]
    return best


def vote(masks: list[dict], rule: str) -> dict:
    """Merge K masks: keep a weight if any / a strict majority / all of the K copies keep it."""
    if rule not in VOTES:
        raise ValueError(f"vote: expected one of {VOTES}, got {rule!r}")
    k = len(masks)
    need = {"any": 1, "majority": k // 2 + 1, "all": k}[rule]
    return {n: torch.stack([m[n] for m in masks]).sum(0) >= need for n in masks[0]}


def _soup(states: list[dict]) -> dict:
    """Mean of the copies' floating-point tensors; other entries (masks) from the first copy."""
    out = {}
    for key, v in states[0].items():
        out[key] = torch.stack([s[key] for s in states]).mean(0) if v.is_floating_point() else v.clone()
    return out


def soup_prune(model, train_data: Images, *, target: float, rounds: int, copies: int, subset: float,
               train_copy: Callable, merge: str, seed: int, offsets=(0.0,), weak_cache: dict | None = None,
               label: str = "isp") -> tuple[torch.nn.Module, dict, list[dict]]:
    """The ISP / ISSP loop. ``train_copy(model, data, seed, desc)`` fine-tunes a weak copy in place.

    Round r (1..rounds) prunes to ``target * r / rounds``; copy k prunes to that plus
    ``offsets[k % len(offsets)]`` (capped at 0.99). Returns (soup model with merged masks applied,
    merged masks, per-round log). ``weak_cache`` shares round-1 weak copies between ISP and ISSP
    (they start from the same model with the same seeds, so they are the same copies)."""
    base = copy.deepcopy(model)
    if not any(isinstance(m, MaskedLinear) for m in base.modules()):
        sparsify_(base, sparsity=0.0)  # all-True masks: the copies train on MaskedLinear from round 1
    n = len(train_data)
    n_sub = max(1, math.ceil(subset * n))
    log, merged = [], masks_of(base)
    for r in range(1, rounds + 1):
        s_r = target * r / rounds
        states, masks = [], []
        for k in range(copies):
            key = (r, k)
            cseed = stage_seed(seed, f"weak-copy/{r}/{k}")
            if r == 1 and weak_cache is not None and key in weak_cache:
                state = weak_cache[key]
            else:
                weak = copy.deepcopy(base)
                idx = torch.randperm(n, generator=torch.Generator().manual_seed(cseed))[:n_sub].sort().values
                train_copy(weak, train_data.subset(idx), cseed, f"{label} r{r} copy {k + 1}/{copies}")
                state = {key_: v.detach().clone() for key_, v in weak.state_dict().items()}
                if r == 1 and weak_cache is not None:
                    weak_cache[key] = state
            weak = copy.deepcopy(base)
            weak.load_state_dict(state)
            s_k = min(0.99, s_r + offsets[k % len(offsets)])
            masks.append(magnitude_masks(weak, s_k))
            states.append(state)
        merged = vote(masks, merge)
        base.load_state_dict(_soup(states))
        sparsify_(base, masks=merged)
        log.append({"round": r, "round_target": s_r, "copy_sparsities": [sparsity_of(m) for m in masks],
                    "merged_sparsity": sparsity_of(merged)})
    return base, merged, log

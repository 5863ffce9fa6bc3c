"""Stage 4, two-step pruning in a layout the kernels accelerate: one-shot sweep -> essential sparsity
-> ISP / ISSP masks, with the controls that make the comparison fair.

Layouts (``Pruner.layout``): ``unstructured`` (single weights; the LOTUS paper's method, fine-tuned
on ``MaskedLinear``: no FLOPs saved), ``block`` (``block_size`` x ``block_size`` blocks, fine-tuned
on ``BlockSparseLinear``, which skips pruned blocks) and ``2:4`` (2 of every 4 weights along the
input; only sparsity 0.5 exists). Every stage uses the same layout: the sweep ranks blocks by a block
score (``l1`` = sum |w|, ``l2`` = Frobenius norm, ``grad`` = sum |w * dL/dw| over a few training
batches, first-order Taylor), ISP votes on blocks. Masks are always elementwise bool [out, in] per
layer (True = keep; block-constant for ``block``), so the pruning stages train on ``MaskedLinear``
(the same function as the block layer) and only fine-tuning converts to ``BlockSparseLinear``.

one-shot    global ranking of every prunable linear but the head, no training
essential   the largest sweep sparsity up to which every sparsity stays within ``tolerance`` points
            of dense (contiguous from 0, so one lucky noisy point cannot set it)
ISP (ours)  ``rounds`` steps towards the target; per round ``K`` weak copies of the current model
            are fine-tuned briefly, each on its own random subset with its own seed, pruned to the
            round's sparsity; masks merged by a vote (any / majority / all), weights averaged (soup)
ISSP (ours) the same copies, masks merged by a union *calibrated to the target*: every copy prunes
            at one higher sparsity s' chosen (bisection) so that the union of the K masks has the
            round's sparsity. ``merge_log`` reports how much the copies disagree.
control     the one-shot mask at the target with exactly the training every method gets after its
            final mask (the pipeline's recovery pass): ISP - control is what ISP's rounds (their
            mask and their soup) add at equal post-mask training.
Instant Soup (``instant_soup_prune``): the recipe of Jaiswal et al. 2023 as their code runs it
            (VITA-Group/instant_soup, ``isp_all.py``): before each iteration the main model trains on
            half of the data, carrying its optimizer and learning-rate schedule; K = 5 weak copies
            start from it (weights and mask, a fresh optimizer warming up towards the main model's
            current learning rate), one pass over 10% of the data each, and each prunes another 10%
            of its remaining weights; the main model takes the union of their masks (no weight
            averaging) until it is within 5 points of the target, then a one-shot prune to the
            target. The fine-tune after the last pruning step is the recovery pass all methods get.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lotus_kernels import sparsify_
from lotus_kernels.nn import BlockSparseLinear, MaskedLinear, SemiStructuredLinear
from lotus_kernels.ops.block_sparse_linear import BLOCK_SIZES
from lotus_kernels.sparsify import _targets

from .data import ImageSet
from .errors import LotusError
from .rundir import stage_seed

LAYOUTS = ("unstructured", "block", "2:4")
SCORES = ("l1", "l2", "grad")
VOTES = ("any", "majority", "all")


# ---------------------------------------------------------------- layers and masks
def target_layers(model) -> dict[str, nn.Module]:
    """The linears ``sparsify_`` prunes by default: every one but the classifier head."""
    return _targets(model, None, None)


def weight_of(layer: nn.Module) -> torch.Tensor:
    """The dense [out, in] weight of a linear, a MaskedLinear (already masked) or a block layer."""
    return layer.weight.detach()


def masks_of(model) -> dict[str, torch.Tensor]:
    """Elementwise keep-masks of the model's sparse layers (block layers: their blocks expanded)."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, (MaskedLinear, SemiStructuredLinear)):
            out[n] = m.mask.detach().clone()
        elif isinstance(m, BlockSparseLinear):
            bs = m.block_size
            out[n] = m.block_mask.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    return out


def sparsity_of(masks: dict) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / max(total, 1)


def check_layout(model, layout: str, block_size: int) -> None:
    """A LotusError naming the option if ``layout`` / ``block_size`` cannot prune ``model``."""
    if layout not in LAYOUTS:
        raise LotusError(f"--layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    layers = target_layers(model)
    if layout == "block":
        if block_size not in BLOCK_SIZES:
            raise LotusError(f"--block-size: expected one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size}")
        for n, m in layers.items():
            o, i = weight_of(m).shape
            if o % block_size or i % block_size:
                raise LotusError(
                    f"--block-size: {block_size} does not divide {n}.weight [{o}, {i}]; "
                    f"choose a block size that divides every pruned layer"
                )
    if layout == "2:4":
        for n, m in layers.items():
            if weight_of(m).shape[1] % 4:
                raise LotusError(
                    f"--layout 2:4: {n}.weight has {weight_of(m).shape[1]} input features, not a multiple of 4"
                )


def _prune_lowest(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks shaped like ``scores`` pruning exactly round(sparsity * n) lowest scores over all
    layers together; ties go to the lower (layer order, flat index) position."""
    flat = torch.cat([s.flatten().double() for s in scores.values()]) if scores else torch.zeros(0)
    k = round(sparsity * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.sort(flat, stable=True).indices[:k]] = False
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = keep[start : start + s.numel()].view_as(s)
        start += s.numel()
    return out


def _top2_of_4(scores: torch.Tensor) -> torch.Tensor:
    """2:4 keep-mask of [out, in] scores: the 2 highest of every 4 along in (ties to the lower index)."""
    o, i = scores.shape
    g = scores.reshape(o, i // 4, 4)
    order = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :2]
    return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order, True).reshape(o, i)


def expand_blocks(block_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    return block_mask.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)


def block_counts(masks: dict, block_size: int) -> dict[str, tuple[int, int]]:
    """name -> (kept blocks, total blocks) of block-constant elementwise masks."""
    out = {}
    for n, m in masks.items():
        o, i = m.shape
        b = m.reshape(o // block_size, block_size, i // block_size, block_size)
        kept = b.any(3).any(1)
        if not torch.equal(expand_blocks(kept, block_size), m):
            raise ValueError(f"masks[{n!r}]: not constant on {block_size}x{block_size} blocks")
        out[n] = (int(kept.sum()), kept.numel())
    return out


def gradients(model, data: ImageSet, *, images: int = 256, batch_size: int = 128, seed: int = 0) -> dict:
    """name -> dL/dW [out, in] of every target layer, summed over ``images`` random training images
    (the gradient-weighted block score's ``g``)."""
    import torch.nn.functional as F

    from .train import device

    dev = device()
    m = copy.deepcopy(model).to(dev).eval()
    layers = target_layers(m)
    grads = {n: torch.zeros_like(weight_of(layer)) for n, layer in layers.items()}
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:images]
    for start in range(0, len(idx), batch_size):
        b = idx[start : start + batch_size]
        m.zero_grad(set_to_none=True)
        xb, yb, _ = data.__getitems__(b.tolist())
        loss = F.cross_entropy(m(data.prepare(xb, dev)), yb.to(dev), reduction="sum")
        loss.backward()
        for n, layer in layers.items():
            p = layer.weight if not isinstance(layer, BlockSparseLinear) else None
            if p is None or p.grad is None:
                raise ValueError(f"gradients: {n} has no dense weight gradient")
            grads[n] += p.grad.detach()
    return {n: g.cpu() for n, g in grads.items()}


@dataclass
class Pruner:
    """How masks are drawn: layout, block size and score (``grad`` needs ``grad_data``)."""

    layout: str = "unstructured"
    block_size: int = 16
    score: str = "l2"
    grad_data: ImageSet | None = None
    grad_images: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {self.layout!r}")
        if self.score not in SCORES:
            raise ValueError(f"score: expected one of {SCORES}, got {self.score!r}")
        if self.score == "grad" and self.grad_data is None:
            raise ValueError("grad_data: the gradient-weighted score needs training images")

    def scores(self, model) -> dict[str, torch.Tensor]:
        """name -> importance at the layout's granularity: [out, in] (unstructured, 2:4) or
        [out // bs, in // bs] (block)."""
        layers = target_layers(model)
        w = {n: weight_of(m).float().cpu() for n, m in layers.items()}
        for n, t in w.items():
            if torch.isnan(t).any():
                raise ValueError(f"model: {n}.weight has NaN entries; cannot rank weights")
        if self.score == "grad":
            g = gradients(model, self.grad_data, images=self.grad_images, seed=self.seed)
            elem = {n: (w[n] * g[n].float()).abs() for n in w}
        elif self.score == "l1" or self.layout != "block":
            elem = {n: t.abs() for n, t in w.items()}  # one weight: L1 = L2 = |w|
        else:
            elem = {n: t.square() for n, t in w.items()}
        if self.layout != "block":
            return elem
        bs = self.block_size
        out = {}
        for n, e in elem.items():
            o, i = e.shape
            s = e.reshape(o // bs, bs, i // bs, bs).sum((1, 3))
            out[n] = s.sqrt() if self.score == "l2" else s
        return out

    def masks_from(self, scores: dict, sparsity: float) -> dict[str, torch.Tensor]:
        """Elementwise keep-masks at ``sparsity`` from ``scores`` (see ``scores``)."""
        if self.layout == "2:4":
            if sparsity == 0:
                return {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
            if abs(sparsity - 0.5) > 1e-9:
                raise ValueError(f"sparsity: layout 2:4 prunes exactly 0.5, got {sparsity}")
            return {n: _top2_of_4(s) for n, s in scores.items()}
        keep = _prune_lowest(scores, sparsity)
        if self.layout == "block":
            keep = {n: expand_blocks(k, self.block_size) for n, k in keep.items()}
        return keep

    def masks(self, model, sparsity: float) -> dict[str, torch.Tensor]:
        return self.masks_from(self.scores(model), sparsity)

    def granule(self) -> int:
        """Weights per pruning unit (1, or block_size**2)."""
        return self.block_size**2 if self.layout == "block" else 1


def magnitude_masks(model, sparsity: float) -> dict[str, torch.Tensor]:
    """Unstructured global magnitude masks of ``model`` at ``sparsity`` (``model`` untouched)."""
    return Pruner().masks(model, sparsity)


def apply_masks(model, masks: dict | None):
    """``model`` with elementwise ``masks`` applied as ``MaskedLinear`` layers (in place)."""
    return sparsify_(model, masks=masks) if masks else model


def sweep(model, sparsities, evaluate: Callable, pruner: Pruner | None = None) -> list[dict]:
    """[{"sparsity", "accuracy"}] of one-shot pruning at each sparsity (no training); the scores are
    computed once."""
    pruner = pruner or Pruner()
    scores = pruner.scores(model)
    out = []
    for s in sparsities:
        pruned = apply_masks(copy.deepcopy(model), pruner.masks_from(scores, float(s)) if s > 0 else None)
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


# ---------------------------------------------------------------- merging K masks
def vote(masks: list[dict], rule: str) -> dict:
    """Merge K masks: keep a weight if any / a strict majority / all of the K copies keep it."""
    if rule not in VOTES:
        raise ValueError(f"vote: expected one of {VOTES}, got {rule!r}")
    k = len(masks)
    need = {"any": 1, "majority": k // 2 + 1, "all": k}[rule]
    return {n: torch.stack([m[n] for m in masks]).sum(0) >= need for n in masks[0]}


def vote_24(masks: list[dict], tie: dict) -> dict:
    """2:4 merge: per group of 4 keep the 2 weights most copies keep, ties by ``tie`` (|soup w|):
    a plain vote would break the 2-of-4 pattern."""
    out = {}
    for n in masks[0]:
        count = torch.stack([m[n] for m in masks]).sum(0).double()
        t = tie[n].double().abs()
        out[n] = _top2_of_4(count + t / (2 * t.max().clamp_min(1e-30)))
    return out


def union_at(scores: list[dict], sparsity: float, pruner: Pruner, iters: int = 30) -> tuple[dict, float]:
    """Union of K copies' masks whose sparsity is ``sparsity``: every copy prunes at one common
    s' >= sparsity found by bisection (the union keeps more than any copy). Returns (masks, s')."""

    def union(s):
        ms = [pruner.masks_from(sc, s) for sc in scores]
        return vote(ms, "any")

    lo, hi = sparsity, 0.999
    if sparsity == 0 or sparsity_of(union(hi)) < sparsity:  # cannot reach: prune as hard as allowed
        return union(sparsity if sparsity == 0 else hi), (sparsity if sparsity == 0 else hi)
    best = union(hi), hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        m = union(mid)
        if sparsity_of(m) >= sparsity:
            hi, best = mid, (m, mid)
        else:
            lo = mid
        if hi - lo < 1e-5:
            break
    return best


def disagreement(masks: list[dict]) -> dict:
    """How different K copies' masks are: mean pairwise Jaccard of the kept sets, and the fraction
    of the union's kept weights that only one copy keeps."""
    flat = [torch.cat([m[n].flatten() for n in masks[0]]) for m in masks]
    jac = []
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            inter = int((flat[i] & flat[j]).sum())
            uni = int((flat[i] | flat[j]).sum())
            jac.append(inter / max(uni, 1))
    count = torch.stack(flat).sum(0)
    kept = int((count > 0).sum())
    return {"jaccard": sum(jac) / len(jac) if jac else 1.0, "single_copy_share": int((count == 1).sum()) / max(kept, 1)}


# ---------------------------------------------------------------- ISP / ISSP / control (ours)
def _soup(states: list[dict]) -> dict:
    """Mean of the copies' floating-point tensors; other entries (masks) from the first copy."""
    out = {}
    for key, v in states[0].items():
        out[key] = torch.stack([s[key] for s in states]).mean(0) if v.is_floating_point() else v.clone()
    return out


def subset_of(train_data: ImageSet, frac: float, seed: int) -> ImageSet:
    """A seeded random ``frac`` of ``train_data`` (at least one image)."""
    n = len(train_data)
    n_sub = max(1, math.ceil(frac * n))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_sub].sort().values
    return train_data.subset(idx)


def _all_kept(model) -> bool:
    return all(bool(m.all()) for m in masks_of(model).values())


def soup_prune(
    model,
    train_data: ImageSet,
    *,
    target: float,
    rounds: int,
    copies: int,
    subset: float,
    train_copy: Callable,
    merge: str,
    seed: int,
    pruner: Pruner | None = None,
    weak_cache: dict | None = None,
    label: str = "isp",
) -> tuple[torch.nn.Module, dict, list[dict]]:
    """The ISP / ISSP loop. ``train_copy(model, data, seed, desc)`` fine-tunes a weak copy.

    merge        "any" / "majority" / "all" (ISP vote) or "union" (ISSP, calibrated to the round's
                 sparsity); 2:4 always merges by ``vote_24``
    Round r (1..rounds) prunes to ``target * r / rounds`` (2:4: straight to 0.5 every round).
    ``weak_cache`` shares weak copies trained from an unpruned model between calls (round 1 of ISP
    and ISSP, of every layout and target: same start model, same seeds, so the same copies); a reused
    copy's recorded training seconds are in its round's ``reused_cost`` (what a user running this
    method alone would pay for it). Returns (soup with the merged masks, merged masks, per-round log)."""
    pruner = pruner or Pruner()
    if merge not in (*VOTES, "union"):
        raise ValueError(f"merge: expected one of {VOTES + ('union',)}, got {merge!r}")
    base = copy.deepcopy(model)
    if not masks_of(base):
        sparsify_(base, sparsity=0.0)  # all-True masks: the copies train on MaskedLinear from round 1
    log, merged = [], masks_of(base)
    for r in range(1, rounds + 1):
        s_r = 0.5 if pruner.layout == "2:4" else target * r / rounds
        shared = weak_cache is not None and _all_kept(base)
        states, scores = [], []
        reused = {"wall": 0.0, "cpu": 0.0}
        for k in range(copies):
            cseed = stage_seed(seed, f"weak-copy/{r}/{k}")
            key = ("unpruned", r, k, subset, cseed)
            if shared and key in weak_cache:
                state, spent = weak_cache[key]
                reused = {t: reused[t] + spent[t] for t in reused}
            else:
                weak = copy.deepcopy(base)
                w0, c0 = time.perf_counter(), time.process_time()
                train_copy(weak, subset_of(train_data, subset, cseed), cseed, f"{label} r{r} copy {k + 1}/{copies}")
                spent = {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}
                state = {key_: v.detach().clone() for key_, v in weak.state_dict().items()}
                if shared:
                    weak_cache[key] = (state, spent)
            states.append(state)
            weak = copy.deepcopy(base)
            weak.load_state_dict(state)
            scores.append(pruner.scores(weak))
        soup_state = _soup(states)
        entry = {"round": r, "round_target": s_r, "reused_cost": reused}
        masks = [pruner.masks_from(sc, s_r) for sc in scores]
        if pruner.layout == "2:4":
            merged = vote_24(masks, {n: v for n, v in _weights_of_state(base, soup_state).items()})
        elif merge == "union":
            merged, s_copy = union_at(scores, s_r, pruner)
            masks = [pruner.masks_from(sc, s_copy) for sc in scores]
            entry["copy_sparsity"] = s_copy
        else:
            merged = vote(masks, merge)
        entry["copy_sparsities"] = [sparsity_of(m) for m in masks]
        entry.update(disagreement(masks))
        base.load_state_dict(soup_state)
        sparsify_(base, masks=merged)
        entry["merged_sparsity"] = sparsity_of(merged)
        log.append(entry)
    return base, merged, log


def _weights_of_state(model, state: dict) -> dict:
    return {n: state[f"{n}.weight"] for n in target_layers(model) if f"{n}.weight" in state}


# ---------------------------------------------------------------- Instant Soup, as published
def _mask_optimizer_state(model, opt_state: dict, masks: dict) -> None:
    """Zero AdamW/SGD moments of pruned weights: a carried moment would move a weight whose gradient
    the mask now zeroes, breaking MaskedLinear's exact zeros."""
    from .train import optimizer_params

    if not opt_state or "state" not in opt_state:
        return
    groups = opt_state["param_groups"]
    params = optimizer_params(model, max(g.get("weight_decay", 0.0) for g in groups))
    if len(params) != sum(len(g["params"]) for g in groups):
        raise ValueError(
            f"optimizer state: {sum(len(g['params']) for g in groups)} parameters, the model has {len(params)}"
        )
    index = {id(p): i for i, p in enumerate(params)}
    layers = dict(model.named_modules())
    for n, m in masks.items():
        i = index.get(id(layers[n].weight))
        st = opt_state["state"].get(i)
        if st is None:
            continue
        for key, v in st.items():
            if torch.is_tensor(v) and v.shape == m.shape:
                v.masked_fill_(~m.to(v.device), 0)


def scores_under(pruner: Pruner, model, masks: dict) -> dict:
    """``pruner``'s scores of ``model`` with the weights (blocks) that ``masks`` prune scored -1, below
    every kept one: a global magnitude prune then removes them first and never revives them."""
    sc = pruner.scores(model)
    bs = pruner.block_size
    for n, s in sc.items():
        keep = masks[n][::bs, ::bs] if pruner.layout == "block" else masks[n]
        s[~keep.to(s.device)] = -1.0
    return sc


def instant_soup_prune(
    model,
    train_data: ImageSet,
    *,
    target: float,
    copies: int,
    copy_subset: float,
    main_subset: float,
    step: float,
    stop_within: float,
    train_copy: Callable,
    train_main: Callable,
    seed: int,
    pruner: Pruner | None = None,
    max_iterations: int = 100,
    label: str = "instant-soup",
) -> tuple[torch.nn.Module, dict, list[dict]]:
    """Instant Soup Pruning as published. Iteration t:

    1. ``lr = train_main(main, data, seed)``: the main model trains one pass over a random
       ``main_subset`` of the data, continuing its optimizer state and learning-rate schedule, and
       returns the schedule's learning rate where it now stands;
    2. stop if the main model's sparsity is within ``stop_within`` of ``target``;
    3. ``train_copy(weak, data, seed, desc, lr)`` trains each of ``copies`` copies of the main model
       (its weights and mask) on its own random ``copy_subset``; each copy then prunes a further
       ``step`` of its remaining weights (units) by the pruner's score;
    4. the main model (its own weights) takes the union of the copies' masks.

    Then the main model is pruned one-shot to exactly ``target``. Returns (main model, its masks,
    per-iteration log). The 2:4 layout has no 10% steps: not supported."""
    pruner = pruner or Pruner()
    if pruner.layout == "2:4":
        raise ValueError("layout: Instant Soup prunes in 10% steps; 2:4 has only sparsity 0.5")
    main = copy.deepcopy(model)
    if not masks_of(main):
        sparsify_(main, sparsity=0.0)
    log, merged = [], masks_of(main)
    for t in range(1, max_iterations + 1):
        lr = train_main(
            main,
            subset_of(train_data, main_subset, stage_seed(seed, f"instant-soup/main/{t}")),
            stage_seed(seed, f"instant-soup/main/{t}"),
        )
        current = sparsity_of(merged)
        if target - current < stop_within:
            break
        s_copy = 1.0 - (1.0 - current) * (1.0 - step)
        masks = []
        for k in range(copies):
            cseed = stage_seed(seed, f"instant-soup/{t}/{k}")
            weak = copy.deepcopy(main)
            desc = f"{label} it{t} copy {k + 1}/{copies}"
            train_copy(weak, subset_of(train_data, copy_subset, cseed), cseed, desc, lr)
            masks.append(pruner.masks_from(scores_under(pruner, weak, merged), s_copy))
        merged = vote(masks, "any")
        sparsify_(main, masks=merged)
        log.append(
            {
                "round": t,
                "round_target": s_copy,
                "copy_sparsities": [sparsity_of(m) for m in masks],
                "merged_sparsity": sparsity_of(merged),
                "lr": lr,
                **disagreement(masks),
            }
        )
    if sparsity_of(merged) < target:
        merged = pruner.masks_from(scores_under(pruner, main, merged), target)
        sparsify_(main, masks=merged)
    log.append({"round": "final", "round_target": target, "merged_sparsity": sparsity_of(merged)})
    return main, merged, log

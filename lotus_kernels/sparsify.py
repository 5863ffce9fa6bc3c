"""``sparsify_`` / ``densify_``: swap a model's ``nn.Linear`` layers for ``MaskedLinear`` and back.

    sparsify_(model, sparsity=0.3)                      # 30% of the targeted weights, smallest |w| overall
    sparsify_(model, sparsity=0.5, scope="layer")       # 50% of each targeted layer
    sparsify_(model, masks={"blocks.0.mlp.fc1": m})     # given masks (True = keep)
    densify_(model)                                     # MaskedLinear -> nn.Linear (masked weights)

Layers are swapped for new modules with new parameters: build the optimizer after ``sparsify_``.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
from torch import nn

from .nn import MaskedLinear
from .ops.masked_linear import check_mask

LAYOUTS = ("unstructured", "block", "2:4")
SCOPES = ("global", "layer")


# ---------------------------------------------------------------- which layers
def _patterns(name: str, patterns) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{name}: expected a list of fnmatch patterns on module names (str), got {patterns!r}")
    return patterns


def _classifier_names(model: nn.Module) -> set[str]:
    """Names of the classifier head: timm's ``pretrained_cfg['classifier']`` (a name or a tuple of
    names), the module ``get_classifier()`` returns, and any module called ``head`` (``x.head`` too)."""
    names = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] == "head"}
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    cls = cfg.get("classifier") if isinstance(cfg, dict) else None
    names.update([cls] if isinstance(cls, str) else (cls or ()))
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Module):
        names.update(n for n, m in model.named_modules() if m is head)
    return names


def _under(name: str, roots: Iterable[str]) -> bool:
    return any(r == "" or name == r or name.startswith(r + ".") for r in roots)


def _prunable(m: nn.Module) -> bool:
    # A Linear subclass with a forward of its own (quantised, LoRA, ...) computes something else
    # than x @ W.T + b: swapping it for a MaskedLinear would silently change the model.
    return isinstance(m, MaskedLinear) or (isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward)


def _targets(model: nn.Module, include, exclude) -> dict[str, nn.Module]:
    """name -> layer to prune. ``include`` None: every Linear / MaskedLinear but the classifier head;
    otherwise exactly those matching one of its patterns (the head too). ``exclude`` then removes."""
    layers = {n: m for n, m in model.named_modules() if _prunable(m)}
    # nn.MultiheadAttention reads out_proj.weight directly (never calls its forward), so a mask
    # there would never reach the gradient.
    mha = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    layers = {n: m for n, m in layers.items() if not _under(n, mha)}
    if include is None:
        heads = _classifier_names(model)
        chosen = {n: m for n, m in layers.items() if not _under(n, heads)}
    else:
        for p in include:
            if not any(fnmatch.fnmatchcase(n, p) for n in layers):
                raise ValueError(f"include: pattern {p!r} matches no nn.Linear in the model")
        chosen = {n: m for n, m in layers.items() if any(fnmatch.fnmatchcase(n, p) for p in include)}
    return {n: m for n, m in chosen.items() if not any(fnmatch.fnmatchcase(n, p) for p in exclude or ())}


# ---------------------------------------------------------------- magnitude masks
def _prune_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool keep-mask of the flat ``scores``: False at exactly ``k`` smallest, ties going to the
    lowest index (threshold by kthvalue, O(n): no full sort of every weight in the model)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k == 0:
        return keep
    t = scores.kthvalue(k).values
    below = scores < t
    ties = (scores == t).nonzero().flatten()
    keep[below] = False
    keep[ties[: k - int(below.sum())]] = False
    return keep


def magnitude_masks(layers: dict[str, nn.Module], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """name -> keep-mask pruning exactly ``round(sparsity * n)`` weights of smallest ``|w|``, with n
    the total weight count (``scope="global"``: one threshold over all layers) or each layer's."""
    scores = {}
    for n, m in layers.items():
        s = m.weight.detach().abs().float()
        if torch.isnan(s).any():
            raise ValueError(f"model: {n}.weight has NaN entries; cannot rank weights by magnitude")
        scores[n] = s
    if scope == "layer":
        return {n: _prune_smallest(s.flatten(), round(sparsity * s.numel())).view_as(s) for n, s in scores.items()}
    if not scores:
        return {}
    device = next(iter(scores.values())).device
    flat = torch.cat([s.flatten().to(device) for s in scores.values()])
    keep = _prune_smallest(flat, round(sparsity * flat.numel()))
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = keep[start: start + s.numel()].view_as(s).to(s.device)
        start += s.numel()
    return out


# ---------------------------------------------------------------- swapping
def _swap(model: nn.Module, new: dict[int, nn.Module]) -> None:
    """Replace every child ``c`` with ``id(c)`` in ``new`` by ``new[id(c)]``, wherever it is
    registered (a shared layer is swapped under all its names)."""
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if id(child) in new:
                setattr(parent, child_name, new[id(child)])


def _check_args(sparsity, masks, layout, scope, include, exclude) -> None:
    if layout in ("block", "2:4"):
        raise NotImplementedError(f"layout: {layout!r} sparsity comes in a later step; "
                                  "only 'unstructured' is implemented")
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {', '.join(map(repr, SCOPES))}, got {scope!r}")
    if masks is not None:
        if sparsity is not None:
            raise ValueError("sparsity: must be None when masks is given (the masks decide what is pruned)")
        if include is not None or exclude is not None:
            raise ValueError("include / exclude: not used with masks (the masks' keys name the layers)")
        if not isinstance(masks, dict):
            raise TypeError(f"masks: expected a dict of module name -> bool mask, got {type(masks).__name__}")
        return
    if sparsity is None:
        raise ValueError("sparsity: expected a fraction in [0, 1) to prune, or masks=...; got neither")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity: expected a fraction in [0, 1), got {sparsity!r}")


@torch.no_grad()
def sparsify_(model: nn.Module, *, sparsity: float | None = None, masks: dict[str, torch.Tensor] | None = None,
              layout: str = "unstructured", scope: str = "global", include=None, exclude=None) -> nn.Module:
    """Prune ``model``'s linear layers in place: each targeted ``nn.Linear`` becomes a
    ``MaskedLinear`` (an existing ``MaskedLinear`` gets the new mask). Returns ``model``.

    sparsity  fraction of weights to prune by magnitude |w|: exactly round(sparsity * n) of them,
              ties broken towards the lower index (n per ``scope``: "global" = all targeted
              weights together, "layer" = each layer's own)
    masks     {module name: bool mask, True = keep} instead of ``sparsity``; its keys are the targets
    include   fnmatch patterns on module names (e.g. "blocks.*.mlp.fc1"): prune exactly the matching
              linears. Default: every linear except the classifier head (timm's
              ``pretrained_cfg['classifier']`` / ``get_classifier()``, or a module named ``head``)
    exclude   patterns of linears not to prune
    layout    "unstructured" ("block" and "2:4" come in a later step)
    """
    _check_args(sparsity, masks, layout, scope, include, exclude)
    if isinstance(model, (nn.Linear, MaskedLinear)):
        raise ValueError("model: is itself a linear layer and cannot be swapped in place; "
                         "use MaskedLinear.from_linear(linear, mask)")
    if masks is None:
        layers = _targets(model, _patterns("include", include), _patterns("exclude", exclude))
        if not layers:
            raise ValueError("model: has no nn.Linear to sparsify (after the head, include and exclude)")
        masks = magnitude_masks(layers, float(sparsity), scope)
    else:
        modules = dict(model.named_modules())
        layers = {}
        for n, mask in masks.items():
            if not _prunable(modules.get(n)):
                raise ValueError(f"masks: {n!r} is not an nn.Linear (nor MaskedLinear) in the model")
            layers[n] = modules[n]
            check_mask(f"masks[{n!r}]", mask, layers[n].weight.shape, f"{n}.weight")
    new = {}
    for n, layer in layers.items():
        if isinstance(layer, MaskedLinear):
            layer.set_mask_(masks[n].to(layer.mask.device))
        else:
            new[id(layer)] = MaskedLinear.from_linear(layer, masks[n].to(layer.weight.device))
    _swap(model, new)
    return model


def densify_(model: nn.Module) -> nn.Module:
    """Swap every ``MaskedLinear`` back for an ``nn.Linear`` holding its masked weight. Returns ``model``."""
    if isinstance(model, MaskedLinear):
        raise ValueError("model: is itself a MaskedLinear and cannot be swapped in place; use model.to_linear()")
    _swap(model, {id(m): m.to_linear() for m in model.modules() if isinstance(m, MaskedLinear)})
    return model

"""``sparsify_`` / ``densify_``: swap a model's ``nn.Linear`` layers for sparse ones and back.

    sparsify_(model, sparsity=0.3)                      # 30% of the targeted weights, smallest |w| overall
    sparsify_(model, sparsity=0.5, scope="layer")       # 50% of each targeted layer
    sparsify_(model, masks={"blocks.0.mlp.fc1": m})     # given masks (True = keep)
    sparsify_(model, sparsity=0.5, layout="block",      # 50% of the 32x32 blocks, smallest L2 norm
              block_size=32, include=["*.mlp.*"])       #   -> BlockSparseLinear
    sparsify_(model, layout="2:4")                      # 2 of every 4 weights (SemiStructuredLinear)
    sparsify_(model, sparsity=0.5, layout="auto")       # block-sparse only where it measures faster
    print(model.sparsify_report)                        #   (sparse_auto.py), and why
    densify_(model)                                     # any of them -> nn.Linear

Layers are swapped for new modules with new parameters: build the optimizer after ``sparsify_``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
from torch import nn

from .nn import BlockSparseLinear, MaskedLinear, SemiStructuredLinear
from .nn.block_sparse_linear import block_norms, to_block_mask
from .ops.block_sparse_linear import BLOCK_SIZES, check_block_size
from .ops.masked_linear import check_mask
from .ops.semi_structured_linear import check_semi_structured_mask, semi_structured_mask

LAYOUTS = ("unstructured", "block", "2:4", "auto")
SPARSE_LAYERS = (MaskedLinear, BlockSparseLinear, SemiStructuredLinear)
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
    names), the module ``get_classifier()`` returns, any module called ``head`` (``x.head`` too), and
    the heads of the other ViT families (torchvision ``heads``; transformers ``classifier``,
    ``pooler``, ``visual_projection``, SigLIP's ``head``; open_clip's attentional poolers)."""
    from .families import head_names

    names = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] == "head"}
    names.update(head_names(model))
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
    return isinstance(m, SPARSE_LAYERS) or (isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward)


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


def _masks_from_scores(scores: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """name -> keep-mask (shaped like its scores) pruning exactly ``round(sparsity * n)`` smallest
    scores, n = all scores together (``scope="global"``) or each layer's."""
    if scope == "layer":
        return {n: _prune_smallest(s.flatten(), round(sparsity * s.numel())).view_as(s) for n, s in scores.items()}
    if not scores:
        return {}
    device = next(iter(scores.values())).device
    flat = torch.cat([s.flatten().to(device) for s in scores.values()])
    keep = _prune_smallest(flat, round(sparsity * flat.numel()))
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = keep[start : start + s.numel()].view_as(s).to(s.device)
        start += s.numel()
    return out


def _dense_weight(m: nn.Module) -> torch.Tensor:
    # BlockSparseLinear.weight is computed (zeros outside its blocks); the others store it.
    return m.weight.detach()


def magnitude_masks(layers: dict[str, nn.Module], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """name -> keep-mask pruning exactly ``round(sparsity * n)`` weights of smallest ``|w|``, with n
    the total weight count (``scope="global"``: one threshold over all layers) or each layer's."""
    scores = {}
    for n, m in layers.items():
        s = _dense_weight(m).abs().float()
        if torch.isnan(s).any():
            raise ValueError(f"model: {n}.weight has NaN entries; cannot rank weights by magnitude")
        scores[n] = s
    return _masks_from_scores(scores, sparsity, scope)


def block_masks(layers: dict[str, nn.Module], sparsity: float, scope: str, block_size: int) -> dict[str, torch.Tensor]:
    """name -> block keep-mask [out // bs, in // bs] pruning exactly ``round(sparsity * n)`` blocks of
    smallest L2 norm, n = all targeted blocks (``scope="global"``) or each layer's."""
    scores = {}
    for n, m in layers.items():
        w = _dense_weight(m)
        check_block_size(block_size, *w.shape, where=f"{n}.weight")
        s = block_norms(w, block_size)
        if torch.isnan(s).any():
            raise ValueError(f"model: {n}.weight has NaN entries; cannot rank blocks by L2 norm")
        scores[n] = s
    return _masks_from_scores(scores, sparsity, scope)


# ---------------------------------------------------------------- swapping
def _swap(model: nn.Module, new: dict[int, nn.Module]) -> None:
    """Replace every child ``c`` with ``id(c)`` in ``new`` by ``new[id(c)]``, wherever it is
    registered (a shared layer is swapped under all its names)."""
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if id(child) in new:
                setattr(parent, child_name, new[id(child)])


def _check_args(sparsity, masks, layout, scope, include, exclude, block_size) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    if layout == "auto" and masks is not None:
        raise ValueError(
            "masks: not used with layout 'auto' (it chooses the layers and block sizes; pass sparsity=...)"
        )
    if layout == "block" and (isinstance(block_size, bool) or block_size not in BLOCK_SIZES):
        raise ValueError(f"block_size: expected one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size!r}")
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
    if layout == "2:4":
        # 2:4 fixes the pattern (2 of every 4) and so the sparsity: only 0.5 or None is meaningful.
        if sparsity is not None and sparsity != 0.5:
            raise ValueError(
                f"sparsity: layout '2:4' prunes exactly 0.5 (2 of every 4 weights); got {sparsity!r} "
                "(pass sparsity=None or 0.5)"
            )
        if scope != "global":
            raise ValueError("scope: not used with layout '2:4' (every group of 4 is pruned on its own)")
        return
    if sparsity is None:
        raise ValueError("sparsity: expected a fraction in [0, 1) to prune, or masks=...; got neither")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity: expected a fraction in [0, 1), got {sparsity!r}")


@torch.no_grad()
def sparsify_(
    model: nn.Module,
    *,
    sparsity: float | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    layout: str = "unstructured",
    scope: str = "global",
    include=None,
    exclude=None,
    block_size: int = 32,
    min_speedup: float = 1.0,
    tokens: int = 1024,
    measure=None,
) -> nn.Module:
    """Prune ``model``'s linear layers in place and return ``model``. ``layout="unstructured"``: each
    targeted ``nn.Linear`` becomes a ``MaskedLinear`` (an existing one gets the new mask);
    ``layout="block"``: a ``BlockSparseLinear`` storing only the kept ``block_size`` blocks.

    sparsity    fraction to prune: of the weights by |w| (unstructured), of the blocks by L2 norm
                (block); exactly round(sparsity * n), ties broken towards the lower index (n per
                ``scope``: "global" = all targeted weights / blocks together, "layer" = each layer's)
    masks       {module name: bool mask, True = keep} instead of ``sparsity``; its keys are the targets.
                For "block" a mask is a block mask [out // bs, in // bs] or an elementwise one
                [out, in] (a block is kept whole if any of its entries is)
    include     fnmatch patterns on module names (e.g. "blocks.*.mlp.fc1"): prune exactly the matching
                linears. Default: every linear except the classifier head (timm's
                ``pretrained_cfg['classifier']`` / ``get_classifier()``, or a module named ``head``)
    exclude     patterns of linears not to prune
    layout      "unstructured", "block", or "2:4" (a ``SemiStructuredLinear``: 2 of every 4 consecutive
                weights along in_features kept by magnitude; sparsity None or 0.5, in_features % 4 == 0;
                PyTorch's 2:4 kernels on CUDA, a dense masked fallback with a warning elsewhere)
    block_size  16, 32 or 64 (block layout); must divide both dimensions of every targeted weight
    layout="auto"  per layer, a BlockSparseLinear at the block size whose measured forward + backward on
                ``tokens`` rows is fastest, if it is at least ``min_speedup`` x the dense layer's; else the
                layer stays dense (``sparse_auto``: timings cached per machine in a JSON file; ``measure``
                replaces the timer). Layers sharing a block size are pruned together per ``scope``.
                ``model.sparsify_report`` (also logged at INFO) says what was chosen and why

    A layer that is already sparse is re-pruned from its current (masked / block-sparse) weight.
    """
    _check_args(sparsity, masks, layout, scope, include, exclude, block_size)
    if isinstance(model, (nn.Linear, *SPARSE_LAYERS)):
        raise ValueError(
            "model: is itself a linear layer and cannot be swapped in place; "
            "use MaskedLinear.from_linear(linear, mask) or BlockSparseLinear.from_linear"
        )
    if masks is None:
        layers = _targets(model, _patterns("include", include), _patterns("exclude", exclude))
        if not layers:
            raise ValueError("model: has no nn.Linear to sparsify (after the head, include and exclude)")
        if layout == "auto":
            return _sparsify_auto(model, layers, float(sparsity), scope, min_speedup, tokens, measure)
        if layout == "block":
            masks = block_masks(layers, float(sparsity), scope, block_size)
        elif layout == "2:4":
            masks = {n: semi_structured_mask(_dense_weight(m)) for n, m in layers.items()}
        else:
            masks = magnitude_masks(layers, float(sparsity), scope)
    else:
        modules = dict(model.named_modules())
        layers, given, masks = {}, masks, {}
        for n, mask in given.items():
            if not _prunable(modules.get(n)):
                raise ValueError(f"masks: {n!r} is not an nn.Linear (nor a lotus sparse linear) in the model")
            layers[n] = modules[n]
            shape = _dense_weight(layers[n]).shape
            if layout == "block":
                check_block_size(block_size, *shape, where=f"{n}.weight")
                masks[n] = to_block_mask(mask, shape, block_size, name=f"masks[{n!r}]")
            elif layout == "2:4":
                check_semi_structured_mask(f"masks[{n!r}]", mask, shape, f"{n}.weight")
                masks[n] = mask
            else:
                check_mask(f"masks[{n!r}]", mask, shape, f"{n}.weight")
                masks[n] = mask
    new = {}
    for n, layer in layers.items():
        if layout == "unstructured" and isinstance(layer, MaskedLinear):
            layer.set_mask_(masks[n].to(layer.mask.device))
            continue
        dense = layer if isinstance(layer, nn.Linear) else layer.to_linear()
        mask = masks[n].to(dense.weight.device)
        if layout == "block":
            new[id(layer)] = BlockSparseLinear.from_linear(dense, mask, block_size=block_size)
        elif layout == "2:4":
            new[id(layer)] = SemiStructuredLinear.from_linear(dense, mask)
        else:
            new[id(layer)] = MaskedLinear.from_linear(dense, mask)
    _swap(model, new)
    return model


def _sparsify_auto(model, layers, sparsity, scope, min_speedup, tokens, measure) -> nn.Module:
    from . import sparse_auto

    if isinstance(min_speedup, bool) or not isinstance(min_speedup, (int, float)) or not min_speedup > 0:
        raise ValueError(
            f"min_speedup: expected a positive number (sparse must be this many times faster "
            f"than dense), got {min_speedup!r}"
        )
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens: expected a positive int (rows per layer call to measure), got {tokens!r}")
    dense = {n: (m if isinstance(m, nn.Linear) else m.to_linear()) for n, m in layers.items()}
    report = sparse_auto.choose(
        dense, sparsity=sparsity, tokens=tokens, min_speedup=float(min_speedup), measure=measure
    )
    new = {}
    for bs in sorted({c.block_size for c in report if c.block_size is not None}):
        group = {c.name: dense[c.name] for c in report if c.block_size == bs}
        for n, mask in block_masks(group, sparsity, scope, bs).items():
            new[id(layers[n])] = BlockSparseLinear.from_linear(group[n], mask.to(group[n].weight.device), block_size=bs)
    # a layer that was sparse and is now chosen dense becomes the nn.Linear of its current weight
    new.update(
        {
            id(layers[c.name]): dense[c.name]
            for c in report
            if c.block_size is None and dense[c.name] is not layers[c.name]
        }
    )
    _swap(model, new)
    model.sparsify_report = report
    return model


def densify_(model: nn.Module) -> nn.Module:
    """Swap every ``MaskedLinear`` / ``BlockSparseLinear`` / ``SemiStructuredLinear`` back for an
    ``nn.Linear`` holding its (masked / block-sparse / 2:4) weight. Returns ``model``."""
    sparse = SPARSE_LAYERS
    if isinstance(model, sparse):
        raise ValueError(
            f"model: is itself a {type(model).__name__} and cannot be swapped in place; use model.to_linear()"
        )
    _swap(model, {id(m): m.to_linear() for m in model.modules() if isinstance(m, sparse)})
    return model

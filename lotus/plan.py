"""What a run consists of, from its config (and, once the sweep has run, the essential sparsities):
pruned layouts and targets, prune replicates, fine-tuning arms and their seeds, and where each arm's
start model lives. The pipeline runs this plan; ``results`` reads it back; neither imports the other.

Arms are named ``<start>/<data>`` (see ``finetune.parse_arm``). The *headline* arm is named in the
config before the run (``--headline``): the report's goal is judged on it alone, the other arms are
exploratory. The headline, ``dense/full`` and the compute-matched dense arms run ``main_seeds``
seeds, every other arm ``seeds``. Fine-tuning seed k of an arm that starts from a pruned model
starts from prune replicate ``k % prune_seeds``, so the arm's spread over seeds includes the
pruning's.
"""

from __future__ import annotations

from . import finetune as ft

MATCHED = ("dense/matched-cheapest", "dense/matched-headline")


def layouts(cfg) -> list[str]:
    """Pruned layouts of a run: unstructured (the paper's) and ``--layout``."""
    return ["unstructured"] + ([cfg["layout"]] if cfg["layout"] != "unstructured" else [])


def essential_target(run, cfg, layout) -> float:
    """The sparsity a layout's arms start from: its essential sparsity (the first positive sweep step if 0)."""
    if layout == "2:4":
        return 0.5
    sw = run.result("prune/sweep")["layouts"][layout]
    return round(sw["essential_sparsity"] or min(s for s in cfg["sweep"] if s > 0), 6)


def prune_targets(run, cfg, layout: str) -> list[float]:
    """Sparsities at which ``layout`` is pruned: its essential sparsity and, for unstructured, also
    ``--compare-sparsities``."""
    if layout == "2:4":
        return [0.5]
    ess = essential_target(run, cfg, layout)
    if layout != "unstructured":  # a structured layout only where its arms start
        return [ess]
    return sorted({ess, *(round(s, 6) for s in cfg["compare_sparsities"])})


def prune_tag(layout: str, target: float) -> str:
    return f"{layout}@{target:g}"


def replicates(cfg) -> list[int]:
    return list(range(cfg.get("prune_seeds", 1)))


def replicate_of(cfg, seed_k: int) -> int:
    return seed_k % cfg.get("prune_seeds", 1)


def arms(cfg) -> list[str]:
    """The run's fine-tuning arms, in table order (the compute-matched dense arms last)."""
    if cfg.get("arms"):
        out = list(cfg["arms"])
    else:
        isp = "instant" if cfg["isp_recipe"] == "instant-soup" else "isp"
        out = ft.default_arms(cfg["layout"], cfg["policies"], cfg.get("compare_keeps") or (), isp)
    head = cfg.get("headline")
    if head and head not in out and head not in MATCHED:
        out.append(head)
    if cfg.get("matched", True):
        out += [m for m in MATCHED if m not in out]
    return out


def main_arms(cfg) -> list[str]:
    """Arms that run ``main_seeds`` seeds: the headline, dense full-data fine-tuning, the matched rows."""
    return [a for a in arms(cfg) if a in ("dense/full", cfg.get("headline"), *MATCHED)]


def seeds_of(cfg, arm: str) -> int:
    return max(cfg["seeds"], cfg.get("main_seeds") or 0) if arm in main_arms(cfg) else cfg["seeds"]


def max_seeds(cfg) -> int:
    return max(seeds_of(cfg, a) for a in arms(cfg))


def start_of(arm: str) -> str:
    return arm.split("/")[0]


def start_path(run, cfg, start: str, replicate: int = 0):
    """(model file, masks file or None) of an arm's start model."""
    if start == "dense":
        return "models/start.pt", None
    layout, _, method = start.rpartition("-")
    tag = prune_tag(layout, essential_target(run, cfg, layout))
    if method == "oneshot":
        return "models/start.pt", f"masks/{layout}/oneshot@{essential_target(run, cfg, layout):g}.pt"
    return f"models/{tag}/r{replicate}/{method}.pt", None


def prune_stage(layout: str, target: float, replicate: int) -> str:
    return f"prune/{prune_tag(layout, target)}/r{replicate}"


def tickets_stage(start: str, replicate: int) -> str:
    """The stage that scores the training images with an arm's start model (dense: the score stage)."""
    return "score" if start == "dense" else f"tickets/{start}/r{replicate}"

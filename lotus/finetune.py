"""Stage 5, fine-tuning arms: a start model (dense or pruned), the layers it trains on, and what each
step sees (every patch, or a ticket policy's patches).

An arm is named ``<start>/<data>``:
  start  ``dense`` or ``<layout>-<method>``: ``unstructured-oneshot``, ``unstructured-isp``,
         ``block-isp``, ``unstructured-control``, ... (the prune stage's models). Unstructured
         starts fine-tune on ``MaskedLinear`` (pruned weights stay zero, no FLOPs saved), block
         starts on ``BlockSparseLinear`` for qkv, proj, fc1 and fc2 (the head stays dense), 2:4 on
         ``MaskedLinear`` with the 2:4 mask (no 2:4 kernel on CPU)
  data   ``full`` (every patch) or a ticket policy (``lotus.tickets.POLICIES``) at the run's keep
         ratio, or ``<policy>@<keep>`` at another one; ``matched-cheapest`` / ``matched-headline``
         (dense start only): every patch, for as many steps as fit in the whole-job seconds of the
         cheapest / the headline arm (the run's ``budget`` stage decides them)

Every arm runs ``--seeds`` times; seed s is the same for every arm (same data order, same
initial state), so arms sharing a start model differ only in the patches they see and are paired
image by image and seed by seed.
"""

from __future__ import annotations

from .data import ImageSet
from .tickets import POLICIES
from .train import epochs_to_within, train

METHODS = ("oneshot", "isp", "issp", "control", "instant")
BUDGETS = ("matched-cheapest", "matched-headline")


def parse_arm(name: str) -> dict:
    """{"start", "layout", "method", "policy", "keep", "budget"} of an arm name; keep None = the run's."""
    if name.count("/") != 1:
        raise ValueError(f"arm: expected <start>/<data>, got {name!r}")
    start, data = name.split("/")
    if data in BUDGETS:
        if start != "dense":
            raise ValueError(f"arm {name!r}: a compute-matched arm starts from the dense model (dense/{data})")
        return {"start": start, "layout": "dense", "method": None, "policy": "full", "keep": None, "budget": data}
    if start == "dense":
        layout, method = "dense", None
    else:
        layout, _, method = start.rpartition("-")
        if layout not in ("unstructured", "block", "2:4") or method not in METHODS:
            raise ValueError(
                f"arm {name!r}: start must be 'dense' or <layout>-<method> with layout in "
                f"unstructured/block/2:4 and method in {', '.join(METHODS)}"
            )
    policy, _, keep = data.partition("@")
    if policy != "full" and policy not in POLICIES:
        raise ValueError(f"arm {name!r}: data must be 'full' or one of {', '.join(POLICIES)}")
    if keep and policy == "full":
        raise ValueError(f"arm {name!r}: 'full' takes no keep ratio")
    try:
        k = float(keep) if keep else None
    except ValueError:
        raise ValueError(f"arm {name!r}: keep ratio {keep!r} is not a number")
    if k is not None and not 0 < k <= 1:
        raise ValueError(f"arm {name!r}: keep ratio must be in (0, 1], got {k}")
    return {"start": start, "layout": layout, "method": method, "policy": policy, "keep": k, "budget": None}


def default_arms(layout: str, policies, extra_keeps=(), isp="isp") -> list[str]:
    """The cost table's arms: dense full; unstructured ISP (the paper's pruning); ``layout`` ISP full;
    dense tickets with their two controls (a fixed random subset, random patches every step);
    ``layout`` ISP with every policy; extra keeps for fixed tickets vs random. (The compute-matched
    dense arms are added by ``plan.arms``.)"""
    arms = ["dense/full", f"unstructured-{isp}/full"]
    if layout != "unstructured":
        arms.append(f"{layout}-{isp}/full")
    arms += ["dense/fixed", "dense/fixed_random", "dense/random"]
    arms += [f"{layout}-{isp}/{p}" for p in policies]
    for k in extra_keeps:
        arms += [f"{layout}-{isp}/fixed@{k:g}", f"{layout}-{isp}/random@{k:g}"]
    out = []
    for a in arms:  # keep order, drop repeats
        if a not in out:
            out.append(a)
    return out


def finetune(
    model,
    train_data: ImageSet,
    val_data: ImageSet,
    cfg: dict,
    *,
    seed: int,
    keep_fn=None,
    augment: bool | str = False,
    desc: str = "finetune",
    evaluate_each_epoch: bool = True,
    steps: int | None = None,
) -> dict:
    """Fine-tune ``model`` in place (``steps``: that many steps instead of the run's epochs); returns
    its history plus ``epochs_to_within_1`` (first epoch within 1 point of the final accuracy) and
    ``train_s`` / ``train_cpu_s`` (training seconds, evaluation excluded)."""
    hist = train(
        model,
        train_data,
        val_data if evaluate_each_epoch else None,
        epochs=cfg["finetune_epochs"],
        steps=steps,
        lr=cfg["finetune_lr"],
        batch_size=cfg.get("finetune_batch_size") or cfg["batch_size"],
        seed=seed,
        optimizer=cfg["optimizer"],
        weight_decay=cfg["weight_decay"],
        warmup=cfg["warmup"],
        bf16=cfg["bf16"],
        keep_fn=keep_fn,
        augment=augment,
        eval_batch_size=cfg["eval_batch_size"],
        clip_grad=cfg.get("clip_grad") or None,
        desc=desc,
    )
    hist["final_acc"] = hist["val_acc"][-1] if hist["val_acc"] else None
    hist["epochs_to_within_1"] = epochs_to_within(hist["val_acc"], 1.0)
    return hist

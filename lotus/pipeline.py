"""The stages of a run, each redone from scratch unless its completion marker exists.

A stage reads its inputs from the run directory, seeds itself from (run seed, stage name), writes
its outputs atomically and then its marker (``RunDir.mark_done``). Resuming after a kill therefore
redoes exactly the unfinished stages and reproduces an uninterrupted run bit for bit (same
machine, same ``--threads``). Under torchrun only rank 0 writes; every rank computes.

Tasks (``lotus.task``): the model is pretrained on the *source* task, then everything else works on
the *target* task: its training images minus a *selection* split (where every choice is made) and
its validation images (every reported accuracy; they choose nothing).

Stages: pretrain (source task; pretraining is listed apart from the job's cost) -> probe (the start
model: a linear probe for the target) -> score (sink rules, the start model's tickets) ->
prune/sweep (per layout) -> prune/<layout>@<sparsity>/r<replicate> (one-shot, ISP, ISSP, control,
Instant Soup) -> tickets/<start>/r<replicate> -> finetune/<arm>/s<seed> -> budget (the
compute-matched dense arms' steps, after seed 0 of every other arm) -> timing -> report. Every part
of a stage that a user pays for records its wall and CPU seconds (``lotus.cost``). With ``jobs`` > 1
the prune replicates and the fine-tuning runs go ``jobs`` at a time in worker processes (same
results: each stage seeds itself and is timed in its own process).
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import functools
import math
import multiprocessing
import time

import torch

from lotus_kernels import machine, sparsify_
from lotus_kernels.vit_scores import BLOCK_RULES

from . import cost as cost_mod
from . import finetune as ft
from . import model as model_mod
from . import plan, probe, prune, report, task, tickets
from .canvas import coverage, object_recall
from .cost import Clock
from .errors import LotusError
from .rundir import RunDir, stage_seed
from .train import barrier, evaluate, is_main, lr_at, predict, time_steps, train, world


def setup(cfg: dict) -> None:
    torch.set_num_threads(cfg["threads"])  # results depend on the reduction order: fix it per run


def _eval(cfg, data):
    return lambda m: evaluate(m, data, batch_size=cfg["eval_batch_size"], bf16=cfg["bf16"], desc="eval")


def _predictions(cfg, model, data) -> dict:
    """Per-image record of a model on ``data``: predicted class and correctness (``preds/*.pt``)."""
    return _record(predict(model, data, batch_size=cfg["eval_batch_size"], bf16=cfg["bf16"]), data)


def _record(pred, data) -> dict:
    return {"pred": pred.to(torch.int16), "correct": pred == data.y}


def _acc(rec) -> float:
    return 100.0 * float(rec["correct"].float().mean())


def _cover(data, model):
    """Object pixels per patch of each image of ``data`` (None without object boxes)."""
    boxes = data.boxes
    if boxes is None:
        return None
    return coverage(boxes, data.img_size, model.patch_embed.patch_size[0])


# ---------------------------------------------------------------- models on disk
def num_target(cfg) -> int:
    return len(cfg["target_classes"])


def fresh_model(cfg: dict, num_classes: int | None = None):
    """The run's architecture with fresh weights (no download, no checkpoint): to load saved states."""
    return model_mod.build(
        dict(cfg, pretrained=False, checkpoint=None), num_classes or num_target(cfg), cfg["img_size"]
    )


def load_model(run: RunDir, cfg: dict, name: str, num_classes: int | None = None):
    """A saved model (dense or sparse: its masks come with the state_dict) rebuilt from the run dir."""
    sd = run.load_torch(name)
    masks = {k[: -len(".mask")]: v for k, v in sd.items() if k.endswith(".mask")}
    model = model_mod.with_masks(fresh_model(cfg, num_classes), masks)
    model.load_state_dict(sd)
    return model


def save_model(run: RunDir, name: str, model) -> None:
    """Saved with elementwise masks (block layers as MaskedLinear: the same function), so every
    model of a run loads the same way."""
    if not is_main():
        return
    masks = prune.masks_of(model)
    if any(isinstance(m, prune.BlockSparseLinear) for m in model.modules()):
        model = sparsify_(copy.deepcopy(model).cpu(), masks=masks)  # block -> MaskedLinear, same weights
    run.save_torch(name, {k: v.detach().cpu() for k, v in model.state_dict().items()})


def pruner_for(cfg, layout: str, score: str | None = None, grad_data=None) -> prune.Pruner:
    score = score or ("l2" if layout == "block" else "l1")
    return prune.Pruner(
        layout=layout,
        block_size=cfg["block_size"],
        score=score,
        grad_data=grad_data,
        seed=stage_seed(cfg["seed"], "grad-score"),
    )


def load_start(run, cfg, start: str, replicate: int = 0):
    """An arm's start model, in the layers it fine-tunes on (block starts: BlockSparseLinear)."""
    path, masks = plan.start_path(run, cfg, start, replicate)
    model = load_model(run, cfg, path)
    if masks:
        model = prune.apply_masks(model, run.load_torch(masks))
    layout = start.rpartition("-")[0] if start != "dense" else "dense"
    if layout == "block":
        sparsify_(model, masks=prune.masks_of(model), layout="block", block_size=cfg["block_size"])
    return model


def scoring(run, cfg) -> dict:
    """How the run scores a patch, as ``tickets.score`` keywords: the sink rule (``--sink``) and
    whose attention (``--score-blocks``: the last block's or every block's mean); an ``auto`` option
    is what the score stage chose on the selection split."""
    blocks = cfg.get("score_blocks", "last")
    chosen = run.result("score") if "auto" in (cfg["sink"], blocks) else {}
    return {
        "sink": chosen["sink"] if cfg["sink"] == "auto" else cfg["sink"],
        "blocks": chosen["blocks"] if blocks == "auto" else blocks,
    }


# ---------------------------------------------------------------- stages
def stage_pretrain(run, cfg):
    """The model the job starts from: trained on the source task (listed apart from the job's cost),
    or a checkpoint / timm's pretrained weights as they are."""
    src_tr, src_va = task.source_sets(cfg)
    torch.manual_seed(stage_seed(cfg["seed"], "model-init"))
    classes = len(cfg["source_classes"]) or num_target(cfg)
    model = model_mod.build(cfg, classes, cfg["img_size"])
    out = {
        "head_classes": classes,
        "n_source_train": len(src_tr) if src_tr is not None else 0,
        "n_source_val": len(src_va) if src_va is not None else 0,
        "source_val_acc": None,
        "history": None,
        "params": sum(p.numel() for p in model.parameters()),
        "cost": cost_mod.zero(),
    }
    if cfg["pretrain_epochs"] and src_tr is not None:
        hist = train(
            model,
            src_tr,
            src_va,
            epochs=cfg["pretrain_epochs"],
            lr=cfg["lr"],
            batch_size=cfg["batch_size"],
            seed=stage_seed(cfg["seed"], "pretrain"),
            optimizer=cfg["optimizer"],
            weight_decay=cfg["weight_decay"],
            warmup=cfg["warmup"],
            bf16=cfg["bf16"],
            eval_batch_size=cfg["eval_batch_size"],
            augment=cfg.get("augment", False),
            clip_grad=cfg.get("clip_grad") or None,
            desc="pretrain",
        )
        out.update(
            history=hist,
            source_val_acc=hist["val_acc"][-1] if hist["val_acc"] else None,
            cost={"wall": hist["train_s"], "cpu": hist["train_cpu_s"]},
        )
    save_model(run, "models/pretrained.pt", model)
    return out


def stage_probe(run, cfg):
    """The start model: the pretrained backbone with a linear probe for the target task (weight
    decay chosen on the selection split). Its accuracy is the no-fine-tuning row."""
    tr, sel, va = task.target_sets(cfg)
    model = load_model(run, cfg, "models/pretrained.pt", run.result("pretrain")["head_classes"])
    clock = Clock()
    with clock:
        info = probe.linear_probe(model, tr, sel, batch_size=cfg["eval_batch_size"], bf16=cfg["bf16"])
    rec = _predictions(cfg, model, va)
    save_model(run, "models/start.pt", model)
    if is_main():
        run.save_torch("preds/start.pt", rec)
    return {
        **info,
        "val_acc": _acc(rec),
        "n_train": len(tr),
        "n_select": len(sel) if cfg.get("select_fraction") else 0,
        "n_val": len(va),
        "cost": {"probe": clock.as_dict()},
    }


AUTO_ORDER = ("none", "outlier", "norm")  # "first" scores patches exactly like "none"; ties go to the simpler


def stage_score(run, cfg):
    """The sink rules compared (accuracy of the start model seeing only each rule's ticket patches,
    and with canvas data the object-patch recall, on the selection and validation images, beside
    random patches at the same count); the run's rule (``--sink``, or the best accuracy on the
    selection split with ``auto``); the start model's tickets of the training images."""
    tr, sel, va = task.target_sets(cfg)
    model = load_model(run, cfg, "models/start.pt")
    keep = cfg["keep_ratio"]
    choose = Clock()  # what the auto options cost: scoring + ticket accuracy on the selection split
    opt = cfg.get("score_blocks", "last")
    block_sets = BLOCK_RULES if opt == "auto" else (opt,)  # ("last", "mean"): ties go to the last (LOTUS's)
    by_blocks, val_preds, val_kept = {}, {}, {}
    for blocks in block_sets:
        rules = by_blocks[blocks] = {}
        for rule in tickets.SINKS:
            r = {}
            for split, d in (("select", sel), ("val", va)):
                with choose if split == "select" else Clock():
                    s, f = tickets.score(
                        model, d, batch_size=cfg["eval_batch_size"], blocks=blocks, sink=rule, return_flagged=True
                    )
                    kept = tickets.keep_indices(s, keep)
                    rec = _record(tickets.ticket_predict(model, d, kept, batch_size=cfg["eval_batch_size"]), d)
                cover = _cover(d, model)
                r[split] = {
                    "accuracy": _acc(rec),
                    "flagged_per_image": float(f.sum(1).float().mean()),
                    "object_recall": None if cover is None else float(object_recall(kept, cover).mean()),
                }
                if split == "val":
                    val_preds[blocks, rule], val_kept[blocks, rule] = rec, kept
            rules[rule] = r
    g = torch.Generator().manual_seed(stage_seed(cfg["seed"], "random-ticket"))
    n = model.patch_embed.num_patches
    from lotus_kernels.select import random_keep

    rand = {}
    for split, d in (("select", sel), ("val", va)):
        kept = random_keep(len(d), n, keep, generator=g)
        rec = _record(tickets.ticket_predict(model, d, kept, batch_size=cfg["eval_batch_size"]), d)
        cover = _cover(d, model)
        rand[split] = {
            "accuracy": _acc(rec),
            "object_recall": None if cover is None else float(object_recall(kept, cover).mean()),
        }
        if split == "val":
            random_val = kept
            if is_main():
                run.save_torch("preds/sink_random.pt", rec)

    def select_acc(blocks, rule):  # ties go to the simpler rule, then to the last block
        return (by_blocks[blocks][rule]["select"]["accuracy"], -AUTO_ORDER.index(rule), -BLOCK_RULES.index(blocks))

    sinks = AUTO_ORDER if cfg["sink"] == "auto" else (cfg["sink"],)
    blocks, rule = max(((b, r) for b in block_sets for r in sinks), key=lambda br: select_acc(*br))
    best = max(AUTO_ORDER, key=lambda r: select_acc(blocks, r))
    if is_main():  # the chosen blocks' as preds/sink_<rule>.pt, the other blocks' as sink_<blocks>_<rule>.pt
        for (b, r), rec in val_preds.items():
            run.save_torch(f"preds/sink_{r}.pt" if b == blocks else f"preds/sink_{b}_{r}.pt", rec)
        run.save_torch(VIEWS_FILE, {"tickets": val_kept[blocks, rule], "random": random_val})
    scoring = Clock()
    with scoring:
        scores, flagged = tickets.score(
            model, tr, batch_size=cfg["eval_batch_size"], blocks=blocks, sink=rule, return_flagged=True
        )
    cover = _cover(tr, model)
    recall_train = None if cover is None else float(object_recall(tickets.keep_indices(scores, keep), cover).mean())
    if is_main():
        run.save_torch("tickets/start.pt", {"scores": scores, "flagged": flagged})
        if cfg["overlay_images"] > 0:
            _overlay(run, cfg, model, va, {"sink": rule, "blocks": blocks}, keep)
    return {
        "num_patches": n,
        "keep": keep,
        "kept": int(tickets.keep_indices(scores[:1], keep).shape[1]),
        "sink": rule,
        "sink_option": cfg["sink"],
        "blocks": blocks,
        "blocks_option": opt,
        "flagged_per_image": float(flagged.sum(1).float().mean()),
        "rules": by_blocks[blocks],  # the chosen blocks' rules
        "rules_by_blocks": by_blocks,
        "random": rand,
        "best_rule_on_select": best,
        "object_recall_train": recall_train,
        "cost": {"sink_choice": choose.as_dict(), "train_scores": scoring.as_dict()},
    }


def _overlay(run, cfg, model, data, how, keep, name="tickets.png"):
    """tickets.png: validation images, the start model's score maps and kept patches (object boxes in
    green on canvas data; the patches a sink rule changes in red)."""
    import matplotlib.pyplot as plt

    rule = how["sink"]
    shown = "outlier" if rule in ("none", "first") else rule  # show what a patch rule would change
    sub = data.subset(torch.arange(min(cfg["overlay_images"], len(data))))
    s_fig, f_fig = tickets.score(model, sub, blocks=how["blocks"], sink=shown, return_flagged=True)
    fig = tickets.overlay_figure(
        sub,
        s_fig,
        keep,
        model.patch_embed.patch_size[0],
        cfg["overlay_images"],
        flagged=f_fig,
        rule=shown,
        boxes=sub.boxes,
        blocks=how["blocks"],
    )
    run.save_figure(name, fig)
    plt.close(fig)


def stage_sweep(run, cfg):
    """Per layout: one-shot sweep on the selection split with every candidate score, the best score
    (highest mean accuracy over the sweep), its essential sparsity, and its sweep on validation."""
    tr, sel, va = task.target_sets(cfg)
    model = load_model(run, cfg, "models/start.pt")
    out = {}
    for layout in plan.layouts(cfg):
        clock = Clock()  # what choosing the score and the sparsity costs (the validation sweep is the report's)
        with clock:
            if layout == "block":
                cands = list(prune.SCORES) if cfg["block_score"] == "auto" else [cfg["block_score"]]
            else:
                cands = ["l1"]
            sparsities = [0.0, 0.5] if layout == "2:4" else sorted({0.0, *cfg["sweep"]})
            by_score = {}
            for sc in cands:
                pr = pruner_for(cfg, layout, sc, grad_data=tr)
                by_score[sc] = prune.sweep(model, sparsities, _eval(cfg, sel), pr)
            best = max(cands, key=lambda sc: sum(p["accuracy"] for p in by_score[sc]))
            ess = prune.essential_sparsity(by_score[best], cfg["tolerance"])
            pr = pruner_for(cfg, layout, best, grad_data=tr)
            scores = pr.scores(model)
        val_pts = prune.sweep(model, sparsities, _eval(cfg, va), pr)
        out[layout] = {
            "scores": by_score,
            "score": best,
            "essential_sparsity": ess,
            "sweep_val": val_pts,
            "chosen_on": "select" if cfg.get("select_fraction") else "val",
            "cost": clock.as_dict(),
        }
        target = ess or min(s for s in sparsities if s > 0)
        targets = (
            [0.5]
            if layout == "2:4"
            else [round(target, 6)]
            if layout != "unstructured"
            else sorted({round(target, 6), *(round(x, 6) for x in cfg["compare_sparsities"])})
        )
        if is_main():
            for s in targets:
                run.save_torch(f"masks/{layout}/oneshot@{s:g}.pt", pr.masks_from(scores, s))
    return {"layouts": out, "start_acc_val": out["unstructured"]["sweep_val"][0]["accuracy"]}


def ft_batch(cfg) -> int:
    """Batch size of everything that fine-tunes the start model (arms, weak copies, recovery)."""
    return cfg.get("finetune_batch_size") or cfg["batch_size"]


def _train_kw(cfg) -> dict:
    return dict(
        batch_size=ft_batch(cfg),
        optimizer=cfg["optimizer"],
        weight_decay=cfg["weight_decay"],
        warmup=cfg["warmup"],
        bf16=cfg["bf16"],
        clip_grad=cfg.get("clip_grad") or None,
    )


def stage_prune(run, cfg, layout: str, target: float, replicate: int, weak_cache: dict):
    """At one (layout, sparsity), one replicate (its own seeds): one-shot, ISP (ours), ISSP (ours),
    the matched control and Instant Soup (as published), each evaluated on validation with per-image
    predictions saved. Every method but one-shot ends with the same recovery pass after its final
    mask (same images, order and steps), and records what it cost."""
    tr, _, va = task.target_sets(cfg)
    start = load_model(run, cfg, "models/start.pt")
    sw = run.result("prune/sweep")["layouts"][layout]
    pr = pruner_for(cfg, layout, sw["score"], grad_data=tr)
    tag = f"{plan.prune_tag(layout, target)}/r{replicate}"
    seed = stage_seed(cfg["seed"], f"soup/r{replicate}")
    res = {"layout": layout, "target": target, "replicate": replicate, "score": sw["score"], "methods": {}}
    kw = _train_kw(cfg)

    def train_copy(m, data, cseed, desc, lr=None):
        train(m, data, None, epochs=cfg["isp_epochs"], lr=lr or cfg["isp_lr"], seed=cseed, desc=desc, **kw)

    def recover(m):
        rseed = stage_seed(seed, "recover")
        train(
            m,
            prune.subset_of(tr, cfg["isp_subset"], rseed),
            None,
            epochs=cfg["isp_epochs"],
            lr=cfg["isp_lr"],
            seed=rseed,
            desc=f"recover {tag}",
            **kw,
        )

    def record(name, model, masks, extra=None):
        rec = _predictions(cfg, model, va)
        save_model(run, f"models/{tag}/{name}.pt", model)
        if is_main():
            run.save_torch(f"masks/{tag}/{name}.pt", masks)
            run.save_torch(f"preds/{tag}/{name}.pt", rec)
        res["methods"][name] = {"accuracy": _acc(rec), "sparsity": prune.sparsity_of(masks), **(extra or {})}

    oneshot_masks = run.load_torch(f"masks/{layout}/oneshot@{target:g}.pt")
    record("oneshot", prune.apply_masks(copy.deepcopy(start), oneshot_masks), oneshot_masks, {"cost": cost_mod.zero()})
    common = dict(
        rounds=cfg["isp_rounds"],
        copies=cfg["isp_copies"],
        subset=cfg["isp_subset"],
        train_copy=train_copy,
        seed=seed,
        pruner=pr,
        weak_cache=weak_cache,
    )
    for name, merge in (("isp", cfg["isp_vote"]), ("issp", "union")):
        clock = Clock()
        with clock:
            model, masks, log = prune.soup_prune(start, tr, target=target, merge=merge, label=f"{name} {tag}", **common)
            recover(model)
        for entry in log:
            clock.add(entry.pop("reused_cost"))
        record(name, model, masks, {"rounds": log, "merge": merge, "cost": clock.as_dict()})
    clock = Clock()
    with clock:
        control = prune.apply_masks(copy.deepcopy(start), oneshot_masks)
        recover(control)
    record("control", control, oneshot_masks, {"merge": "one-shot mask + the recovery pass", "cost": clock.as_dict()})
    if (
        cfg.get("instant_soup")
        and layout != "2:4"
        and (layout == "unstructured" or cfg["isp_recipe"] == "instant-soup")
    ):
        clock = Clock()
        with clock:
            model, masks, log = _instant_soup(cfg, start, tr, target, pr, seed, tag, train_copy)
            recover(model)
        record("instant", model, masks, {"rounds": log, "merge": "union (uncalibrated)", "cost": clock.as_dict()})
    # one-shot at each merged mask's actual sparsity: the fair comparison for a vote / union
    scores = pr.scores(start)
    for name, r in list(res["methods"].items()):
        if name == "oneshot" or layout == "2:4":
            continue
        s = r["sparsity"]
        if abs(s - res["methods"]["oneshot"]["sparsity"]) < 1e-9:
            r["oneshot_at_actual"] = "oneshot"
            continue
        key = f"oneshot_at_{name}"
        m = pr.masks_from(scores, s)
        record(key, prune.apply_masks(copy.deepcopy(start), m), m)
        r["oneshot_at_actual"] = key
    return res


def _instant_soup(cfg, start, tr, target, pr, seed, tag, train_copy):
    """Instant Soup as published: the main model's passes over half of the data continue one
    optimizer and one learning-rate schedule (planned for twice the iterations a single copy's 10%
    steps need to come within 5 points of the target, so the pruning happens in its first half, as
    in the published run); its copies warm up as the published code's do (linear warm-up over 500
    of 1000 steps, from a fresh optimizer, towards the main model's current learning rate)."""
    kw = _train_kw(cfg)
    need = max(1, math.ceil(math.log(max(1e-9, 1 - target + cfg["instant_stop"])) / math.log(1 - cfg["instant_step"])))
    main_steps = math.ceil(math.ceil(cfg["instant_main_subset"] * len(tr)) / ft_batch(cfg))
    total = 2 * (need + 1) * main_steps
    state = {"opt": {}, "step": 0}

    def train_main(m, data, mseed):
        prune._mask_optimizer_state(m, state["opt"], prune.masks_of(m))
        h = train(
            m,
            data,
            None,
            epochs=1,
            lr=cfg["isp_lr"],
            seed=mseed,
            desc=f"instant main {tag}",
            optimizer_state=state["opt"],
            schedule=(state["step"], total),
            **kw,
        )
        state["step"] += h["steps"]
        return lr_at(state["step"], total, cfg["isp_lr"], round(cfg["warmup"] * total))

    def copy_trainer(m, data, cseed, desc, lr):
        train(
            m,
            data,
            None,
            epochs=cfg["isp_epochs"],
            lr=lr,
            seed=cseed,
            desc=desc,
            schedule=(0, 1000),
            **dict(kw, warmup=0.5),
        )

    return prune.instant_soup_prune(
        start,
        tr,
        target=target,
        copies=cfg["instant_copies"],
        copy_subset=cfg["instant_subset"],
        main_subset=cfg["instant_main_subset"],
        step=cfg["instant_step"],
        stop_within=cfg["instant_stop"],
        train_copy=copy_trainer,
        train_main=train_main,
        seed=stage_seed(seed, "instant-soup"),
        pruner=pr,
        label=f"instant {tag}",
    )


def stage_start_scores(run, cfg, start: str, replicate: int):
    """Patch scores of the training images by an arm's start model (the model that is fine-tuned)."""
    tr, _, _ = task.target_sets(cfg)
    model = load_start(run, cfg, start, replicate)
    clock = Clock()
    with clock:
        s, f = tickets.score(
            model,
            tr,
            batch_size=cfg["eval_batch_size"],
            return_flagged=True,
            **scoring(run, cfg),
        )
    name = f"tickets/{start}/r{replicate}.pt"
    if is_main():
        run.save_torch(name, {"scores": s, "flagged": f})
    return {"file": name, "flagged_per_image": float(f.sum(1).float().mean()), "cost": clock.as_dict()}


def _scores_file(run, start: str, replicate: int) -> str:
    return "tickets/start.pt" if start == "dense" else run.result(plan.tickets_stage(start, replicate))["file"]


class _Recall:
    """Wraps a keep_fn and accumulates the object-patch recall of every selection it makes."""

    def __init__(self, inner, cover):
        self.inner, self.cover, self.sum, self.n = inner, cover, 0.0, 0
        self.image_frame = getattr(inner, "image_frame", False)
        if hasattr(inner, "new_epoch"):
            self.new_epoch = inner.new_epoch

    def __call__(self, x, ids):
        k = self.inner(x, ids)
        self.sum += float(object_recall(k.cpu(), self.cover[ids]).sum())
        self.n += len(ids)
        return k


def stage_finetune_one(run, cfg, arm: str, seed_k: int):
    tr, _, va = task.target_sets(cfg)
    spec = ft.parse_arm(arm)
    r = plan.replicate_of(cfg, seed_k)
    model = load_start(run, cfg, spec["start"], r)
    keep = spec["keep"] or cfg["keep_ratio"]
    seed = stage_seed(cfg["seed"], f"finetune/{seed_k}")
    keep_fn, augment, steps = None, cfg.get("finetune_augment") or "none", None
    if spec["budget"]:
        steps = run.result("budget")[spec["budget"]]["steps"]
    if spec["policy"] != "full":
        scores = None
        if spec["policy"] in cost_mod.NEEDS_SCORES:
            scores = run.load_torch(_scores_file(run, spec["start"], r))["scores"]
        keep_fn, own_augment = tickets.make_policy(
            spec["policy"],
            model=model,
            train_data=tr,
            scores=scores,
            keep=keep,
            **scoring(run, cfg),
            seed=stage_seed(cfg["seed"], f"policy/{seed_k}"),
            batch_size=cfg["eval_batch_size"],
            mix_top=cfg["mix_top"],
        )
        if own_augment:  # aug_rescore: flips + shifts, scored as the model sees the batch
            augment = "flip_shift"
        cover = _cover(tr, model)
        # recall needs indices of the canvas as stored: not from a batch that was flipped or shifted
        if cover is not None and (augment == "none" or keep_fn.image_frame):
            keep_fn = _Recall(keep_fn, cover)
    hist = ft.finetune(
        model,
        tr,
        va,
        cfg,
        seed=seed,
        keep_fn=keep_fn,
        augment=augment,
        steps=steps,
        desc=f"finetune {arm} s{seed_k}",
        evaluate_each_epoch=seed_k == 0,
    )
    rec = _predictions(cfg, model, va)
    save_model(run, f"models/finetune/{arm}/s{seed_k}.pt", model)
    if is_main():
        run.save_torch(f"preds/finetune/{arm}/s{seed_k}.pt", rec)
    after = _attention_after(run, cfg, model, va, arm, seed_k)
    views = _views(run, cfg, model, va)
    masks = prune.masks_of(model)
    hist.update(
        {
            "arm": arm,
            "seed_index": seed_k,
            "replicate": r,
            "accuracy": _acc(rec),
            "start": spec["start"],
            "policy": spec["policy"],
            "keep": 1.0 if spec["policy"] == "full" else keep,
            "layout": spec["layout"],
            "sparsity": prune.sparsity_of(masks) if masks else 0.0,
            "object_recall": keep_fn.sum / max(keep_fn.n, 1) if isinstance(keep_fn, _Recall) else None,
            "object_recall_after": after,
            "accuracy_views": views,
            "cost": {"wall": hist["train_s"], "cpu": hist["train_cpu_s"]},
        }
    )
    return hist


def _attention_after(run, cfg, model, va, arm, seed_k):
    """Object-patch recall of the fine-tuned model's own tickets of the validation images (canvas
    data; does fine-tuning teach the attention where the object is?); for dense/full seed 0 also
    tickets_finetuned.png, the same images as tickets.png."""
    cover = _cover(va, model)
    if cover is None:
        return None
    how = scoring(run, cfg)
    s = tickets.score(model, va, batch_size=cfg["eval_batch_size"], **how)
    if arm == "dense/full" and seed_k == 0 and is_main() and cfg["overlay_images"] > 0:
        _overlay(run, cfg, model, va, how, cfg["keep_ratio"], name="tickets_finetuned.png")
    return float(object_recall(tickets.keep_indices(s, cfg["keep_ratio"]), cover).mean())


VIEWS_FILE = "tickets/val.pt"  # the score stage's kept patches of the validation images: chosen tickets, random


def _views(run, cfg, model, va):
    """Accuracy (%) of a fine-tuned model on the validation images seen only through the start model's
    tickets and only through random patches at the same count (the score stage's; ``None`` for a run
    directory older than them). Which view did fine-tuning fit? A model can score better on tickets
    than on whole images: the tickets are then a biased view of the image that it learnt, not a less
    informative one, and a fixed-ticket arm loses at evaluation, where every patch is seen."""
    if not run.exists(VIEWS_FILE):
        return None
    kept = run.load_torch(VIEWS_FILE)
    return {
        view: _acc(_record(tickets.ticket_predict(model, va, kept[view], batch_size=cfg["eval_batch_size"]), va))
        for view in ("tickets", "random")
    }


def stage_budget(run, cfg):
    """Steps of the compute-matched dense arms: dense full-data fine-tuning for the whole-job seconds
    (the run's cost basis) of the cheapest arm and of the headline arm, from seed 0's records, at
    dense/full's own cost per step (``--matched-steps`` fixes them instead, for reproducible tests)."""
    basis = cfg["cost_basis"]
    jobs = {a: cost_mod.job(run, cfg, a, 0)["total"][basis] for a in plan.arms(cfg) if a not in plan.MATCHED}
    dense = run.result("finetune/dense/full/s0")
    probe_s = run.result("probe")["cost"]["probe"][basis]
    per_step = dense["cost"][basis] / max(dense["steps"], 1)
    cheapest = min(jobs, key=jobs.get)
    out = {"basis": basis, "dense_step_s": per_step, "jobs_s0": jobs}
    for name, arm in (("matched-cheapest", cheapest), ("matched-headline", cfg.get("headline") or cheapest)):
        target_s = jobs[arm]
        steps = cfg.get("matched_steps") or max(1, math.floor((target_s - probe_s) / per_step))
        out[name] = {"arm": arm, "target_s": target_s, "steps": int(steps)}
    return out


def stage_timing(run, cfg):
    """Train-step time of every arm's configuration, interleaved on one batch (see ``train.time_steps``):
    in-run step times were taken minutes apart on a shared machine. Per-epoch re-scoring is not in a
    step (it is in the arm's fine-tuning seconds); per-step scoring is. Each arm's model (and its
    policy, which may score with that model) is rebuilt from the run directory for its turn, so one
    model and its optimizer state are alive at a time. The matched arms step like dense/full."""
    tr, _, _ = task.target_sets(cfg)
    how = scoring(run, cfg)
    setups = {"dense/full": (lambda: load_model(run, cfg, "models/start.pt"), {})}
    for arm in plan.arms(cfg):
        spec = ft.parse_arm(arm)
        if arm in setups or spec["budget"]:
            continue
        kw = {}
        if spec["policy"] != "full":
            keep = spec["keep"] or cfg["keep_ratio"]
            scores = None
            if spec["policy"] in cost_mod.NEEDS_SCORES:
                scores = run.load_torch(_scores_file(run, spec["start"], 0))["scores"]

            def policy(model, spec=spec, scores=scores, keep=keep):
                return tickets.make_policy(
                    spec["policy"],
                    model=model,
                    train_data=tr,
                    scores=scores,
                    keep=keep,
                    seed=0,
                    **how,
                    mix_top=cfg["mix_top"],
                )[0]

            kw["make_keep_fn"] = policy
        setups[arm] = (lambda start=spec["start"]: load_start(run, cfg, start), kw)
    med = time_steps(
        setups,
        tr,
        batch_size=ft_batch(cfg),
        rounds=cfg["timing_rounds"],
        seed=stage_seed(cfg["seed"], "timing"),
        optimizer=cfg["optimizer"],
        bf16=cfg["bf16"],
    )
    base = med["dense/full"]
    return {
        "step_time_s": med,
        "ratio_to_dense": {n: t / base for n, t in med.items()},
        "rounds": cfg["timing_rounds"],
        "batch_size": ft_batch(cfg),
    }


# ---------------------------------------------------------------- driver
@functools.cache
def _machine() -> str:
    return machine.summary()


def run_stage(run: RunDir, name: str, fn, *args, redo: bool = False):
    if run.done(name) and not redo:
        return run.result(name)
    if is_main():
        print(f"lotus: stage {name}", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn(*args)
    result["wall_s"], result["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    result["machine"] = _machine()  # seconds mean something only beside where they were measured
    barrier()  # every rank's files are in place before the marker says so
    if is_main():
        run.mark_done(name, result)
    barrier()
    return result


STAGES = ("pretrain", "probe", "score", "prune", "finetune", "timing", "report")


def _parallel(cfg: dict, calls) -> None:
    """Run ``calls`` [(fn, args)] — stages that read only finished stages' files and write only their
    own — ``cfg["jobs"]`` at a time in worker processes, in order; inline with one job or under
    torchrun (where the ranks share every stage). Each stage seeds itself and is timed in its own
    process, so results do not depend on the number of jobs. The first failure cancels what has not
    started and is raised here."""
    jobs = min(cfg.get("jobs") or 1, len(calls))
    if jobs <= 1 or world()[1] > 1:
        for fn, args in calls:
            fn(*args)
        return
    # spawn, not fork: a forked child would inherit the parent's OpenMP pool in whatever state it is
    ctx = multiprocessing.get_context("spawn")
    ex = cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=setup, initargs=(cfg,))
    try:
        futures = [ex.submit(fn, *args) for fn, args in calls]
        cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
        for f in futures:
            if f.done() and f.exception() is not None:
                raise f.exception()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _prune_replicate(run, cfg, r: int, redo: bool) -> None:
    weak_cache: dict = {}  # round-1 copies of this replicate, shared by its layouts and targets
    for layout in plan.layouts(cfg):
        for s in plan.prune_targets(run, cfg, layout):
            run_stage(run, plan.prune_stage(layout, s, r), stage_prune, run, cfg, layout, s, r, weak_cache, redo=redo)


def _finetune_one(run, cfg, arm: str, k: int, redo: bool) -> None:
    run_stage(run, f"finetune/{arm}/s{k}", stage_finetune_one, run, cfg, arm, k, redo=redo)


def prune_stages(run, cfg, redo=False):
    run_stage(run, "prune/sweep", stage_sweep, run, cfg, redo=redo)
    _parallel(cfg, [(_prune_replicate, (run, cfg, r, redo)) for r in plan.replicates(cfg)])


def finetune_stages(run: RunDir, cfg: dict, only=None, redo=False) -> None:
    chosen = plan.arms(cfg)
    if only:
        unknown = [a for a in only if a not in chosen]
        if unknown:
            raise LotusError(f"--only: unknown arm(s) {', '.join(unknown)}; this run's arms: {', '.join(chosen)}")
        chosen = [a for a in chosen if a in only]
    for arm in chosen:
        spec = ft.parse_arm(arm)
        if spec["policy"] in cost_mod.NEEDS_SCORES and spec["start"] != "dense":
            for k in range(plan.seeds_of(cfg, arm)):
                r = plan.replicate_of(cfg, k)
                run_stage(
                    run, plan.tickets_stage(spec["start"], r), stage_start_scores, run, cfg, spec["start"], r, redo=redo
                )
    plain = [a for a in chosen if a not in plan.MATCHED]
    matched = [a for a in chosen if a in plan.MATCHED]

    def calls(arms, seeds):
        return [(_finetune_one, (run, cfg, arm, k, redo)) for k in seeds for arm in arms if k < plan.seeds_of(cfg, arm)]

    # seed-major, seed 0 of every arm first: a cut-short run still has every arm at seed 0, and the
    # matched arms' steps come from the other arms' seed-0 jobs
    _parallel(cfg, calls(plain, [0]))
    if matched:
        run_stage(run, "budget", stage_budget, run, cfg, redo=redo)
    _parallel(cfg, calls(matched, [0]) + calls(plain + matched, range(1, plan.max_seeds(cfg))))


def run_all(run: RunDir, stages=STAGES, redo=False, only=None) -> None:
    cfg = run.config()
    setup(cfg)
    for st in stages:
        if st in ("pretrain", "probe", "score"):
            fn = {"pretrain": stage_pretrain, "probe": stage_probe, "score": stage_score}[st]
            run_stage(run, st, fn, run, cfg, redo=redo)
        elif st == "prune":
            prune_stages(run, cfg, redo=redo)
        elif st == "finetune":
            finetune_stages(run, cfg, only=only, redo=redo)
        elif st == "timing":
            if cfg.get("timing_rounds", 0) > 0:
                run_stage(run, st, stage_timing, run, cfg, redo=redo)
        elif st == "report":
            if is_main():  # no collective calls in here: other ranks are done
                print("lotus: stage report", flush=True)
                t0 = time.perf_counter()
                out = report.write(run)
                run.mark_done("report", dict(out, wall_s=time.perf_counter() - t0))
        else:
            raise ValueError(f"stage: unknown {st!r}")

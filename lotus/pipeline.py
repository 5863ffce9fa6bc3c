"""The stages of a run, each redone from scratch unless its completion marker exists.

A stage reads its inputs from the run directory, seeds itself from (run seed, stage name), writes
its outputs atomically and then its marker (``RunDir.mark_done``). Resuming after a kill therefore
redoes exactly the unfinished stages and reproduces an uninterrupted run bit for bit (same
machine, same ``--threads``). Under torchrun only rank 0 writes; every rank computes.

Data: the run's train split minus a *selection* split (``--select-fraction`` of it, never trained
on) on which the essential sparsity, the block score and the sink rule are chosen; every reported
accuracy is on the validation split, which chooses nothing.

Stages: pretrain -> score (dense tickets, sink rules) -> prune/sweep (per layout) ->
prune/<layout>@<sparsity> (one-shot, ISP, ISSP, control, Instant Soup) -> tickets/<start> (scores
by each start model that a ticket policy fine-tunes) -> finetune/<arm>/s<seed> -> timing -> report.
"""
from __future__ import annotations

import copy
import time

import torch

from lotus_kernels import sparsify_

from . import data as data_mod
from . import finetune as ft
from . import model as model_mod
from . import prune, report, tickets
from .errors import LotusError
from .rundir import RunDir, stage_seed
from .train import barrier, evaluate, is_main, predict, time_steps, train

TIMING_KEYS = ("step_time_s", "images_per_s", "wall_s")


def setup(cfg: dict) -> None:
    torch.set_num_threads(cfg["threads"])  # results depend on the reduction order: fix it per run


# ---------------------------------------------------------------- data
def split_data(cfg: dict, split=None):
    """(train, select, val): ``select`` is a seeded ``select_fraction`` of the train split, held out
    of all training; with fraction 0 it is the validation split itself (the report says so).
    ``split``: the (train, val) of ``data.load_split(cfg)`` when already loaded. Any source works
    (npz, cifar10, ImageFolder; after a stratified ``--limit``): only the ids are split."""
    tr, va = split or data_mod.load_split(cfg)
    frac = cfg.get("select_fraction", 0.0)
    if not frac:
        return tr, va, va
    n = len(tr)
    n_sel = max(1, round(frac * n))
    if n - n_sel < 1:
        raise LotusError(f"--select-fraction: {frac} leaves no training images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(stage_seed(cfg["seed"], "select")))
    return tr.subset(perm[n_sel:].sort().values), tr.subset(perm[:n_sel].sort().values), va


def _eval(cfg, data):
    return lambda m: evaluate(m, data, batch_size=cfg["eval_batch_size"], bf16=cfg["bf16"], desc="eval")


def _predictions(cfg, model, data) -> dict:
    """Per-image record of a model on ``data``: predicted class and correctness (``preds/*.pt``)."""
    return _record(predict(model, data, batch_size=cfg["eval_batch_size"], bf16=cfg["bf16"]), data)


def _record(pred, data) -> dict:
    return {"pred": pred.to(torch.int16), "correct": pred == data.y}


# ---------------------------------------------------------------- models on disk
def fresh_model(cfg: dict):
    """The run's architecture with fresh weights (no download, no checkpoint): to load saved states."""
    return model_mod.build(dict(cfg, pretrained=False, checkpoint=None), cfg["num_classes"], cfg["img_size"])


def load_model(run: RunDir, cfg: dict, name: str):
    """A saved model (dense or sparse: its masks come with the state_dict) rebuilt from the run dir."""
    sd = run.load_torch(name)
    masks = {k[: -len(".mask")]: v for k, v in sd.items() if k.endswith(".mask")}
    model = model_mod.with_masks(fresh_model(cfg), masks)
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


def layouts(cfg) -> list[str]:
    """Pruned layouts of a run: unstructured (the paper's) and ``--layout``."""
    return ["unstructured"] + ([cfg["layout"]] if cfg["layout"] != "unstructured" else [])


def pruner_for(cfg, layout: str, score: str | None = None, grad_data=None) -> prune.Pruner:
    score = score or ("l2" if layout == "block" else "l1")
    return prune.Pruner(layout=layout, block_size=cfg["block_size"], score=score, grad_data=grad_data,
                        seed=stage_seed(cfg["seed"], "grad-score"))


def prune_targets(run, cfg, layout: str) -> list[float]:
    """Sparsities at which ``layout`` is pruned by ISP / ISSP / control: its essential sparsity (the
    first positive sweep step if that is 0) and ``--compare-sparsities``."""
    if layout == "2:4":
        return [0.5]
    ess = _essential_target(run, cfg, layout)
    if layout != "unstructured":  # the paper's comparison; a structured layout only where its arms start
        return [ess]
    return sorted({ess, *(round(s, 6) for s in cfg["compare_sparsities"])})


def start_path(run, cfg, start: str):
    """(model file, masks file or None) of an arm's start model."""
    if start == "dense":
        return "models/dense.pt", None
    layout, _, method = start.rpartition("-")
    s = _essential_target(run, cfg, layout)
    if method == "oneshot":
        return "models/dense.pt", f"masks/{layout}/oneshot@{s:g}.pt"
    return f"models/{layout}@{s:g}/{method}.pt", None


def _essential_target(run, cfg, layout) -> float:
    if layout == "2:4":
        return 0.5
    sw = run.result("prune/sweep")["layouts"][layout]
    return round(sw["essential_sparsity"] or min(s for s in cfg["sweep"] if s > 0), 6)


def load_start(run, cfg, start: str):
    """An arm's start model, in the layers it fine-tunes on (block starts: BlockSparseLinear)."""
    path, masks = start_path(run, cfg, start)
    model = load_model(run, cfg, path)
    if masks:
        model = prune.apply_masks(model, run.load_torch(masks))
    layout = start.rpartition("-")[0] if start != "dense" else "dense"
    if layout == "block":
        sparsify_(model, masks=prune.masks_of(model), layout="block", block_size=cfg["block_size"])
    return model


def arms(cfg) -> list[str]:
    if cfg.get("arms"):
        return list(cfg["arms"])
    isp = "instant" if cfg["isp_recipe"] == "instant-soup" else "isp"
    return ft.default_arms(cfg["layout"], cfg["policies"], cfg.get("compare_keeps") or (), isp)


# ---------------------------------------------------------------- stages
def stage_pretrain(run, cfg):
    tr, sel, va = split_data(cfg)
    torch.manual_seed(stage_seed(cfg["seed"], "model-init"))
    model = model_mod.build(cfg, cfg["num_classes"], cfg["img_size"])
    opt_state = {} if cfg.get("instant_soup") else None
    hist = train(model, tr, va, epochs=cfg["pretrain_epochs"], lr=cfg["lr"], batch_size=cfg["batch_size"],
                 seed=stage_seed(cfg["seed"], "pretrain"), optimizer=cfg["optimizer"],
                 weight_decay=cfg["weight_decay"], warmup=cfg["warmup"], bf16=cfg["bf16"],
                 eval_batch_size=cfg["eval_batch_size"], augment=cfg.get("augment", False),
                 clip_grad=cfg.get("clip_grad") or None, desc="pretrain", optimizer_state=opt_state)
    acc = hist["val_acc"][-1] if hist["val_acc"] else evaluate(model, va, batch_size=cfg["eval_batch_size"])
    save_model(run, "models/dense.pt", model)
    if opt_state is not None and is_main():  # Instant Soup's weak copies start from it
        run.save_torch("models/dense_optimizer.pt", opt_state)
    if is_main():
        run.save_torch("preds/dense.pt", _predictions(cfg, model, va))
    return {"history": hist, "val_acc": acc, "n_train": len(tr), "n_val": len(va),
            "n_select": 0 if not cfg.get("select_fraction") else len(sel),
            "params": sum(p.numel() for p in model.parameters())}


def sink_rule(run, cfg) -> str:
    """The run's sink rule: ``--sink``, or with ``auto`` the one the score stage chose."""
    return run.result("score")["sink"] if cfg["sink"] == "auto" else cfg["sink"]


AUTO_ORDER = ("none", "outlier", "norm")  # "first" scores patches exactly like "none"; ties go to the simpler


def stage_score(run, cfg):
    """The sink rules compared (accuracy of the dense model seeing only each rule's ticket patches, on
    the selection and validation images, beside random patches at the same count); the run's rule
    (``--sink``, or the best on the selection split with ``auto``); dense tickets of the training images."""
    tr, sel, va = split_data(cfg)
    model = load_model(run, cfg, "models/dense.pt")
    keep = cfg["keep_ratio"]
    rules = {}
    for rule in tickets.SINKS:
        r = {}
        for split, d in (("select", sel), ("val", va)):
            s, f = tickets.score(model, d, batch_size=cfg["eval_batch_size"], sink=rule, return_flagged=True)
            rec = _record(tickets.ticket_predict(model, d, tickets.keep_indices(s, keep),
                                                 batch_size=cfg["eval_batch_size"]), d)
            r[split] = {"accuracy": 100.0 * float(rec["correct"].float().mean()),
                        "flagged_per_image": float(f.sum(1).float().mean())}
            if split == "val" and is_main():
                run.save_torch(f"preds/sink_{rule}.pt", rec)
        rules[rule] = r
    g = torch.Generator().manual_seed(stage_seed(cfg["seed"], "random-ticket"))
    n = model.patch_embed.num_patches
    from lotus_kernels.select import random_keep
    rand = {}
    for split, d in (("select", sel), ("val", va)):
        rec = _record(tickets.ticket_predict(model, d, random_keep(len(d), n, keep, generator=g),
                                             batch_size=cfg["eval_batch_size"]), d)
        rand[split] = 100.0 * float(rec["correct"].float().mean())
        if split == "val" and is_main():
            run.save_torch("preds/sink_random.pt", rec)
    best = max(AUTO_ORDER, key=lambda r: (rules[r]["select"]["accuracy"], -AUTO_ORDER.index(r)))
    rule = best if cfg["sink"] == "auto" else cfg["sink"]
    t0 = time.perf_counter()
    scores, flagged = tickets.score(model, tr, batch_size=cfg["eval_batch_size"], sink=rule, return_flagged=True)
    seconds = time.perf_counter() - t0
    if is_main():
        run.save_torch("tickets/dense.pt", {"scores": scores, "flagged": flagged, "seconds": seconds})
        if cfg["overlay_images"] > 0:
            import matplotlib.pyplot as plt
            shown = "outlier" if rule in ("none", "first") else rule  # show what a patch rule would change
            s_fig, f_fig = tickets.score(model, tr.subset(torch.arange(min(cfg["overlay_images"], len(tr)))),
                                         sink=shown, return_flagged=True)
            fig = tickets.overlay_figure(tr, s_fig, keep, model.patch_embed.patch_size[0], cfg["overlay_images"],
                                         flagged=f_fig, rule=shown)
            run.save_figure("tickets.png", fig)
            plt.close(fig)
    return {"num_patches": n, "keep": keep, "kept": int(tickets.keep_indices(scores[:1], keep).shape[1]),
            "sink": rule, "sink_option": cfg["sink"], "flagged_per_image": float(flagged.sum(1).float().mean()),
            "rules": rules, "random": rand, "best_rule_on_select": best, "score_seconds": seconds}


def stage_sweep(run, cfg):
    """Per layout: one-shot sweep on the selection split with every candidate score, the best score
    (highest mean accuracy over the sweep), its essential sparsity, and its sweep on validation."""
    tr, sel, va = split_data(cfg)
    model = load_model(run, cfg, "models/dense.pt")
    out = {}
    for layout in layouts(cfg):
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
        val_pts = prune.sweep(model, sparsities, _eval(cfg, va), pr)
        out[layout] = {"scores": by_score, "score": best, "essential_sparsity": ess, "sweep_val": val_pts,
                       "chosen_on": "select" if cfg.get("select_fraction") else "val"}
        target = ess or min(s for s in sparsities if s > 0)
        targets = ([0.5] if layout == "2:4" else [round(target, 6)] if layout != "unstructured"
                   else sorted({round(target, 6), *(round(x, 6) for x in cfg["compare_sparsities"])}))
        if is_main():
            scores = pr.scores(model)
            for s in targets:
                run.save_torch(f"masks/{layout}/oneshot@{s:g}.pt", pr.masks_from(scores, s))
    return {"layouts": out, "dense_acc_val": out["unstructured"]["sweep_val"][0]["accuracy"]}


def stage_prune(run, cfg, layout: str, target: float, weak_cache: dict):
    """At one (layout, sparsity): one-shot, ISP (ours), ISSP (ours), the matched control, and Instant
    Soup (as published), each evaluated on validation with per-image predictions saved."""
    tr, _, va = split_data(cfg)
    dense = load_model(run, cfg, "models/dense.pt")
    sw = run.result("prune/sweep")["layouts"][layout]
    pr = pruner_for(cfg, layout, sw["score"], grad_data=tr)
    tag = f"{layout}@{target:g}"
    res = {"layout": layout, "target": target, "score": sw["score"], "methods": {}}

    def train_copy(m, data, seed, desc, opt_state=None):
        train(m, data, None, epochs=cfg["isp_epochs"], lr=cfg["isp_lr"], batch_size=cfg["batch_size"], seed=seed,
              optimizer=cfg["optimizer"], weight_decay=cfg["weight_decay"], warmup=cfg["warmup"], bf16=cfg["bf16"],
              clip_grad=cfg.get("clip_grad") or None, desc=desc, optimizer_state=opt_state)

    def record(name, model, masks, extra=None):
        rec = _predictions(cfg, model, va)
        save_model(run, f"models/{tag}/{name}.pt", model)
        if is_main():
            run.save_torch(f"masks/{tag}/{name}.pt", masks)
            run.save_torch(f"preds/{tag}/{name}.pt", rec)
        res["methods"][name] = {"accuracy": 100.0 * float(rec["correct"].float().mean()),
                                "sparsity": prune.sparsity_of(masks),
                                **(extra or {})}

    oneshot_masks = run.load_torch(f"masks/{layout}/oneshot@{target:g}.pt")
    record("oneshot", prune.apply_masks(copy.deepcopy(dense), oneshot_masks), oneshot_masks)
    common = dict(rounds=cfg["isp_rounds"], copies=cfg["isp_copies"], subset=cfg["isp_subset"],
                  train_copy=train_copy, seed=stage_seed(cfg["seed"], "soup"), pruner=pr, weak_cache=weak_cache)
    methods = (("isp", cfg["isp_vote"], None), ("issp", "union", None), ("control", "majority", oneshot_masks))
    for name, merge, fixed in methods:
        model, masks, log = prune.soup_prune(dense, tr, target=target, merge=merge, fixed_masks=fixed,
                                             label=f"{name} {tag}", **common)
        record(name, model, masks, {"rounds": log, "merge": merge if fixed is None else "fixed one-shot mask"})
    if cfg.get("instant_soup") and (layout == "unstructured" or cfg["isp_recipe"] == "instant-soup"):
        # the published recipe prunes single weights; other layouts only when it feeds the arms
        opt_state = run.load_torch("models/dense_optimizer.pt") if run.exists("models/dense_optimizer.pt") else None

        def train_main(m, state):
            train(m, tr, None, epochs=1, lr=cfg["isp_lr"], batch_size=cfg["batch_size"],
                  seed=stage_seed(cfg["seed"], "instant-soup/main"), optimizer=cfg["optimizer"],
                  weight_decay=cfg["weight_decay"], warmup=cfg["warmup"], bf16=cfg["bf16"], desc="instant-soup main",
                  clip_grad=cfg.get("clip_grad") or None, optimizer_state=state)

        model, masks, log = prune.instant_soup_prune(
            dense, tr, target=target, iterations=cfg["isp_rounds"], copies=cfg["instant_copies"],
            subset=cfg["instant_subset"], train_copy=train_copy, train_main=train_main,
            seed=stage_seed(cfg["seed"], "instant-soup"), pruner=pr, optimizer_state=opt_state, label=f"instant {tag}")
        record("instant", model, masks, {"rounds": log, "merge": "union (uncalibrated)"})
    # one-shot at each merged mask's actual sparsity: the fair comparison for a vote / union
    scores = pr.scores(dense)
    for name, r in list(res["methods"].items()):
        if name == "oneshot" or layout == "2:4":
            continue
        s = r["sparsity"]
        if abs(s - res["methods"]["oneshot"]["sparsity"]) < 1e-9:
            r["oneshot_at_actual"] = "oneshot"
            continue
        key = f"oneshot_at_{name}"
        m = pr.masks_from(scores, s)
        record(key, prune.apply_masks(copy.deepcopy(dense), m), m)
        r["oneshot_at_actual"] = key
    return res


def start_scores_stage(run, cfg, start: str):
    """Patch scores of the training images by an arm's start model (the model that is fine-tuned)."""
    tr, _, _ = split_data(cfg)
    if start == "dense":
        return {"seconds": run.load_torch("tickets/dense.pt")["seconds"], "file": "tickets/dense.pt"}
    model = load_start(run, cfg, start)
    t0 = time.perf_counter()
    s, f = tickets.score(model, tr, batch_size=cfg["eval_batch_size"], sink=sink_rule(run, cfg), return_flagged=True)
    sec = time.perf_counter() - t0
    if is_main():
        run.save_torch(f"tickets/{start}.pt", {"scores": s, "flagged": f, "seconds": sec})
    return {"seconds": sec, "file": f"tickets/{start}.pt", "flagged_per_image": float(f.sum(1).float().mean())}


NEEDS_SCORES = ("fixed", "rescore_epoch", "mix")


def stage_finetune_one(run, cfg, arm: str, seed_k: int):
    tr, _, va = split_data(cfg)
    spec = ft.parse_arm(arm)
    model = load_start(run, cfg, spec["start"])
    keep = spec["keep"] or cfg["keep_ratio"]
    seed = stage_seed(cfg["seed"], f"finetune/{seed_k}")
    keep_fn, augment, score_s = None, False, 0.0
    if spec["policy"] != "full":
        scores = None
        if spec["policy"] in NEEDS_SCORES:
            st = run.result(f"tickets/{spec['start']}")
            scores = run.load_torch(st["file"])["scores"]
            score_s = st["seconds"]
        keep_fn, augment = tickets.make_policy(
            spec["policy"], model=model, train_data=tr, scores=scores, keep=keep, sink=sink_rule(run, cfg),
            seed=stage_seed(cfg["seed"], f"policy/{seed_k}"), batch_size=cfg["eval_batch_size"], mix_top=cfg["mix_top"])
    hist = ft.finetune(model, tr, va, cfg, seed=seed, keep_fn=keep_fn, augment=augment,
                       desc=f"finetune {arm} s{seed_k}", evaluate_each_epoch=seed_k == 0)
    rec = _predictions(cfg, model, va)
    acc = 100.0 * float(rec["correct"].float().mean())
    save_model(run, f"models/finetune/{arm}/s{seed_k}.pt", model)
    if is_main():
        run.save_torch(f"preds/finetune/{arm}/s{seed_k}.pt", rec)
    masks = prune.masks_of(model)
    hist.update({"arm": arm, "seed_index": seed_k, "accuracy": acc, "final_acc": acc, "start": spec["start"],
                 "policy": spec["policy"], "keep": 1.0 if spec["policy"] == "full" else keep,
                 "layout": spec["layout"], "sparsity": prune.sparsity_of(masks) if masks else 0.0,
                 "score_s": score_s, "finetune_s": hist["train_s"] + score_s})
    return hist


def stage_timing(run, cfg):
    """Train-step time of every arm's configuration, interleaved on one batch (see ``train.time_steps``):
    in-run step times were taken minutes apart on a shared machine. Per-epoch re-scoring is not in a
    step (it is in the arm's fine-tuning seconds); per-step scoring is. Each arm's model (and its
    policy, which may score with that model) is rebuilt from the run directory for its turn, so one
    model and its optimizer state are alive at a time."""
    tr, _, _ = split_data(cfg)
    sink = sink_rule(run, cfg)
    setups = {"dense/full": (lambda: load_model(run, cfg, "models/dense.pt"), {})}
    for arm in arms(cfg):
        if arm in setups:
            continue
        spec = ft.parse_arm(arm)
        kw = {}
        if spec["policy"] != "full":
            keep = spec["keep"] or cfg["keep_ratio"]
            scores = None
            if spec["policy"] in NEEDS_SCORES:
                scores = run.load_torch(run.result(f"tickets/{spec['start']}")["file"])["scores"]

            def policy(model, spec=spec, scores=scores, keep=keep):
                return tickets.make_policy(spec["policy"], model=model, train_data=tr, scores=scores, keep=keep,
                                           seed=0, sink=sink, mix_top=cfg["mix_top"])[0]
            kw["make_keep_fn"] = policy
        setups[arm] = (lambda start=spec["start"]: load_start(run, cfg, start), kw)
    med = time_steps(setups, tr, batch_size=cfg["batch_size"], rounds=cfg["timing_rounds"],
                     seed=stage_seed(cfg["seed"], "timing"), optimizer=cfg["optimizer"], bf16=cfg["bf16"])
    base = med["dense/full"]
    return {"step_time_s": med, "ratio_to_dense": {n: t / base for n, t in med.items()},
            "rounds": cfg["timing_rounds"], "batch_size": cfg["batch_size"]}


# ---------------------------------------------------------------- driver
def run_stage(run: RunDir, name: str, fn, *args, redo: bool = False):
    if run.done(name) and not redo:
        return run.result(name)
    if is_main():
        print(f"lotus: stage {name}", flush=True)
    t0 = time.perf_counter()
    result = fn(*args)
    result["wall_s"] = time.perf_counter() - t0
    barrier()  # every rank's files are in place before the marker says so
    if is_main():
        run.mark_done(name, result)
    barrier()
    return result


STAGES = ("pretrain", "score", "prune", "finetune", "timing", "report")


def prune_stages(run, cfg, redo=False, weak_cache=None):
    weak_cache = {} if weak_cache is None else weak_cache
    run_stage(run, "prune/sweep", stage_sweep, run, cfg, redo=redo)
    for layout in layouts(cfg):
        for s in prune_targets(run, cfg, layout):
            run_stage(run, f"prune/{layout}@{s:g}", stage_prune, run, cfg, layout, s, weak_cache, redo=redo)


def finetune_stages(run: RunDir, cfg: dict, only=None, redo=False) -> None:
    chosen = arms(cfg)
    if only:
        unknown = [a for a in only if a not in chosen]
        if unknown:
            raise LotusError(f"--only: unknown arm(s) {', '.join(unknown)}; this run's arms: {', '.join(chosen)}")
        chosen = [a for a in chosen if a in only]
    for arm in chosen:
        spec = ft.parse_arm(arm)
        if spec["policy"] in NEEDS_SCORES:
            run_stage(run, f"tickets/{spec['start']}", start_scores_stage, run, cfg, spec["start"], redo=redo)
    for k in range(cfg["seeds"]):  # seed-major: a cut-short run still has every arm at seed 0
        for arm in chosen:
            run_stage(run, f"finetune/{arm}/s{k}", stage_finetune_one, run, cfg, arm, k, redo=redo)


def run_all(run: RunDir, stages=STAGES, redo=False, only=None) -> None:
    cfg = run.config()
    setup(cfg)
    for st in stages:
        if st == "pretrain":
            run_stage(run, st, stage_pretrain, run, cfg, redo=redo)
        elif st == "score":
            run_stage(run, st, stage_score, run, cfg, redo=redo)
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

"""The stages of a run, each redone from scratch unless its completion marker exists.

A stage reads its inputs from the run directory, seeds itself from (run seed, stage name), writes
its outputs atomically and then its marker (``RunDir.mark_done``). Resuming after a kill therefore
redoes exactly the unfinished stages and reproduces an uninterrupted run bit for bit (same
machine, same ``--threads``). Under torchrun only rank 0 writes; every rank computes.
"""
from __future__ import annotations

import time

import torch

from . import data as data_mod
from . import finetune as ft
from . import model as model_mod
from . import prune, report, tickets
from .errors import LotusError
from .rundir import RunDir, stage_seed
from .train import barrier, evaluate, is_main, time_steps, train

STAGES = ("pretrain", "score", "prune/sweep", "prune/isp", "prune/issp", "finetune", "timing", "report")
TIMING_KEYS = ("step_time_s", "images_per_s", "wall_s")


def setup(cfg: dict) -> None:
    torch.set_num_threads(cfg["threads"])  # results depend on the reduction order: fix it per run


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
    if is_main():
        run.save_torch(name, {k: v.detach().cpu() for k, v in model.state_dict().items()})


def finetune_start(run: RunDir, cfg: dict, source: str):
    if source == "dense":
        return load_model(run, cfg, "models/dense.pt")
    if source == "essential":
        model = load_model(run, cfg, "models/dense.pt")
        return model_mod.with_masks(model, run.load_torch("masks/essential.pt"))
    if source in ("isp", "issp"):
        return load_model(run, cfg, f"models/{source}.pt")
    raise LotusError(f"--finetune-mask: expected one of {', '.join(ft.MASK_SOURCES)}, got {source!r}")


# ---------------------------------------------------------------- stages
def _data(cfg):
    return data_mod.load_split(cfg)


def _eval(cfg, val):
    return lambda m: evaluate(m, val, batch_size=cfg["eval_batch_size"], bf16=cfg["bf16"], desc="eval")


def stage_pretrain(run, cfg):
    tr, va = _data(cfg)
    torch.manual_seed(stage_seed(cfg["seed"], "model-init"))
    model = model_mod.build(cfg, cfg["num_classes"], cfg["img_size"])
    hist = train(model, tr, va, epochs=cfg["pretrain_epochs"], lr=cfg["lr"], batch_size=cfg["batch_size"],
                 seed=stage_seed(cfg["seed"], "pretrain"), optimizer=cfg["optimizer"],
                 weight_decay=cfg["weight_decay"], warmup=cfg["warmup"], bf16=cfg["bf16"],
                 eval_batch_size=cfg["eval_batch_size"], augment=cfg.get("augment", False),
                 clip_grad=cfg.get("clip_grad") or None, desc="pretrain")
    acc = hist["val_acc"][-1] if hist["val_acc"] else evaluate(model, va, batch_size=cfg["eval_batch_size"])
    save_model(run, "models/dense.pt", model)
    return {"history": hist, "val_acc": acc, "n_train": len(tr), "n_val": len(va),
            "params": sum(p.numel() for p in model.parameters())}


def stage_score(run, cfg):
    tr, _ = _data(cfg)
    model = load_model(run, cfg, "models/dense.pt")
    scores = tickets.score(model, tr, batch_size=cfg["eval_batch_size"])
    keeps = sorted({cfg["keep_ratio"], *cfg["compare_keeps"]}, reverse=True)
    if is_main():
        run.save_torch("tickets.pt", {"scores": scores,
                                      "keep": {f"{k:g}": tickets.keep_indices(scores, k) for k in keeps}})
        if cfg["overlay_images"] > 0:
            import matplotlib.pyplot as plt
            fig = tickets.overlay_figure(tr, scores, cfg["keep_ratio"], model.patch_embed.patch_size[0],
                                         cfg["overlay_images"])
            run.save_figure("tickets.png", fig)
            plt.close(fig)
    n = scores.shape[1]
    return {"num_patches": n, "keeps": {f"{k:g}": int(tickets.keep_indices(scores[:1], k).shape[1]) for k in keeps}}


def stage_sweep(run, cfg):
    _, va = _data(cfg)
    model = load_model(run, cfg, "models/dense.pt")
    sparsities = sorted({0.0, *cfg["sweep"]})
    points = prune.sweep(model, sparsities, _eval(cfg, va))
    essential = prune.essential_sparsity(points, cfg["tolerance"])
    if is_main():
        run.save_torch("masks/essential.pt", prune.magnitude_masks(model, essential))
        run.save_torch("masks/oneshot_30.pt", prune.magnitude_masks(model, 0.3))
    acc30 = _eval(cfg, va)(model_mod.with_masks(model, prune.magnitude_masks(model, 0.3)))
    return {"sweep": points, "dense_acc": points[0]["accuracy"], "essential_sparsity": essential,
            "oneshot_30_acc": acc30}


def _soup_target(run, cfg) -> float:
    sw = run.result("prune/sweep")
    target = sw["essential_sparsity"]
    if target == 0:  # nothing prunable within tolerance: still show ISP / ISSP at the first sweep step
        target = min(s for s in sorted({*cfg["sweep"]}) if s > 0)
    return target


def _stage_soup(run, cfg, which: str, weak_cache=None):
    tr, va = _data(cfg)
    model = load_model(run, cfg, "models/dense.pt")
    target = _soup_target(run, cfg)

    def train_copy(m, data, seed, desc):
        train(m, data, None, epochs=cfg["isp_epochs"], lr=cfg["isp_lr"], batch_size=cfg["batch_size"], seed=seed,
              optimizer=cfg["optimizer"], weight_decay=cfg["weight_decay"], warmup=cfg["warmup"], bf16=cfg["bf16"],
              desc=desc)

    isp = which == "isp"
    soup, masks, log = prune.soup_prune(
        model, tr, target=target, rounds=cfg["isp_rounds"], copies=cfg["isp_copies"], subset=cfg["isp_subset"],
        train_copy=train_copy, merge=cfg["isp_vote"] if isp else "any", seed=stage_seed(cfg["seed"], "soup"),
        offsets=(0.0,) if isp else tuple(cfg["issp_offsets"]), weak_cache=weak_cache, label=which)
    acc = _eval(cfg, va)(soup)
    # One-shot magnitude at the merged masks' actual sparsity: the fair comparison for a vote / union.
    actual = prune.sparsity_of(masks)
    oneshot = _eval(cfg, va)(model_mod.with_masks(load_model(run, cfg, "models/dense.pt"),
                                                  prune.magnitude_masks(model, actual)))
    save_model(run, f"models/{which}.pt", soup)
    if is_main():
        run.save_torch(f"masks/{which}.pt", masks)
    return {"target_sparsity": target, "actual_sparsity": actual, "accuracy": acc,
            "oneshot_at_actual_acc": oneshot, "rounds": log,
            "vote": cfg["isp_vote"] if isp else "union", "offsets": [0.0] if isp else list(cfg["issp_offsets"])}


def stage_finetune_one(run, cfg, name, kind, keep):
    tr, va = _data(cfg)
    model = finetune_start(run, cfg, cfg["finetune_mask"])
    keep_idx = run.load_torch("tickets.pt")["keep"][f"{keep:g}"] if kind == "ticket" else None
    hist = ft.finetune(model, tr, va, cfg, kind=kind, keep=keep, seed=stage_seed(cfg["seed"], "finetune"),
                       keep_idx=keep_idx, desc=f"finetune {name}")
    save_model(run, f"models/finetune_{name}.pt", model)
    hist["start"] = cfg["finetune_mask"]
    return hist


def stage_timing(run, cfg):
    """Train-step time of every configuration, interleaved on one batch (see ``train.time_steps``):
    the per-run medians in the fine-tuning histories were taken minutes apart on a shared machine.
    Each configuration's model is rebuilt from the run directory for its turn, so one model (and
    its optimizer state) is alive at a time."""
    tr, _ = _data(cfg)
    tick = run.load_torch("tickets.pt")["keep"]
    setups = {"dense full": (lambda: load_model(run, cfg, "models/dense.pt"), {})}
    for name, kind, keep in ft.configurations(cfg["compare_keeps"]):
        kw = {"keep_idx": tick[f"{keep:g}"]} if kind == "ticket" else {"patch_drop_keep": keep} if kind == "random" else {}
        setups[f"{cfg['finetune_mask']} {name}"] = (lambda: finetune_start(run, cfg, cfg["finetune_mask"]), kw)
    med = time_steps(setups, tr, batch_size=cfg["batch_size"], rounds=cfg["timing_rounds"],
                     seed=stage_seed(cfg["seed"], "timing"), optimizer=cfg["optimizer"], bf16=cfg["bf16"])
    base = med["dense full"]
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


def finetune_stages(run: RunDir, cfg: dict, only=None, redo=False) -> None:
    for name, kind, keep in ft.configurations(cfg["compare_keeps"]):
        if only and name not in only:
            continue
        run_stage(run, f"finetune/{name}", stage_finetune_one, run, cfg, name, kind, keep, redo=redo)


def run_all(run: RunDir, stages=STAGES, redo=False, only=None) -> None:
    cfg = run.config()
    setup(cfg)
    weak_cache: dict = {}
    for st in stages:
        if st == "pretrain":
            run_stage(run, st, stage_pretrain, run, cfg, redo=redo)
        elif st == "score":
            run_stage(run, st, stage_score, run, cfg, redo=redo)
        elif st == "prune/sweep":
            run_stage(run, st, stage_sweep, run, cfg, redo=redo)
        elif st in ("prune/isp", "prune/issp"):
            which = st.split("/")[1]
            run_stage(run, st, _stage_soup, run, cfg, which, weak_cache, redo=redo)
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

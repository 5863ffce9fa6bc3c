"""Stage 6, report: ``results.json`` (every stage's result + the statistics), ``report.md`` and plots.

The headline is the cost table: per fine-tuning arm, accuracy over seeds, the paired difference to
dense full-data fine-tuning with its 95% interval, fine-tuning seconds and the interleaved step-time
ratio. Every comparison is paired on the same validation images (and seeds); a difference whose
interval covers 0 is written "not significant".
"""
from __future__ import annotations

import torch

from . import stats
from .rundir import RunDir

TIMING_KEYS = ("step_time_s", "images_per_s", "wall_s", "step_time", "ratio_to_dense", "train_s", "finetune_s",
               "score_s", "seconds", "score_seconds")
GOAL_RATIO, GOAL_POINTS = 0.55, 1.0
METHOD_ORDER = ("oneshot", "isp", "issp", "control", "instant")


def strip_timing(obj):
    """``obj`` without wall-clock measurements: what must match between two runs with one seed."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS and k != "timing"}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


# ---------------------------------------------------------------- collect
def collect(run: RunDir) -> dict:
    """results.json: config + each finished stage's result (a stage not run yet is absent)."""
    from . import pipeline

    cfg = run.config()
    res: dict = {"config": cfg, "timing": {}}

    def take(stage):
        r = run.result(stage)
        res["timing"][stage] = r.pop("wall_s")
        return r

    if run.done("pretrain"):
        r = take("pretrain")
        res["dense"] = {"val_acc": r["val_acc"], "params": r["params"], "n_train": r["n_train"], "n_val": r["n_val"],
                        "n_select": r.get("n_select", 0), "val_acc_per_epoch": r["history"]["val_acc"],
                        "step_time_s": r["history"]["step_time_s"], "images_per_s": r["history"]["images_per_s"]}
    if run.done("score"):
        res["tickets"] = take("score")
    if run.done("prune/sweep"):
        res["sweep"] = take("prune/sweep")
        res["prune"] = {}
        for layout in pipeline.layouts(cfg):
            for s in pipeline.prune_targets(run, cfg, layout):
                tag = f"{layout}@{s:g}"
                if run.done(f"prune/{tag}"):
                    res["prune"][tag] = take(f"prune/{tag}")
    arms = pipeline.arms(cfg)
    starts = {}
    for arm in arms:
        st = arm.split("/")[0]
        if run.done(f"tickets/{st}") and st not in starts:
            starts[st] = take(f"tickets/{st}")
    if starts:
        res["start_scores"] = starts
    fts = {}
    for arm in arms:
        per_seed = []
        for k in range(cfg["seeds"]):
            if run.done(f"finetune/{arm}/s{k}"):
                per_seed.append(take(f"finetune/{arm}/s{k}"))
        if per_seed:
            fts[arm] = per_seed
    if fts:
        res["finetune"] = fts
    if run.done("timing"):
        r = take("timing")
        order = ["dense/full"] + [a for a in arms if a != "dense/full"]
        for key in ("step_time_s", "ratio_to_dense"):  # JSON sorted the names: back to run order
            r[key] = {n: r[key][n] for n in order if n in r[key]}
        res["step_time"] = r
    res["stats"] = statistics(run, res)
    return res


def _preds(run, name):
    return run.load_torch(name)["correct"] if run.exists(name) else None


def _arm_matrix(run, arm, seeds):
    rows = [_preds(run, f"preds/finetune/{arm}/s{k}.pt") for k in range(seeds)]
    rows = [r for r in rows if r is not None]
    return torch.stack(rows) if rows else None


def statistics(run: RunDir, res: dict) -> dict:
    """Per-arm summaries and the paired comparisons the report states."""
    cfg = res["config"]
    out: dict = {"arms": {}, "vs_dense_full": {}, "policies_vs_random": {}, "pairs": {}, "prune": {}, "sinks": {}}
    fts = res.get("finetune", {})
    mats = {}
    for arm, per_seed in fts.items():
        out["arms"][arm] = stats.summary([r["accuracy"] for r in per_seed])
        mats[arm] = _arm_matrix(run, arm, cfg["seeds"])

    def paired(a, b):
        ma, mb = mats.get(a), mats.get(b)
        if ma is None or mb is None:
            return None
        s = min(ma.shape[0], mb.shape[0])  # seeds both arms have finished
        return stats.paired_bootstrap(ma[:s], mb[:s], seed=0)

    for arm in fts:
        if arm != "dense/full" and "dense/full" in fts:
            out["vs_dense_full"][arm] = paired(arm, "dense/full")
    for arm in fts:
        start, data = arm.split("/")
        policy, _, keep = data.partition("@")
        rnd = f"{start}/random" + (f"@{keep}" if keep else "")
        if policy not in ("full", "random") and rnd in fts:
            out["policies_vs_random"][arm] = paired(arm, rnd)
    # pruning method comparisons that the issue asks about (same start model: fine-tuned equally)
    for a, b in (("unstructured-isp/full", "unstructured-oneshot/full"), ("block-isp/fixed", "dense/fixed"),
                 ("block-isp/full", "unstructured-isp/full"), ("block-isp/fixed", "block-isp/full")):
        if a in fts and b in fts:
            out["pairs"][f"{a} vs {b}"] = paired(a, b)
    for tag, r in res.get("prune", {}).items():
        cmp = {}
        base = lambda n: _preds(run, f"preds/{tag}/{n}.pt")  # noqa: E731
        for name in METHOD_ORDER[1:]:
            if name not in r["methods"]:
                continue
            m = r["methods"][name]
            mine = base(name)
            ref = m.get("oneshot_at_actual")
            if ref and base(ref) is not None:
                cmp[f"{name} vs one-shot at its sparsity"] = dict(stats.paired_bootstrap(mine, base(ref)),
                                                                  mcnemar=stats.mcnemar(mine, base(ref)))
            if name != "control" and base("control") is not None:
                cmp[f"{name} vs control"] = dict(stats.paired_bootstrap(mine, base("control")),
                                                 mcnemar=stats.mcnemar(mine, base("control")))
        out["prune"][tag] = cmp
    if "tickets" in res:
        none = _preds(run, "preds/sink_none.pt")
        rnd = _preds(run, "preds/sink_random.pt")
        for rule in ("first", "outlier", "norm"):
            p = _preds(run, f"preds/sink_{rule}.pt")
            if p is not None and none is not None:
                out["sinks"][f"{rule} vs none"] = stats.paired_bootstrap(p, none)
        for rule in ("none", "outlier", "norm"):
            p = _preds(run, f"preds/sink_{rule}.pt")
            if p is not None and rnd is not None:
                out["sinks"][f"{rule} vs random"] = stats.paired_bootstrap(p, rnd)
    return out


# ---------------------------------------------------------------- formatting helpers
def _fmt(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def _acc(s: dict) -> str:
    if s["sd"] is None:
        return f"{s['mean']:.2f}"
    return f"{s['mean']:.2f} ± {s['sd']:.2f} [{s['lo']:.1f}, {s['hi']:.1f}]"


def _diff(d) -> str:
    if d is None:
        return "—"
    mark = "" if stats.verdict(d) == "not significant" else " *"
    return f"{d['diff']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]{mark}"


def cost_rows(res: dict) -> list[dict]:
    """One row per fine-tuning arm: the cost table's numbers."""
    rows = []
    ratios = res.get("step_time", {}).get("ratio_to_dense", {})
    for arm, per_seed in res.get("finetune", {}).items():
        r0 = per_seed[0]
        ft_s = [r["finetune_s"] for r in per_seed]
        rows.append({"arm": arm, "layout": r0["layout"], "sparsity": r0["sparsity"], "keep": r0["keep"],
                     "acc": res["stats"]["arms"][arm], "vs_dense": res["stats"]["vs_dense_full"].get(arm),
                     "finetune_s": sum(ft_s) / len(ft_s), "step_ratio": ratios.get(arm), "seeds": len(per_seed)})
    return rows


# ---------------------------------------------------------------- plots
def _plots(run: RunDir, res: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    rows = cost_rows(res)
    if rows:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        colors = plt.get_cmap("tab20").colors
        for i, r in enumerate(rows):
            sd = r["acc"]["sd"] or 0.0
            mk = "s" if r["arm"].endswith("/full") else "o" if r["arm"].startswith("dense") else "D"
            ax.errorbar(r["finetune_s"], r["acc"]["mean"], yerr=sd, fmt=mk, ms=6, capsize=3,
                        color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
                        label=f"{r['arm']} ({_fmt(r['step_ratio'])}x step)")
        if "dense/full" in res["finetune"]:
            d = res["stats"]["arms"]["dense/full"]["mean"]
            ax.axhspan(d - GOAL_POINTS, d, color="g", alpha=0.1, label=f"within {GOAL_POINTS:g} pt of dense full")
        ax.set_xlabel("fine-tuning wall-clock per run (s; training + ticket scoring, evaluation excluded)")
        ax.set_ylabel("val accuracy (%), mean ± SD over seeds")
        ax.set_title("Cost of fine-tuning: accuracy vs wall-clock per arm")
        ax.legend(fontsize=6.5, loc="lower right")
        ax.grid(alpha=0.3)
        run.save_figure("cost.png", fig)
        plt.close(fig)
        made.append("cost.png")
    if "sweep" in res:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for i, (layout, sw) in enumerate(res["sweep"]["layouts"].items()):
            xs = [p["sparsity"] for p in sw["sweep_val"]]
            ax.plot(xs, [p["accuracy"] for p in sw["sweep_val"]], "o-", color=f"C{i}",
                    label=f"{layout} one-shot ({sw['score']}), val")
            for sc, pts in sw["scores"].items():
                ax.plot([p["sparsity"] for p in pts], [p["accuracy"] for p in pts], ":", color=f"C{i}", alpha=0.6,
                        label=f"{layout} {sc}, selection")
            ax.axvline(sw["essential_sparsity"], color=f"C{i}", ls="--", alpha=0.5)
        for tag, r in res.get("prune", {}).items():
            for name, mk in (("isp", "s"), ("issp", "D"), ("control", "x"), ("instant", "^")):
                if name in r["methods"]:
                    m = r["methods"][name]
                    ax.plot(m["sparsity"], m["accuracy"], mk, color="C3" if r["layout"] == "unstructured" else "C4",
                            ms=7, alpha=0.8)
        ax.set_xlabel("sparsity of the pruned linear layers")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("One-shot sweeps (lines); ISP ■ ISSP ◆ control × Instant Soup ▲ (val)")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
        run.save_figure("sparsity.png", fig)
        plt.close(fig)
        made.append("sparsity.png")
    if "finetune" in res:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        colors = plt.get_cmap("tab20").colors
        for i, (arm, per_seed) in enumerate(res["finetune"].items()):
            r = per_seed[0]
            if r["val_acc"]:
                ax.plot(r["epoch"], r["val_acc"], "-" if arm.endswith("/full") else "--", marker="o", ms=3,
                        color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20], label=arm)
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("fine-tuning epoch")
        ax.set_ylabel("val accuracy (%), seed 0")
        ax.set_title("Fine-tuning curves (seed 0)")
        ax.legend(fontsize=6.5, ncol=2)
        ax.grid(alpha=0.3)
        run.save_figure("finetune.png", fig)
        plt.close(fig)
        made.append("finetune.png")
    if "step_time" in res:
        med = res["step_time"]["step_time_s"]
        names, times = list(med), [1e3 * v for v in med.values()]
        fig, ax = plt.subplots(figsize=(8, 3.8))
        ax.bar(range(len(times)), times, color="C2")
        for i, n in enumerate(names):
            ax.text(i, times[i], f"{res['step_time']['ratio_to_dense'][n]:.2f}x", ha="center", va="bottom", fontsize=7)
        ax.axhline(GOAL_RATIO * med["dense/full"] * 1e3, color="r", ls=":", label=f"{GOAL_RATIO}x dense")
        ax.set_xticks(range(len(times)), names, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel(f"median train step (ms), batch {res['config']['batch_size']}")
        ax.set_title("Train-step time per arm (interleaved; ratio to dense full)")
        ax.legend(fontsize=7)
        run.save_figure("step_time.png", fig)
        plt.close(fig)
        made.append("step_time.png")
    return made


# ---------------------------------------------------------------- markdown
def _findings(res: dict) -> list[str]:
    out = []
    st = res["stats"]
    rows = cost_rows(res)
    if rows and "dense/full" in res.get("finetune", {}):
        fast = [r for r in rows if r["step_ratio"] is not None and r["step_ratio"] <= GOAL_RATIO]
        ok = [r for r in fast if r["vs_dense"] and r["vs_dense"]["diff"] >= -GOAL_POINTS]
        if ok:
            best = max(ok, key=lambda r: r["vs_dense"]["diff"])
            out.append(f"- **Goal met**: `{best['arm']}` at {best['step_ratio']:.2f}x the dense step is "
                       f"{_diff(best['vs_dense'])} points vs dense full-data fine-tuning (mean over seeds; "
                       f"{stats.verdict(best['vs_dense'])}).")
        elif fast:
            best = max(fast, key=lambda r: r["vs_dense"]["diff"] if r["vs_dense"] else -1e9)
            gap = -GOAL_POINTS - best["vs_dense"]["diff"]
            out.append(f"- **Goal missed** by {gap:.2f} points: the best arm at <= {GOAL_RATIO}x the dense step, "
                       f"`{best['arm']}` ({best['step_ratio']:.2f}x), is {_diff(best['vs_dense'])} points vs dense "
                       "full.")
        else:
            out.append(f"- **Goal missed**: no arm reached <= {GOAL_RATIO}x the dense step.")
    for arm, d in st["policies_vs_random"].items():
        if d:
            out.append(f"- `{arm}` vs random patches at the same token count: {stats.describe(d)}.")
    for pair, d in st["pairs"].items():
        if d:
            out.append(f"- `{pair}` (fine-tuned): {stats.describe(d)}.")
    for tag, cmp in st["prune"].items():
        for name, d in cmp.items():
            out.append(f"- {tag}, {name} (before fine-tuning): {stats.describe(d)}; "
                       f"McNemar p = {d['mcnemar']['p']:.3g}.")
    for name, d in st["sinks"].items():
        out.append(f"- Sink rule tickets, {name} (dense model on its tickets, val): {stats.describe(d)}.")
    return ["", "## Findings (automatic; paired, 95% intervals)", ""] + out if out else []


DEVIATIONS = [
    "weak copies start from a fresh optimizer (Instant Soup: the current model's optimizer state)",
    "K = 3 copies on 30% subsets (Instant Soup: K = 5 on 10%, one pass each)",
    "masks merged by a majority vote (ISP) or a union calibrated to the target (ISSP) (Instant Soup: "
    "uncalibrated union, so the sparsity undershoots the target)",
    "weights averaged into a soup (Instant Soup: no weight averaging; the main model keeps its weights)",
    "no training of the main model between rounds: the next round's copies start from the soup (Instant Soup: "
    "the main model is trained between iterations)",
    "masks ranked by the layout's score (block: the best of L1 / L2 / gradient-weighted on the selection split)",
]


def markdown(res: dict, plots: list[str], has_tickets_png: bool) -> str:
    cfg = res["config"]
    st = res["stats"]
    L = ["# LOTUS run report", ""]
    L.append(f"Data `{cfg['data']}`, model `{cfg['model']}`"
             + (f" (patch {cfg['patch_size']}, dim {cfg['embed_dim']}, depth {cfg['depth']}, heads {cfg['heads']})"
                if cfg["model"] == "lotus_vit" else "") + f", run seed {cfg['seed']}, {cfg['seeds']} fine-tuning "
             f"seed(s), {cfg['threads']} thread(s); layout `{cfg['layout']}`"
             + (f" (blocks {cfg['block_size']}x{cfg['block_size']})" if cfg["layout"] == "block" else "")
             + f", keep {cfg['keep_ratio']:g}, sink rule `{res.get('tickets', {}).get('sink', cfg['sink'])}`"
             + (" (`--sink auto`)" if cfg["sink"] == "auto" else "") + ".")
    if "dense" in res:
        d = res["dense"]
        sel = (f"{d['n_select']} selection (held out of training; chooses the essential sparsity, block score "
               f"and sink rule)" if d["n_select"] else "no selection split: the essential sparsity is chosen on "
               "the validation images the numbers below are measured on")
        L += [f"Train / selection / val: {d['n_train']} train, {sel}, {d['n_val']} val images (every reported "
              f"accuracy; one image = {100 / d['n_val']:.2f} points); {d['params']:,} parameters.", ""]
    rows = cost_rows(res)
    if rows:
        L += ["## Cost of fine-tuning (headline)", "",
              f"{cfg['finetune_epochs']} epochs per arm at lr {cfg['finetune_lr']:g}. Accuracy: mean ± SD over seeds "
              "[95% t interval]; Δ vs dense full: paired bootstrap over seeds and images, 95% interval (* = interval "
              "excludes 0); fine-tuning s: training + ticket scoring, evaluation excluded (in-run, shared machine); "
              "step: interleaved median train step / dense full's.", "",
              "| arm | layout | sparsity | keep | val acc (%) | Δ vs dense full (pts) | fine-tuning s | step |",
              "|---|---|---:|---:|---|---|---:|---:|"]
        for r in rows:
            L.append(f"| {r['arm']} | {r['layout']} | {r['sparsity']:.3f} | {r['keep']:g} | {_acc(r['acc'])} | "
                     f"{_diff(r['vs_dense']) if r['arm'] != 'dense/full' else '—'} | {r['finetune_s']:.1f} | "
                     f"{_fmt(r['step_ratio'])}x |")
        L += ["", "![cost](cost.png)"]
    L += _findings(res)
    if "tickets" in res:
        t = res["tickets"]
        L += ["", "## Attention tickets and the sink rule", "",
              f"{t['num_patches']} patches per image, a ticket keeps {t['kept']} (keep {t['keep']:g}). Each rule's "
              "tickets are judged by the dense model's accuracy when it sees only the ticket's patches (no "
              "training), on the selection split (which chooses) and the validation split; random patches at the "
              "same count for reference.", "",
              "| sink rule | patches changed / image (val) | acc, selection (%) | acc, val (%) |",
              "|---|---:|---:|---:|"]
        for rule in sorted(t["rules"], key=lambda x: ("none", "first", "outlier", "norm").index(x)):
            r = t["rules"][rule]
            L.append(f"| {rule} | {r['val']['flagged_per_image']:.2f} | {r['select']['accuracy']:.2f} | "
                     f"{r['val']['accuracy']:.2f} |")
        L.append(f"| random patches | — | {t['random']['select']:.2f} | {t['random']['val']:.2f} |")
        L += ["", f"Best rule on the selection split: `{t['best_rule_on_select']}` (ties go to the simpler rule); this "
              f"run used `{t['sink']}` (`--sink {t.get('sink_option', t['sink'])}`; "
              f"{t['flagged_per_image']:.2f} patches "
              "changed per training image). `first` (LOTUS's literal rule) only rewrites the class token's own score, "
              "which is dropped before ranking patches, so its tickets are identical to `none`. tickets.png outlines "
              "in red the patches a patch rule changes."]
        if has_tickets_png:
            L += ["", "![tickets](tickets.png)"]
    if "sweep" in res:
        L += ["", "## One-shot sweeps (no training)", ""]
        for layout, sw in res["sweep"]["layouts"].items():
            sps = [p["sparsity"] for p in sw["sweep_val"]]
            L += [f"**{layout}** (score `{sw['score']}`; essential sparsity **{sw['essential_sparsity']:g}**, "
                  "chosen on "
                  f"the {sw['chosen_on']} split within {cfg['tolerance']:g} point of dense)", "",
                  "| score / split | " + " | ".join(f"{s:g}" for s in sps) + " |", "|---|" + "---:|" * len(sps)]
            for sc, pts in sw["scores"].items():
                L.append(f"| {sc} / selection | " + " | ".join(f"{p['accuracy']:.1f}" for p in pts) + " |")
            L.append(f"| {sw['score']} / val | " + " | ".join(f"{p['accuracy']:.1f}" for p in sw["sweep_val"]) + " |")
            L.append("")
    if res.get("prune"):
        L += ["## ISP, ISSP, the matched control and Instant Soup (before fine-tuning, val)", "",
              "control = the one-shot mask at the target with exactly ISP's extra training (same rounds of weak "
              "copies on the same subsets, weights averaged): ISP − control isolates the mask choice.", "",
              "| layout @ target | method | actual sparsity | acc (%) | Δ vs one-shot at its sparsity "
              "| Δ vs control |",
              "|---|---|---:|---:|---|---|"]
        for tag, r in res["prune"].items():
            cmp = st["prune"].get(tag, {})
            for name in METHOD_ORDER:
                if name not in r["methods"]:
                    continue
                m = r["methods"][name]
                L.append(f"| {tag} | {name} | {m['sparsity']:.4f} | {m['accuracy']:.2f} | "
                         f"{_diff(cmp.get(f'{name} vs one-shot at its sparsity'))} | "
                         f"{_diff(cmp.get(f'{name} vs control'))} |")
        L += ["", "Per round: copy sparsities, mean pairwise Jaccard of the copies' kept weights, share of the "
              "merged kept weights that only one copy keeps, merged sparsity:"]
        for tag, r in res["prune"].items():
            for name in METHOD_ORDER:
                m = r["methods"].get(name, {})
                if "rounds" not in m or name == "control":
                    continue
                L.append(f"- {tag} {name}: " + "; ".join(
                    f"r{x['round']} target {x['round_target']:.3f}"
                    + (f" (copies at {x['copy_sparsity']:.3f})" if "copy_sparsity" in x else "")
                    + f", Jaccard {x.get('jaccard', 1):.3f}, single-copy {x.get('single_copy_share', 0):.3f}"
                    + f" -> {x['merged_sparsity']:.3f}" for x in m["rounds"]))
        L += ["", "Our ISP / ISSP deviate from Instant Soup (run beside them as `instant`, as published) in:"]
        L += [f"- {d}" for d in DEVIATIONS]
    if "step_time" in res:
        s = res["step_time"]
        L += ["", f"## Train-step time (batch {s['batch_size']}, median of {s['rounds']} interleaved rounds)", "",
              "| arm | step (ms) | vs dense full |", "|---|---:|---:|"]
        L += [f"| {n} | {1e3 * t:.1f} | {s['ratio_to_dense'][n]:.2f}x |" for n, t in s["step_time_s"].items()]
    if plots:
        L += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots if p != "cost.png"]
    if res["timing"]:
        L += ["", "## Wall time per stage", "", "| stage | s |", "|---|---:|"]
        L += [f"| {k} | {v:.1f} |" for k, v in res["timing"].items()]
        L.append(f"| total | {sum(res['timing'].values()):.1f} |")
    L += ["", "Timings come from whatever machine ran this report (shared CPUs are noisy); accuracies are on the "
          "held-out validation split."]
    return "\n".join(L) + "\n"


def export_predictions(run: RunDir) -> int:
    """``predictions.npz``: every saved per-image record on the validation split (key = its path
    under preds/ without .pt, value = int16 predicted classes) plus ``labels``: one file to recompute
    any comparison. Returns the number of records."""
    import numpy as np

    arrays = {}
    for p in sorted(run.path("preds").rglob("*.pt")) if run.exists("preds") else []:
        rec = run.load_torch(str(p.relative_to(run.root)))
        if "pred" in rec:
            arrays[str(p.relative_to(run.path("preds")))[:-3]] = rec["pred"].numpy().astype(np.int16)
    if arrays:
        from .pipeline import split_data
        arrays["labels"] = split_data(run.config())[2].y.numpy().astype(np.int16)
        run.save_npz("predictions.npz", **arrays)
    return len(arrays)


def write(run: RunDir) -> dict:
    res = collect(run)
    plots = _plots(run, res)
    export_predictions(run)
    run.write_json("results.json", res)
    run.write_text("report.md", markdown(res, plots, run.exists("tickets.png")))
    return {"plots": plots}

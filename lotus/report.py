"""Stage 6, report: ``results.json`` (every stage's result), ``report.md`` and PNG plots."""
from __future__ import annotations

from .rundir import RunDir

TIMING_KEYS = ("step_time_s", "images_per_s", "wall_s", "step_time", "ratio_to_dense")


def strip_timing(obj):
    """``obj`` without wall-clock measurements: what must match between two runs with one seed."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS and k != "timing"}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def collect(run: RunDir) -> dict:
    """results.json: config + each finished stage's result (a stage not run yet is absent)."""
    cfg = run.config()
    res: dict = {"config": cfg, "timing": {}}
    if run.done("pretrain"):
        r = run.result("pretrain")
        res["dense"] = {"val_acc": r["val_acc"], "params": r["params"], "n_train": r["n_train"], "n_val": r["n_val"],
                        "val_acc_per_epoch": r["history"]["val_acc"], "step_time_s": r["history"]["step_time_s"],
                        "images_per_s": r["history"]["images_per_s"]}
        res["timing"]["pretrain"] = r["wall_s"]
    if run.done("score"):
        res["tickets"] = run.result("score")
        res["timing"]["score"] = res["tickets"].pop("wall_s")
    if run.done("prune/sweep"):
        r = run.result("prune/sweep")
        res["timing"]["prune/sweep"] = r.pop("wall_s")
        res["oneshot"] = r
    for which in ("isp", "issp"):
        if run.done(f"prune/{which}"):
            r = run.result(f"prune/{which}")
            res["timing"][f"prune/{which}"] = r.pop("wall_s")
            res[which] = r
    from .finetune import configurations
    fts = {}
    for name, _, _ in configurations(cfg["compare_keeps"]):
        if run.done(f"finetune/{name}"):
            r = run.result(f"finetune/{name}")
            res["timing"][f"finetune/{name}"] = r.pop("wall_s")
            fts[name] = r
    if fts:
        res["finetune"] = fts
    if run.done("timing"):
        r = run.result("timing")
        order = ["dense full"] + [f"{cfg['finetune_mask']} {n}" for n, _, _ in configurations(cfg["compare_keeps"])]
        for key in ("step_time_s", "ratio_to_dense"):  # JSON sorted the names: back to run order
            r[key] = {n: r[key][n] for n in order if n in r[key]}
        res["timing"]["timing"] = r.pop("wall_s")
        res["step_time"] = r
    return res


def _fmt(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def _plots(run: RunDir, res: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if "oneshot" in res:
        sw = res["oneshot"]
        xs = [p["sparsity"] for p in sw["sweep"]]
        ys = [p["accuracy"] for p in sw["sweep"]]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, ys, "o-", label="one-shot global magnitude")
        ax.axhspan(sw["dense_acc"] - res["config"]["tolerance"], sw["dense_acc"], color="g", alpha=0.12,
                   label=f"within {res['config']['tolerance']:g} pt of dense")
        ax.axvline(sw["essential_sparsity"], color="g", ls="--", label=f"essential sparsity {sw['essential_sparsity']:g}")
        for which, mk in (("isp", "s"), ("issp", "D")):
            if which in res:
                ax.plot(res[which]["actual_sparsity"], res[which]["accuracy"], mk, ms=9,
                        label=f"{which.upper()} (actual sparsity {res[which]['actual_sparsity']:.3f})")
        ax.set_xlabel("sparsity of the pruned linear layers")
        ax.set_ylabel("val accuracy (%)")
        ax.set_title("Accuracy vs sparsity (no fine-tuning)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        run.save_figure("sparsity.png", fig)
        plt.close(fig)
        made.append("sparsity.png")
    if "isp" in res or "issp" in res:
        labels, vals = [], []
        for which in ("isp", "issp"):
            if which in res:
                r = res[which]
                labels += [f"{which.upper()}\n@{r['actual_sparsity']:.2f}", f"one-shot\n@{r['actual_sparsity']:.2f}"]
                vals += [r["accuracy"], r["oneshot_at_actual_acc"]]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(range(len(vals)), vals, color=["C1", "C0"] * (len(vals) // 2))
        ax.set_xticks(range(len(vals)), labels)
        ax.axhline(res["oneshot"]["dense_acc"], color="k", ls=":", label="dense")
        ax.set_ylabel("val accuracy (%)")
        ax.set_title("ISP / ISSP vs one-shot at the same actual sparsity")
        ax.legend(fontsize=8)
        run.save_figure("isp_vs_oneshot.png", fig)
        plt.close(fig)
        made.append("isp_vs_oneshot.png")
    if "finetune" in res:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in res["finetune"].items():
            style = {"full": "k-", "ticket": "-", "random": "--"}[r["kind"]]
            ax.plot(r["epoch"], r["val_acc"], style, marker="o", ms=3, label=name)
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("fine-tuning epoch")
        ax.set_ylabel("val accuracy (%)")
        ax.set_title(f"Fine-tuning the {res['config']['finetune_mask']} model: tickets vs random vs full")
        ax.legend(fontsize=8, ncol=2)
        ax.grid(alpha=0.3)
        run.save_figure("finetune.png", fig)
        plt.close(fig)
        made.append("finetune.png")
    if "step_time" in res:
        med = res["step_time"]["step_time_s"]
        names, times = list(med), [1e3 * v for v in med.values()]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar(range(len(times)), times, color="C2")
        for i, n in enumerate(names):
            ax.text(i, times[i], f"{res['step_time']['ratio_to_dense'][n]:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(times)), names, rotation=30, ha="right")
        ax.set_ylabel(f"median train step (ms), batch {res['config']['batch_size']}")
        ax.set_title("Train-step time per configuration (interleaved; ratio to dense)")
        run.save_figure("step_time.png", fig)
        plt.close(fig)
        made.append("step_time.png")
    return made


def _findings(res: dict) -> list[str]:
    """The issue's three claims, checked against this run's numbers (no interpretation)."""
    out = []
    if "oneshot" in res:
        sw = res["oneshot"]
        d = sw["oneshot_30_acc"] - sw["dense_acc"]
        out.append(f"- One-shot 30% vs dense: {d:+.2f} points ({'within' if d >= -1 else 'NOT within'} 1 point).")
    for which in ("isp", "issp"):
        if which in res:
            r = res[which]
            d = r["accuracy"] - r["oneshot_at_actual_acc"]
            out.append(f"- {which.upper()} vs one-shot at the same sparsity ({r['actual_sparsity']:.3f}): {d:+.2f} points "
                       f"({'within' if d >= -1 else 'NOT within'} 1 point).")
    ft = res.get("finetune", {})
    for name, r in ft.items():
        if r["kind"] == "ticket" and f"random_{r['keep']:g}" in ft:
            rnd = ft[f"random_{r['keep']:g}"]
            d = r["final_acc"] - rnd["final_acc"]
            out.append(f"- Tickets vs random PatchDropout at keep {r['keep']:g}: {r['final_acc']:.2f}% vs "
                       f"{rnd['final_acc']:.2f}% ({d:+.2f} points).")
    if "full" in ft:
        out.append(f"- Full data fine-tuning: {ft['full']['final_acc']:.2f}%.")
    return ["", "## Findings (automatic)", ""] + out if out else []


def markdown(res: dict, plots: list[str], has_tickets_png: bool) -> str:
    cfg = res["config"]
    L = ["# LOTUS run report", ""]
    L.append(f"Data `{cfg['data']}`, model `{cfg['model']}`"
             + (f" (patch {cfg['patch_size']}, dim {cfg['embed_dim']}, depth {cfg['depth']}, heads {cfg['heads']})"
                if cfg["model"] == "lotus_vit" else "") + f", seed {cfg['seed']}, {cfg['threads']} thread(s).")
    if "dense" in res:
        d = res["dense"]
        L += [f"Train / val split: {d['n_train']} / {d['n_val']} images; {d['params']:,} parameters.", "",
              "## Dense model", "",
              f"Pretrained {cfg['pretrain_epochs']} epochs{' (random flips + 4-pixel shifts)' if cfg.get('augment') else ''}: **val accuracy {d['val_acc']:.2f}%** "
              f"(per epoch: {', '.join(f'{a:.1f}' for a in d['val_acc_per_epoch'])})."]
    if "tickets" in res:
        t = res["tickets"]
        L += ["", "## Attention data tickets", "",
              f"{t['num_patches']} patches per image; kept per keep ratio: "
              + ", ".join(f"{k} -> {v}" for k, v in t["keeps"].items()) + "."]
        if has_tickets_png:
            L += ["", "![tickets](tickets.png)"]
    if "oneshot" in res:
        sw = res["oneshot"]
        L += ["", "## One-shot global magnitude pruning (no fine-tuning)", "", "| sparsity | val acc (%) | Δ vs dense |",
              "|---:|---:|---:|"]
        for p in sw["sweep"]:
            L.append(f"| {p['sparsity']:.1f} | {p['accuracy']:.2f} | {p['accuracy'] - sw['dense_acc']:+.2f} |")
        L += ["", f"**Essential sparsity: {sw['essential_sparsity']:g}** (largest sparsity up to which every sweep "
              f"point stays within {cfg['tolerance']:g} point of dense). One-shot at 30%: {sw['oneshot_30_acc']:.2f}% "
              f"(dense {sw['dense_acc']:.2f}%)."]
    if "isp" in res or "issp" in res:
        L += ["", "## ISP / ISSP at the essential sparsity (before fine-tuning)", "",
              "| method | target | actual sparsity | val acc (%) | one-shot at actual (%) | Δ |", "|---|---:|---:|---:|---:|---:|"]
        for which in ("isp", "issp"):
            if which in res:
                r = res[which]
                L.append(f"| {which.upper()} ({r['vote']}) | {r['target_sparsity']:.3f} | {r['actual_sparsity']:.4f} | "
                         f"{r['accuracy']:.2f} | {r['oneshot_at_actual_acc']:.2f} | "
                         f"{r['accuracy'] - r['oneshot_at_actual_acc']:+.2f} |")
        L += ["", f"{cfg['isp_rounds']} round(s), {cfg['isp_copies']} weak copies per round, each fine-tuned "
              f"{cfg['isp_epochs']} epoch(s) on its own random {cfg['isp_subset']:.0%} of the training split; "
              f"ISP merges by `{cfg['isp_vote']}` vote, ISSP takes the union of masks at round sparsity + "
              f"{cfg['issp_offsets']}. Per round (merged sparsity):"]
        for which in ("isp", "issp"):
            if which in res:
                L.append(f"- {which.upper()}: " + "; ".join(
                    f"r{x['round']} target {x['round_target']:.3f} -> copies "
                    f"{', '.join(f'{c:.3f}' for c in x['copy_sparsities'])} -> merged {x['merged_sparsity']:.3f}"
                    for x in res[which]["rounds"]))
    if "finetune" in res:
        L += ["", f"## Fine-tuning the `{cfg['finetune_mask']}` model ({cfg['finetune_epochs']} epochs)", "",
              "| configuration | final val acc (%) | epochs to within 1 pt of final | in-run step (ms) | images/s |",
              "|---|---:|---:|---:|---:|"]
        for name, r in res["finetune"].items():
            L.append(f"| {name} | {_fmt(r['final_acc'])} | {r['epochs_to_within_1']} | "
                     f"{_fmt(1e3 * r['step_time_s'] if r['step_time_s'] else None, 1)} | {_fmt(r['images_per_s'], 0)} |")
    L += _findings(res)
    if "step_time" in res:
        st = res["step_time"]
        L += ["", f"## Train-step time (batch {st['batch_size']}, median of {st['rounds']} interleaved rounds)", "",
              "| configuration | step (ms) | vs dense full |", "|---|---:|---:|"]
        L += [f"| {n} | {1e3 * t:.1f} | {st['ratio_to_dense'][n]:.2f}x |" for n, t in st["step_time_s"].items()]
    if plots:
        L += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    if res["timing"]:
        L += ["", "## Wall time per stage", "", "| stage | s |", "|---|---:|"]
        L += [f"| {k} | {v:.1f} |" for k, v in res["timing"].items()]
        L.append(f"| total | {sum(res['timing'].values()):.1f} |")
    L += ["", "Timings come from whatever machine ran this report (shared CPUs are noisy); accuracies are "
          "on the held-out validation split."]
    return "\n".join(L) + "\n"


def write(run: RunDir) -> dict:
    res = collect(run)
    plots = _plots(run, res)
    run.write_json("results.json", res)
    run.write_text("report.md", markdown(res, plots, run.exists("tickets.png")))
    return {"plots": plots}

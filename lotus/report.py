"""Stage report: ``results.json`` (the results object of ``lotus.results``), ``report.md`` and plots.

The report formats a results object; it never calls back into the pipeline. ``markdown`` joins one
function per section, each taking the results object and returning its lines.
"""

from __future__ import annotations

from . import stats
from .results import (
    GOAL_COST,
    GOAL_FT_GAIN,
    GOAL_POINTS,
    GOAL_RECALL_RATIO,
    GOAL_TICKET_POINTS,
    METHOD_ORDER,
    collect,
    export_predictions,
    findings,
    strip_timing,
)
from .rundir import RunDir

__all__ = ["write", "markdown", "strip_timing"]


# ---------------------------------------------------------------- formatting helpers
def _fmt(x, nd=2, suffix=""):
    return "—" if x is None else f"{x:.{nd}f}{suffix}"


def _acc(s: dict) -> str:
    if s["sd"] is None:
        return f"{s['mean']:.2f}"
    return f"{s['mean']:.2f} ± {s['sd']:.2f} [{s['lo']:.1f}, {s['hi']:.1f}]"


def _diff(d) -> str:
    if d is None:
        return "—"
    mark = "" if stats.verdict(d, d.get("p_holm")).startswith("not") else " *"
    return f"{d['diff']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]{mark}"


def _describe(d) -> str:
    both = ""
    if d.get("t"):
        b, t = d["bootstrap"], d["t"]
        both = f"; bootstrap [{b['lo']:+.2f}, {b['hi']:+.2f}], seed t [{t['lo']:+.2f}, {t['hi']:+.2f}]"
    return stats.describe(d, p_adjusted=d.get("p_holm")) + both


def _basis(res) -> str:
    return res["stats"].get("basis", "cpu")


def _unit(res) -> str:
    return "CPU s" if _basis(res) == "cpu" else "wall s"


def cost_rows(res: dict) -> list[dict]:
    """One row per model: the start model, then every fine-tuning arm, with the whole job's cost."""
    st = res["stats"]
    rows = []
    ratios = res.get("step_time", {}).get("ratio_to_dense", {})
    if "probe" in res and "start" in st["jobs"]:
        rows.append(
            {
                "arm": "start",
                "layout": "dense",
                "sparsity": 0.0,
                "keep": 1.0,
                "seeds": 1,
                "acc": {"mean": res["probe"]["val_acc"], "sd": None},
                "vs_dense": None,
                "vs_start": None,
                "job": st["jobs"]["start"],
                "step_ratio": None,
                "recall": None,
            }
        )
    for arm, per_seed in res.get("finetune", {}).items():
        r0 = per_seed[0]
        rec = [r["object_recall"] for r in per_seed if r.get("object_recall") is not None]
        rows.append(
            {
                "arm": arm,
                "layout": r0["layout"],
                "sparsity": r0["sparsity"],
                "keep": r0["keep"],
                "acc": st["arms"][arm],
                "vs_dense": st["vs_dense_full"].get(arm),
                "vs_start": st["vs_start"].get(arm),
                "job": st["jobs"].get(arm),
                "seeds": len(per_seed),
                "step_ratio": ratios.get(arm, ratios.get("dense/full") if arm.startswith("dense/matched") else None),
                "recall": sum(rec) / len(rec) if rec else None,
            }
        )
    return rows


# ---------------------------------------------------------------- sections
def sec_setting(res: dict) -> list[str]:
    cfg = res["config"]
    L = ["# LOTUS run report", ""]
    model = f"`{cfg['model']}`" + (
        f" (patch {cfg['patch_size']}, dim {cfg['embed_dim']}, depth {cfg['depth']}, heads {cfg['heads']})"
        if cfg["model"] == "lotus_vit"
        else ""
    )
    canvas = (
        f"every image placed at a random position on a {cfg['canvas']}x{cfg['canvas']} canvas of other images' pieces"
        if cfg.get("canvas")
        else "images as they are"
    )
    src = f"classes {_classes(cfg['source_classes'])}" if cfg["source_classes"] else "the checkpoint's own task"
    L.append(
        f"Data `{cfg['data']}` ({canvas}); model {model}; source task {src}, target task classes "
        f"{_classes(cfg['target_classes'])}; run seed {cfg['seed']}, {cfg['threads']} thread(s)"
        + (
            f" per process, {cfg['jobs']} stages at a time (prune replicates and fine-tuning runs in worker "
            "processes; each stage's seconds are its own process's)"
            if cfg.get("jobs", 1) > 1
            else ""
        )
        + f"; layout `{cfg['layout']}`"
        + (f" (blocks {cfg['block_size']}x{cfg['block_size']})" if cfg["layout"] == "block" else "")
        + f", keep {cfg['keep_ratio']:g}, sink rule `{res.get('score', {}).get('sink', cfg['sink'])}`"
        + (" (`--sink auto`)" if cfg["sink"] == "auto" else "")
        + _blocks_phrase(res.get("score", {}).get("blocks", cfg.get("score_blocks", "last")))
        + (" (`--score-blocks auto`)" if cfg.get("score_blocks") == "auto" and "score" in res else "")
        + "."
    )
    L += _machine_lines(res)
    if "pretrain" in res and "probe" in res:
        p, q = res["pretrain"], res["probe"]
        pre = (
            f"pretrained from scratch on {p['n_source_train']} source images for {cfg['pretrain_epochs']} epochs "
            f"({_fmt(p['source_val_acc'], 1, '%')} on {p['n_source_val']} held-out source images)"
            if p["history"]
            else "the checkpoint as it is"
        )
        L += [
            f"Start model: {pre}, then a linear probe on the target ({q['n_train']} training images, weight decay "
            f"{q['weight_decay']:g} chosen on {q['n_select']} selection images): **{q['val_acc']:.2f}%** on "
            f"{q['n_val']} target validation images (every reported accuracy; one image = "
            f"{100 / q['n_val']:.2f} points); {p['params']:,} parameters.",
            "",
        ]
    return L


def _machines(res: dict) -> dict:
    """{machine: stages it ran} over this run's stages (summary lines; None: not recorded), most stages
    first."""
    counts: dict = {}
    for v in res.get("timing", {}).values():
        counts[v.get("machine")] = counts.get(v.get("machine"), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0] is None, kv[0] or "")))


def _machine_lines(res: dict) -> list[str]:
    ms = _machines(res)
    if not ms:
        return []
    if list(ms) == [None]:
        return ["Machine: not recorded (the run was made before each stage recorded its machine)."]
    if len(ms) == 1:
        return [f"Machine: {next(iter(ms))} (every stage)."]
    parts = [f"M{i + 1} = {m or 'not recorded'} ({n} stage{'s' * (n != 1)})" for i, (m, n) in enumerate(ms.items())]
    return [
        "",
        f"**Machines: the stages of this run ran on {len(ms)} machines** (a resumed run); their seconds, and "
        "the costs and ratios made from them, do not compare across machines: " + "; ".join(parts) + ".",
        "",
    ]


def _whose(blocks: str | None) -> str:
    """Whose class-token attention scored the patches, for a sentence ("the last block")."""
    return "the mean of every block" if blocks == "mean" else "the last block"


def _blocks_phrase(blocks: str) -> str:
    if blocks == "auto":
        return ", patch scores from the blocks chosen on the selection split"
    return f", patch scores from {_whose(blocks)}'s class-token attention"


def _classes(cl) -> str:
    if len(cl) > 2 and cl == list(range(cl[0], cl[-1] + 1)):
        return f"{cl[0]}–{cl[-1]}"
    return ", ".join(map(str, cl))


def sec_goals(res: dict) -> list[str]:
    g = res["stats"].get("goals", {})
    cfg = res["config"]
    if not g:
        return []
    L = ["## Goals (judged as stated before the run)", ""]
    if "finetune_gain" in g:
        x = g["finetune_gain"]
        L.append(
            f"- **Fine-tuning is worth doing** (dense full-data fine-tuning ≥ {GOAL_FT_GAIN:g} points above the "
            f"start model's linear probe, one-sided 95% lower bound): {_met(x['met'])}: {x['diff']:+.2f} points, "
            f"lower bound {x['lower']:+.2f}."
        )
    if "headline" in g:
        x = g["headline"]
        L.append(
            f"- **Headline `{x['arm']}`** (named in the config; whole job ≤ {GOAL_COST:g}x dense full-data "
            f"fine-tuning's and one-sided 95% lower bound vs dense full ≥ −{GOAL_POINTS:g} point): "
            f"{_met(x['met'])}: job {x['cost_ratio']:.2f}x, {x['diff']:+.2f} points, lower bound "
            f"{x['lower']:+.2f}."
        )
    others = [a for a in g.get("any_arm", []) if a != cfg.get("headline")]
    L.append(
        "- Other arms meeting the same bar (exploratory, not pre-registered): "
        + (", ".join(f"`{a}`" for a in others) if others else "none")
        + "."
    )
    if "tickets" in g:
        x = g["tickets"]
        vs = "—" if x["vs_random"] is None else f"{x['vs_random']:+.2f}"
        L.append(
            f"- **Tickets where the object is a minority** (attention tickets keep ≥ {GOAL_RECALL_RATIO:g}x "
            f"random's object-patch recall at keep ≤ 0.5 and beat random patches by ≥ {GOAL_TICKET_POINTS:g} "
            f"points): {_met(x['met'])}: the start model's tickets (rule `{x['rule']}` on "
            f"{_whose(x.get('blocks'))}'s attention, chosen "
            "on the selection split) keep "
            f"{100 * x['recall']:.1f}% of the object vs random's {100 * x['random_recall']:.1f}% "
            f"({x['ratio']:.2f}x); fixed tickets vs random patches {vs} points. The score maps are in "
            "tickets.png."
        )
    return L + [""]


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def sec_cost(res: dict) -> list[str]:
    rows = cost_rows(res)
    if not rows:
        return []
    cfg, unit = res["config"], _unit(res)
    flips = ", random flips (tickets mirrored with the image)" if cfg.get("finetune_augment") == "flip" else ""
    L = [
        "## The whole job: accuracy and cost (headline table)",
        "",
        f"{cfg['finetune_epochs']} fine-tuning epochs per arm at lr {cfg['finetune_lr']:g}{flips}; seeds: "
        f"{cfg.get('main_seeds')} for the headline `{cfg.get('headline')}`, dense/full and the compute-matched rows, "
        f"{cfg['seeds']} for the others (pruned starts: seed k from prune replicate k mod "
        f"{cfg.get('prune_seeds', 1)}). "
        "Accuracy: mean ± SD over seeds [95% t interval]. Δ: paired on the same images and seeds, the wider of the "
        "two-level bootstrap and the seed-level t interval (95%; * = significant after Holm over all findings); "
        f"lower: one-sided 95% lower bound vs dense full. Job: every stage the arm's user pays for ({unit}: "
        f"the cost basis; wall s beside it), pretraining excluded; x dense: the job over dense full-data "
        "fine-tuning's. Recall: share of the object's pixels in the patches each step kept (canvas data).",
        "",
        f"| arm | seeds | val acc (%) | Δ vs dense full | lower | Δ vs start | job ({unit}) | x dense | wall s "
        "| step | recall |",
        "|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        j = r["job"] or {}
        lower = r["vs_dense"]["lower"] if r["vs_dense"] else None
        L.append(
            f"| {r['arm']} | {r['seeds']} | {_acc(r['acc'])} | {_diff(r['vs_dense'])} | {_fmt(lower, 2)} | "
            f"{_diff(r['vs_start'])} | {_fmt(j.get('mean'), 1)} | {_fmt(j.get('ratio'), 2, 'x')} | "
            f"{_fmt(j.get('wall'), 1)} | {_fmt(r['step_ratio'], 2, 'x')} | "
            f"{_fmt(None if r['recall'] is None else 100 * r['recall'], 1, '%')} |"
        )
    if "budget" in res:
        b = res["budget"]
        L += [
            "",
            "Compute-matched rows: dense full-data fine-tuning for "
            + "; ".join(
                f"`{k}` {v['steps']} steps (the job of `{v['arm']}`, {v['target_s']:.1f} s)"
                for k, v in b.items()
                if isinstance(v, dict) and "steps" in v
            )
            + f", at dense/full's {b['dense_step_s'] * 1e3:.0f} ms per step ({_unit(res)}).",
        ]
    L += ["", "![cost](cost.png)", ""]
    return L + sec_cost_parts(res)


def sec_cost_parts(res: dict) -> list[str]:
    jobs = res["stats"]["jobs"]
    if not jobs:
        return []
    parts = []
    for j in jobs.values():
        parts += [p for p in j["parts"] if p not in parts]
    L = [
        f"What each job pays for ({_unit(res)}, mean over seeds):",
        "",
        "| arm | " + " | ".join(parts) + " | total |",
        "|---|" + "---:|" * (len(parts) + 1),
    ]
    for arm, j in jobs.items():
        L.append(f"| {arm} | " + " | ".join(_fmt(j["parts"].get(p), 1) for p in parts) + f" | {j['mean']:.1f} |")
    return L + [""]


def sec_findings(res: dict) -> list[str]:
    st = res["stats"]
    rows = findings(st)
    if not rows:
        return []
    titles = {
        "vs_dense_full": "vs dense full-data fine-tuning",
        "vs_start": "vs the start model (linear probe)",
        "policies_vs_random": "vs random patches at the same token count",
        "pairs": "fine-tuned pairs",
        "prune": "pruning, before fine-tuning (over replicates)",
        "sinks": "sink rules (start model's tickets)",
    }
    L = [
        "## Findings (automatic)",
        "",
        f"{st['family_size']} paired comparisons, one family: p is the larger of the bootstrap's and the seed t "
        "test's, Holm-adjusted in brackets; the interval is the wider of the two (both given where there are "
        "several seeds or replicates).",
    ]
    group = None
    for g, name, d in rows:
        if g != group:
            L += ["", f"**{titles[g]}**", ""]
            group = g
        L.append(f"- `{name}`: {_describe(d)}.")
    return L + [""]


def sec_tickets(res: dict) -> list[str]:
    if "score" not in res:
        return []
    t = res["score"]
    rec = t["random"]["val"]["object_recall"] is not None
    L = [
        "## Attention tickets and the sink rule",
        "",
        f"{t['num_patches']} patches per image, a ticket keeps {t['kept']} (keep {t['keep']:g}). Each rule's tickets "
        "are judged by the start model's accuracy when it sees only the ticket's patches (no training)"
        + (" and by their object-patch recall (share of the object's pixels in the kept patches)" if rec else "")
        + ", on the selection split (which chooses) and the validation split; random patches at the same count "
        "for reference.",
        "",
        "| scores from | sink rule | patches changed / image | acc, selection (%) | acc, val (%) |"
        + (" recall, selection | recall, val |" if rec else ""),
        "|---|---|---:|---:|---:|" + ("---:|---:|" if rec else ""),
    ]
    by_blocks = t.get("rules_by_blocks") or {t.get("blocks", "last"): t["rules"]}
    for blocks, rules in by_blocks.items():
        for rule in sorted(rules, key=lambda x: ("none", "first", "outlier", "norm").index(x)):
            r = rules[rule]
            used = "**" if (blocks, rule) == (t.get("blocks", blocks), t["sink"]) else ""
            L.append(
                f"| {used}{'last block' if blocks == 'last' else 'mean of blocks'}{used} | {used}{rule}{used} | "
                f"{r['val']['flagged_per_image']:.2f} | {r['select']['accuracy']:.2f} | {r['val']['accuracy']:.2f} |"
                + (
                    f" {100 * r['select']['object_recall']:.1f}% | {100 * r['val']['object_recall']:.1f}% |"
                    if rec
                    else ""
                )
            )
    rnd = t["random"]
    L.append(
        f"| random patches | — | — | {rnd['select']['accuracy']:.2f} | {rnd['val']['accuracy']:.2f} |"
        + (f" {100 * rnd['select']['object_recall']:.1f}% | {100 * rnd['val']['object_recall']:.1f}% |" if rec else "")
    )
    L += [
        "",
        f"Best rule on the selection split: `{t['best_rule_on_select']}` (by accuracy; ties go to the simpler "
        f"rule, then to the last block); this run used `{t['sink']}` (`--sink {t.get('sink_option', t['sink'])}`) on "
        f"{_whose(t.get('blocks'))}'s attention "
        f"(`--score-blocks {t.get('blocks_option', t.get('blocks', 'last'))}`; in bold). `first` (LOTUS's literal "
        "rule) only rewrites the class token's own score, which is dropped before ranking patches, so its tickets "
        "are identical to `none`."
        + (
            f" The start model's tickets of the training images keep {100 * t['object_recall_train']:.1f}% of the "
            "object."
            if t.get("object_recall_train") is not None
            else ""
        )
        + " tickets.png: validation images, the start model's score maps and kept patches"
        + (" (the object outlined in green)" if rec else "")
        + ".",
        "",
        "![tickets](tickets.png)",
        "",
    ]
    L += _sec_after(res, t)
    return L


def _seed_mean(runs: list, key: str, sub: str | None = None) -> float | None:
    vals = [r[key] if sub is None else r[key][sub] for r in runs if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def _sec_after(res: dict, t: dict) -> list[str]:
    """After fine-tuning: each model's accuracy on whole validation images, on the start model's tickets of
    them and on random patches (which view did it fit?), and the object recall of its own tickets."""
    ft = res.get("finetune", {})
    rows = {
        a: (
            _seed_mean(v, "accuracy"),
            _seed_mean(v, "accuracy_views", "tickets"),
            _seed_mean(v, "accuracy_views", "random"),
            _seed_mean(v, "object_recall_after"),
        )
        for a, v in ft.items()
    }
    views = any(r[1] is not None for r in rows.values())
    recall = any(r[3] is not None for r in rows.values())
    if not (views or recall):
        return []
    chosen, rnd = t["rules"][t["sink"]]["val"], t["random"]["val"]
    L = ["**After fine-tuning** (means over seeds)."]
    if views:
        L[-1] += (
            " Each fine-tuned model's accuracy on the validation images seen whole, only through the start "
            "model's tickets (the run's rule and keep), and only through random patches at the same count (the "
            "rows above): a model that scores higher on tickets than on whole images has fitted the tickets' view "
            "of an image, which evaluation on whole images does not show it."
        )
    if recall:
        L[-1] += (
            " Recall: the object-patch recall of the model's *own* tickets of the validation images (same rule "
            f"and keep) — does fine-tuning teach the attention where the object is? Random: "
            f"{100 * rnd['object_recall']:.1f}%."
        )
    head = ["arm"] + (["whole images (%)", "start's tickets (%)", "random patches (%)"] if views else [])
    head += ["recall of its own tickets"] if recall else []
    L += ["", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    if views and "probe" in res:
        L.append(
            f"| start (no fine-tuning) | {res['probe']['val_acc']:.2f} | {chosen['accuracy']:.2f} | {rnd['accuracy']:.2f} |"
            + (" — |" if recall else "")
        )
    for a, (whole, tick, rand, rec) in rows.items():
        cells = [a]
        if views:
            cells += [f"{x:.2f}" if x is not None else "—" for x in (whole, tick, rand)]
        if recall:
            cells.append(f"{100 * rec:.1f}%" if rec is not None else "—")
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    if recall:
        L += [
            "tickets_finetuned.png: the same images, scored by dense/full (seed 0) after fine-tuning.",
            "",
            "![tickets after fine-tuning](tickets_finetuned.png)",
            "",
        ]
    return L


def sec_sweeps(res: dict) -> list[str]:
    if "sweep" not in res:
        return []
    cfg = res["config"]
    L = ["## One-shot sweeps (no training)", ""]
    for layout, sw in res["sweep"]["layouts"].items():
        sps = [p["sparsity"] for p in sw["sweep_val"]]
        L += [
            f"**{layout}** (score `{sw['score']}`; essential sparsity **{sw['essential_sparsity']:g}**, chosen on "
            f"the {sw['chosen_on']} split within {cfg['tolerance']:g} point of the start model)",
            "",
            "| score / split | " + " | ".join(f"{s:g}" for s in sps) + " |",
            "|---|" + "---:|" * len(sps),
        ]
        for sc, pts in sw["scores"].items():
            L.append(f"| {sc} / selection | " + " | ".join(f"{p['accuracy']:.1f}" for p in pts) + " |")
        L += [f"| {sw['score']} / val | " + " | ".join(f"{p['accuracy']:.1f}" for p in sw["sweep_val"]) + " |", ""]
    return L


INSTANT_SOUP = [
    "main model: one pass over a random 50% of the data before every iteration, one AdamW state and one "
    "learning-rate schedule carried across the iterations (published: the same; their schedule is linear with "
    "warm-up over all 20 epochs, ours cosine with warm-up over twice the iterations a copy's 10% steps need)",
    "weak copies: K = 5, one pass over 10% each, from the main model's weights and mask with a fresh optimizer "
    "warming up linearly over 500 of 1000 steps towards the main model's current learning rate (as published)",
    "each copy prunes another 10% of its remaining weights by magnitude; the main model takes the union of the "
    "copies' masks (no weight averaging), until within 5 points of the target, then a one-shot magnitude prune to "
    "the target (as published)",
    "after the last pruning step: the recovery pass every method gets (published: the remaining epochs of "
    "fine-tuning, which here are the fine-tuning arms)",
    "not carried over: the published run's CLIP zero-shot head is frozen and its pruning covers the CLIP image "
    "tower's attention and MLP weights; here the linear-probe head trains and every linear but the head is pruned",
]
DEVIATIONS = [
    "weak copies start from the current soup with a fresh optimizer at the ISP learning rate",
    "K = 3 copies on 30% subsets (Instant Soup: K = 5 on 10%, one pass each)",
    "masks merged by a majority vote (ISP) or a union calibrated to the target (ISSP) (Instant Soup: "
    "uncalibrated union, 10% of the remaining weights per iteration)",
    "weights averaged into a soup (Instant Soup: no weight averaging; the main model keeps its weights)",
    "no training of the main model between rounds: the next round's copies start from the soup",
    "masks ranked by the layout's score (block: the best of L1 / L2 / gradient-weighted on the selection split)",
]


def sec_prune(res: dict) -> list[str]:
    if not res.get("prune"):
        return []
    st = res["stats"]
    L = [
        "## ISP, ISSP, the matched control and Instant Soup (before fine-tuning, val)",
        "",
        "Every method but one-shot ends with the same recovery pass after its final mask (one pass over a "
        f"{res['config']['isp_subset']:g} share of the training images, same images, order and steps); control = "
        "the one-shot mask with exactly that pass, so method − control is what the method adds at equal "
        "post-mask training. Accuracy: mean ± SD over replicates (each its own seeds); Δ paired over replicates "
        f"and images; cost: {_unit(res)} per replicate, recovery included.",
        "",
        "| layout @ target | method | replicates | actual sparsity | acc (%) | Δ vs one-shot at its sparsity "
        "| Δ vs control | cost |",
        "|---|---|---:|---:|---|---|---|---:|",
    ]
    basis = _basis(res)
    for tag, reps in res["prune"].items():
        cmp = st["prune"].get(tag, {})
        for name in METHOD_ORDER:
            if name not in reps[0]["methods"]:
                continue
            ms = [r["methods"][name] for r in reps]
            acc = stats.summary([m["accuracy"] for m in ms])
            c = sum(m["cost"][basis] for m in ms) / len(ms)
            L.append(
                f"| {tag} | {name} | {len(ms)} | {sum(m['sparsity'] for m in ms) / len(ms):.4f} | {_acc(acc)} | "
                f"{_diff(cmp.get(f'{name} vs one-shot at its sparsity'))} | {_diff(cmp.get(f'{name} vs control'))}"
                f" | {c:.1f} |"
            )
    L += [
        "",
        "Per round (replicate 0): copy sparsities, mean pairwise Jaccard of the copies' kept weights, share "
        "of the merged kept weights that only one copy keeps, merged sparsity:",
    ]
    for tag, reps in res["prune"].items():
        for name in METHOD_ORDER:
            m = reps[0]["methods"].get(name, {})
            if "rounds" not in m:
                continue
            L.append(f"- {tag} {name}: " + "; ".join(_round(x) for x in m["rounds"]))
    L += ["", "Instant Soup as published (`instant`; VITA-Group/instant_soup `isp_all.py`):"]
    L += [f"- {d}" for d in INSTANT_SOUP]
    L += ["", "Our ISP / ISSP differ from it in:"] + [f"- {d}" for d in DEVIATIONS] + [""]
    return L


def _round(x: dict) -> str:
    if x["round"] == "final":
        return f"one-shot to {x['merged_sparsity']:.3f}"
    return (
        f"r{x['round']} target {x['round_target']:.3f}"
        + (f" (copies at {x['copy_sparsity']:.3f})" if "copy_sparsity" in x else "")
        + f", Jaccard {x.get('jaccard', 1):.3f}, single-copy {x.get('single_copy_share', 0):.3f}"
        + f" -> {x['merged_sparsity']:.3f}"
    )


def sec_steps(res: dict) -> list[str]:
    if "step_time" not in res:
        return []
    s = res["step_time"]
    return (
        [
            "## Train-step time",
            "",
            f"Batch {s['batch_size']}, median of {s['rounds']} interleaved rounds (wall).",
            "",
            "| arm | step (ms) | vs dense full |",
            "|---|---:|---:|",
        ]
        + [f"| {n} | {1e3 * t:.1f} | {s['ratio_to_dense'][n]:.2f}x |" for n, t in s["step_time_s"].items()]
        + [""]
    )


def sec_plots(plots: list[str]) -> list[str]:
    rest = [p for p in plots if p != "cost.png"]
    return ["## Plots", ""] + [f"![{p}]({p})" for p in rest] + [""] if rest else []


def sec_stages(res: dict) -> list[str]:
    t = res["timing"]
    if not t:
        return []
    L = [
        "## Seconds per stage",
        "",
        "Wall and process CPU seconds of every stage of this run (evaluation included; "
        "pretraining is not part of any job).",
        "",
    ]
    ms = _machines(res)
    if len(ms) > 1:  # a resumed run: say which machine measured each stage
        label = {m: f"M{i + 1}" for i, m in enumerate(ms)}
        L += ["| stage | wall s | CPU s | machine |", "|---|---:|---:|---|"]
        L += [f"| {k} | {v['wall']:.1f} | {_fmt(v['cpu'], 1)} | {label[v.get('machine')]} |" for k, v in t.items()]
    else:
        L += ["| stage | wall s | CPU s |", "|---|---:|---:|"]
        L += [f"| {k} | {v['wall']:.1f} | {_fmt(v['cpu'], 1)} |" for k, v in t.items()]
    wall = sum(v["wall"] for v in t.values())
    cpu = sum(v["cpu"] or 0.0 for v in t.values())
    L += [
        f"| total | {wall:.1f} | {cpu:.1f} |" + (" |" if len(ms) > 1 else ""),
        "",
        "Timings come from the machine each stage ran on (named at the top): on a shared CPU wall time grows "
        "with the load, process CPU time much less (the cost basis). Accuracies are on the held-out target "
        "validation split.",
        "",
    ]
    return L


SECTIONS = (sec_setting, sec_goals, sec_cost, sec_findings, sec_tickets, sec_sweeps, sec_prune, sec_steps)


def markdown(res: dict, plots: list[str]) -> str:
    lines = []
    for section in SECTIONS:
        lines += section(res)
    lines += sec_plots(plots) + sec_stages(res)
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- plots
def _colors():
    import matplotlib.pyplot as plt

    c = plt.get_cmap("tab20").colors
    return [c[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20] for i in range(20)]


def plot_cost(res: dict):
    """Time to accuracy: each arm's seed-0 validation accuracy after every fine-tuning epoch, at the
    job's seconds so far (the stages before fine-tuning, then the epochs' training seconds), and the
    final mean ± SD over seeds at the mean job cost."""
    import matplotlib.pyplot as plt

    basis, st = _basis(res), res["stats"]
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    colors = _colors()
    if "start" in st["jobs"]:
        ax.plot(st["jobs"]["start"]["mean"], res["probe"]["val_acc"], "k*", ms=10, label="start (linear probe)")
    for i, (arm, per_seed) in enumerate(res.get("finetune", {}).items()):
        color = colors[i % 20]
        j = res["costs"][arm][0]
        prefix = j["total"][basis] - j["parts"]["finetune"][basis]
        r0 = per_seed[0]
        if r0["val_acc"]:
            acc0 = _start_acc(res, r0["start"])  # the model this arm starts from (seed 0's replicate)
            xs = ([prefix] if acc0 is not None else []) + [prefix + c for c in r0[f"epoch_{basis}"]]
            ax.plot(
                xs,
                ([acc0] if acc0 is not None else []) + r0["val_acc"],
                "-" if arm.endswith("/full") else "--",
                lw=1,
                color=color,
                alpha=0.7,
            )
        a = st["arms"][arm]
        mk = "*" if arm == res["config"].get("headline") else "s" if arm.endswith("/full") else "o"
        ax.errorbar(
            st["jobs"][arm]["mean"], a["mean"], yerr=a["sd"] or 0.0, fmt=mk, ms=7, capsize=3, color=color, label=arm
        )
    if "dense/full" in st["jobs"]:
        d = st["jobs"]["dense/full"]["mean"]
        ax.axvline(GOAL_COST * d, color="g", ls=":", label=f"{GOAL_COST:g}x dense full's job")
        m = st["arms"]["dense/full"]["mean"]
        ax.axhspan(m - GOAL_POINTS, m, color="g", alpha=0.08, label=f"within {GOAL_POINTS:g} pt of dense full")
    ax.set_xlabel(f"seconds of the whole job ({_unit(res)}; pretraining excluded, evaluation excluded)")
    ax.set_ylabel("target val accuracy (%)")
    ax.set_title("Time to accuracy: seed-0 curves per epoch; mean ± SD over seeds at the end")
    ax.legend(fontsize=6.5, loc="lower right", ncol=2)
    ax.grid(alpha=0.3)
    return fig


def _start_acc(res: dict, start: str):
    """Validation accuracy of an arm's start model (replicate 0 for a pruned start), or None."""
    if start == "dense":
        return res["probe"]["val_acc"]
    layout, _, method = start.rpartition("-")
    for reps in res.get("prune", {}).values():
        if reps[0]["layout"] == layout and method in reps[0]["methods"]:
            return reps[0]["methods"][method]["accuracy"]
    return None


def plot_sparsity(res: dict):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (layout, sw) in enumerate(res["sweep"]["layouts"].items()):
        xs = [p["sparsity"] for p in sw["sweep_val"]]
        ax.plot(
            xs,
            [p["accuracy"] for p in sw["sweep_val"]],
            "o-",
            color=f"C{i}",
            label=f"{layout} one-shot ({sw['score']}), val",
        )
        for sc, pts in sw["scores"].items():
            ax.plot(
                [p["sparsity"] for p in pts],
                [p["accuracy"] for p in pts],
                ":",
                color=f"C{i}",
                alpha=0.6,
                label=f"{layout} {sc}, selection",
            )
        ax.axvline(sw["essential_sparsity"], color=f"C{i}", ls="--", alpha=0.5)
    for tag, reps in res.get("prune", {}).items():
        for name, mk in (("isp", "s"), ("issp", "D"), ("control", "x"), ("instant", "^")):
            for r in reps:
                if name in r["methods"]:
                    m = r["methods"][name]
                    ax.plot(
                        m["sparsity"],
                        m["accuracy"],
                        mk,
                        color="C3" if r["layout"] == "unstructured" else "C4",
                        ms=6,
                        alpha=0.7,
                    )
    ax.set_xlabel("sparsity of the pruned linear layers")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("One-shot sweeps (lines); ISP ■ ISSP ◆ control × Instant Soup ▲ (val, every replicate)")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    return fig


def plot_steps(res: dict):
    import matplotlib.pyplot as plt

    med = res["step_time"]["step_time_s"]
    names, times = list(med), [1e3 * v for v in med.values()]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.bar(range(len(times)), times, color="C2")
    for i, n in enumerate(names):
        ax.text(i, times[i], f"{res['step_time']['ratio_to_dense'][n]:.2f}x", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(times)), names, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel(f"median train step (ms), batch {res['config']['batch_size']}")
    ax.set_title("Train-step time per arm (interleaved; ratio to dense full)")
    return fig


def _plots(run: RunDir, res: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for name, fn, ok in (
        ("cost.png", plot_cost, "finetune" in res and "costs" in res),
        ("sparsity.png", plot_sparsity, "sweep" in res),
        ("step_time.png", plot_steps, "step_time" in res),
    ):
        if ok:
            fig = fn(res)
            run.save_figure(name, fig)
            plt.close(fig)
            made.append(name)
    return made


def write(run: RunDir) -> dict:
    res = collect(run)
    plots = _plots(run, res)
    export_predictions(run)
    run.write_json("results.json", res)
    run.write_text("report.md", markdown(res, plots))
    return {"plots": plots}

"""The results object of a run: every finished stage's record, each arm's whole-job cost, and the
statistics the report states. Built from the run directory alone (``collect``); ``report`` only
formats it, and neither imports the pipeline.

Statistics (``lotus.stats``): every comparison is paired on the same validation images and seeds;
its interval is the wider of the two-level bootstrap and the seed-level t interval, its p the
larger of the two; all the comparisons listed as findings form one family, Holm-adjusted. The goal
is judged on the headline arm named in the config before the run: its whole job at most
``GOAL_COST`` of dense full-data fine-tuning's, and its one-sided 95% lower bound against dense full
at least ``-GOAL_POINTS`` (an equivalence bound against the margin, not a point estimate).
"""

from __future__ import annotations

import statistics as pystats

import torch

from . import cost, plan, stats, task
from .rundir import RunDir

GOAL_COST, GOAL_POINTS, GOAL_FT_GAIN = 0.5, 1.0, 10.0
GOAL_RECALL_RATIO, GOAL_TICKET_POINTS = 1.5, 2.0
METHOD_ORDER = ("oneshot", "isp", "issp", "control", "instant")
TIMING_KEYS = (
    "step_time_s",
    "images_per_s",
    "wall_s",
    "cpu_s",
    "step_time",
    "ratio_to_dense",
    "train_s",
    "train_cpu_s",
    "finetune_s",
    "score_s",
    "seconds",
    "score_seconds",
    "cost",
    "costs",
    "wall",
    "cpu",
    "reused_cost",
    "dense_step_s",
    "jobs_s0",
    "target_s",
    "lr",
    "steps",
    "epoch_wall",
    "epoch_cpu",
    "jobs",
    "goals",
)


def strip_timing(obj):
    """``obj`` without wall-clock / CPU measurements and what is derived from them (the jobs' costs,
    the goals): what must match between two runs with one seed. (The compute-matched arms' steps
    come from measured seconds: fix them with --matched-steps.)"""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS and k not in ("timing", "budget")}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


# ---------------------------------------------------------------- reading the run
def collect(run: RunDir) -> dict:
    """results.json: config + each finished stage's record + costs + statistics (absent: not run yet)."""
    cfg = run.config()
    res: dict = {"config": cfg, "timing": {}}

    def take(stage):
        r = run.result(stage)
        # machine: None for a stage of a run made before stages recorded it
        res["timing"][stage] = {"wall": r.pop("wall_s"), "cpu": r.pop("cpu_s", None), "machine": r.pop("machine", None)}
        return r

    for stage in ("pretrain", "probe", "score"):
        if run.done(stage):
            res[stage] = take(stage)
    if run.done("prune/sweep"):
        res["sweep"] = take("prune/sweep")
        res["prune"] = {}
        for layout in plan.layouts(cfg):
            for s in plan.prune_targets(run, cfg, layout):
                reps = [
                    take(plan.prune_stage(layout, s, r))
                    for r in plan.replicates(cfg)
                    if run.done(plan.prune_stage(layout, s, r))
                ]
                if reps:
                    res["prune"][plan.prune_tag(layout, s)] = reps
    arms = plan.arms(cfg)
    fts, starts = {}, {}
    for arm in arms:
        for k in range(plan.seeds_of(cfg, arm)):
            st = plan.tickets_stage(plan.start_of(arm), plan.replicate_of(cfg, k))
            if st != "score" and run.done(st) and st not in starts:
                starts[st] = take(st)
    if starts:
        res["start_scores"] = starts
    if run.done("budget"):
        res["budget"] = take("budget")
    for arm in arms:
        per_seed = [
            take(f"finetune/{arm}/s{k}") for k in range(plan.seeds_of(cfg, arm)) if run.done(f"finetune/{arm}/s{k}")
        ]
        if per_seed:
            fts[arm] = per_seed
    if fts:
        res["finetune"] = fts
        res["costs"] = {
            arm: [cost.job(run, cfg, arm, r["seed_index"], r) for r in per_seed] for arm, per_seed in fts.items()
        }
        res["costs"]["start"] = [cost.job(run, cfg, "start", 0)]
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


def _matrix(rows):
    rows = [r for r in rows if r is not None]
    return torch.stack(rows) if rows else None


# ---------------------------------------------------------------- statistics
def statistics(run: RunDir, res: dict) -> dict:
    """Per-arm summaries, costs, the paired comparisons (one Holm family), and the goals."""
    cfg = res["config"]
    basis = cfg.get("cost_basis", "cpu")
    out: dict = {
        "arms": {},
        "jobs": {},
        "vs_dense_full": {},
        "vs_start": {},
        "policies_vs_random": {},
        "pairs": {},
        "prune": {},
        "sinks": {},
        "basis": basis,
    }
    fts = res.get("finetune", {})
    mats = {
        arm: _matrix([_preds(run, f"preds/finetune/{arm}/s{r['seed_index']}.pt") for r in per_seed])
        for arm, per_seed in fts.items()
    }
    start = _preds(run, "preds/start.pt")
    for arm, per_seed in fts.items():
        out["arms"][arm] = stats.summary([r["accuracy"] for r in per_seed])
    for arm, jobs in res.get("costs", {}).items():
        tot = [j["total"][basis] for j in jobs]
        parts = {p: pystats.fmean(j["parts"][p][basis] for j in jobs) for p in jobs[0]["parts"]}
        out["jobs"][arm] = {
            "mean": pystats.fmean(tot),
            "per_seed": tot,
            "parts": parts,
            "wall": pystats.fmean(j["total"]["wall"] for j in jobs),
        }
    dense_job = out["jobs"].get("dense/full", {}).get("mean")
    if dense_job:
        for arm, j in out["jobs"].items():
            j["ratio"] = j["mean"] / dense_job

    def paired(a, b):
        ma, mb = mats.get(a), mats.get(b)
        if ma is None or mb is None:
            return None
        s = min(ma.shape[0], mb.shape[0])  # the seeds both arms ran (same seed indices)
        return stats.compare(ma[:s], mb[:s])

    for arm in fts:
        if arm != "dense/full":
            out["vs_dense_full"][arm] = paired(arm, "dense/full")
        if start is not None and mats.get(arm) is not None:
            out["vs_start"][arm] = stats.compare(mats[arm], start.expand_as(mats[arm]))
    for arm in fts:
        st, data = arm.split("/")
        policy, _, keep = data.partition("@")
        rnd = f"{st}/random" + (f"@{keep}" if keep else "")
        if policy not in ("full", "random") and not policy.startswith("matched") and rnd in fts:
            out["policies_vs_random"][arm] = paired(arm, rnd)
    pairs = [
        ("unstructured-isp/full", "unstructured-oneshot/full"),
        ("dense/fixed", "dense/random"),
        (f"{cfg['layout']}-isp/full", "unstructured-isp/full"),
        (f"{cfg['layout']}-isp/fixed", "dense/fixed"),
    ]
    head = cfg.get("headline")
    for m in plan.MATCHED:
        pairs.append((head, m))
    for a, b in pairs:
        if a in fts and b in fts and a != b:
            out["pairs"][f"{a} vs {b}"] = paired(a, b)
    for tag, reps in res.get("prune", {}).items():
        cmp = {}

        def mat(name):
            return _matrix([_preds(run, f"preds/{tag}/r{r['replicate']}/{name}.pt") for r in reps])

        for name in METHOD_ORDER[1:]:
            if name not in reps[0]["methods"]:
                continue
            mine = mat(name)
            refs = [r["methods"][name].get("oneshot_at_actual") for r in reps]  # each replicate's own
            ref = (
                None
                if None in refs
                else _matrix([_preds(run, f"preds/{tag}/r{r['replicate']}/{n}.pt") for r, n in zip(reps, refs)])
            )
            if ref is not None and mine is not None and ref.shape == mine.shape:
                cmp[f"{name} vs one-shot at its sparsity"] = stats.compare(mine, ref)
            ctrl = mat("control")
            if name != "control" and ctrl is not None and mine is not None:
                cmp[f"{name} vs control"] = stats.compare(mine, ctrl)
        out["prune"][tag] = cmp
    if "score" in res:
        none, rnd = _preds(run, "preds/sink_none.pt"), _preds(run, "preds/sink_random.pt")
        for rule in ("outlier", "norm"):
            p = _preds(run, f"preds/sink_{rule}.pt")
            if p is not None and none is not None:
                out["sinks"][f"{rule} vs none"] = stats.compare(p, none)
        rule = res["score"]["sink"]
        chosen = _preds(run, f"preds/sink_{rule}.pt")
        if chosen is not None and rnd is not None:
            out["sinks"][f"{rule} (the run's rule) vs random"] = stats.compare(chosen, rnd)
        for other in set(res["score"].get("rules_by_blocks", {})) - {res["score"].get("blocks")}:
            p = _preds(run, f"preds/sink_{other}_{rule}.pt")  # --score-blocks auto: the blocks not chosen
            if p is not None and chosen is not None:
                out["sinks"][f"{res['score']['blocks']} blocks vs {other} ({rule})"] = stats.compare(chosen, p)
    _holm(out)
    out["goals"] = goals(res, out)
    return out


def findings(st: dict) -> list[tuple[str, str, dict]]:
    """(group, name, comparison) of every finding: the family Holm's correction runs over."""
    rows = []
    for group in ("vs_dense_full", "vs_start", "policies_vs_random", "pairs", "sinks"):
        rows += [(group, k, d) for k, d in st[group].items() if d]
    for tag, cmp in st["prune"].items():
        rows += [("prune", f"{tag}: {k}", d) for k, d in cmp.items() if d]
    return rows


def _holm(st: dict) -> None:
    rows = findings(st)
    adj = stats.holm({f"{g}|{k}": d["p"] for g, k, d in rows})
    for g, k, d in rows:
        d["p_holm"] = adj[f"{g}|{k}"]
    st["family_size"] = len(rows)


def goals(res: dict, st: dict) -> dict:
    """The issue's goals, each with the numbers it is judged on (None: not measurable in this run)."""
    cfg = res["config"]
    head = cfg.get("headline")
    out = {}
    d = st["vs_start"].get("dense/full")
    if d:
        out["finetune_gain"] = {
            "diff": d["diff"],
            "lower": d["lower"],
            "met": d["lower"] >= GOAL_FT_GAIN,
            "vs": "linear probe (the start model)",
        }
    h = st["vs_dense_full"].get(head)
    if h and head in st["jobs"] and "ratio" in st["jobs"][head]:
        ratio = st["jobs"][head]["ratio"]
        out["headline"] = {
            "arm": head,
            "cost_ratio": ratio,
            "diff": h["diff"],
            "lower": h["lower"],
            "met": ratio <= GOAL_COST and h["lower"] >= -GOAL_POINTS,
        }
    any_arm = [
        a
        for a, j in st["jobs"].items()
        if a in st["vs_dense_full"]
        and st["vs_dense_full"][a]
        and j.get("ratio", 9) <= GOAL_COST
        and st["vs_dense_full"][a]["lower"] >= -GOAL_POINTS
    ]
    out["any_arm"] = any_arm
    sc = res.get("score")
    if sc and sc["random"]["select"]["object_recall"] is not None:
        best = sc["sink"]  # the rule the run chose on the selection split
        rr = sc["rules"][best]["val"]["object_recall"] / max(sc["random"]["val"]["object_recall"], 1e-9)
        tick = st["policies_vs_random"].get("dense/fixed") or st["policies_vs_random"].get(f"{cfg['layout']}-isp/fixed")
        out["tickets"] = {
            "rule": best,
            "blocks": sc.get("blocks", "last"),
            "recall": sc["rules"][best]["val"]["object_recall"],
            "random_recall": sc["random"]["val"]["object_recall"],
            "ratio": rr,
            "vs_random": tick["diff"] if tick else None,
            "met": rr >= GOAL_RECALL_RATIO
            and cfg["keep_ratio"] <= 0.5
            and bool(tick)
            and tick["diff"] >= GOAL_TICKET_POINTS,
        }
    return out


# ---------------------------------------------------------------- per-image file
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
        arrays["labels"] = task.target_sets(run.config())[2].y.numpy().astype(np.int16)
        run.save_npz("predictions.npz", **arrays)
    return len(arrays)

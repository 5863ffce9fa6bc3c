"""The cost of the whole job: what a user pays, stage by stage, to get a fine-tuned model.

Every stage records the seconds of each part a user would pay for as ``{"wall": s, "cpu": s}``:
wall-clock (``time.perf_counter``) and this process's CPU time (``time.process_time``, all its
threads; DataLoader worker processes are not included, so ``.npz`` / cifar10 data, loaded in the
main process, are fully counted). On a CPU shared with other jobs, wall time grows with the load and
CPU time much less, so the cost axis uses CPU seconds there (``cost_basis`` "cpu"); on a GPU the
host's CPU time says little about the device's work, so it uses wall time ("wall").

An arm's job (``job``): the linear probe that makes the start model; for a pruned start the layout's
sweep (with the score choice) and the pruning method's rounds, its recovery training included, of the
replicate the seed starts from; for a ticket policy the sink-rule choice (``--sink auto``) and the
scoring of the training images by the start model; then the fine-tuning itself (batch loading,
steps, re-scoring). Evaluation (per-epoch validation, the report's measurements) is never counted;
pretraining is listed apart (a user fine-tuning a pretrained model does not pay for it).
"""

from __future__ import annotations

import time

from . import finetune as ft
from . import plan

ATTENTION_POLICIES = ("fixed", "rescore_epoch", "rescore_step", "aug_rescore", "mix")  # use a sink rule
NEEDS_SCORES = ("fixed", "rescore_epoch", "mix")  # start from the start model's scores of the training images


class Clock:
    """Accumulates wall and process-CPU seconds over ``with clock:`` blocks (re-entrant use adds up)."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c
        return False

    def add(self, other: dict) -> Clock:
        self.wall += other["wall"]
        self.cpu += other["cpu"]
        return self

    def as_dict(self) -> dict:
        return {"wall": self.wall, "cpu": self.cpu}


def zero() -> dict:
    return {"wall": 0.0, "cpu": 0.0}


def total(parts: dict) -> dict:
    return {k: sum(p[k] for p in parts.values()) for k in ("wall", "cpu")}


def job(run, cfg, arm: str, seed_k: int, finetune_result: dict | None = None) -> dict:
    """{"parts": {name: {"wall", "cpu"}}, "total": {...}} of the whole job that produced ``arm``'s
    seed ``seed_k`` (``arm`` "start": the start model, no fine-tuning). Reads the finished stages'
    records; ``finetune_result`` saves re-reading the arm's own."""
    parts = {"probe": run.result("probe")["cost"]["probe"]}
    if arm != "start":
        spec = ft.parse_arm(arm)
        start, r = spec["start"], plan.replicate_of(cfg, seed_k)
        if spec["layout"] != "dense":
            parts[f"sweep/{spec['layout']}"] = run.result("prune/sweep")["layouts"][spec["layout"]]["cost"]
            if spec["method"] != "oneshot":
                stage = plan.prune_stage(spec["layout"], plan.essential_target(run, cfg, spec["layout"]), r)
                parts[f"prune/{spec['method']}"] = run.result(stage)["methods"][spec["method"]]["cost"]
        if spec["policy"] in ATTENTION_POLICIES and "auto" in (cfg["sink"], cfg.get("score_blocks", "last")):
            parts["score choice"] = run.result("score")["cost"]["sink_choice"]
        if spec["policy"] in NEEDS_SCORES:
            if start == "dense":
                parts["tickets"] = run.result("score")["cost"]["train_scores"]
            else:
                parts["tickets"] = run.result(plan.tickets_stage(start, r))["cost"]
        res = finetune_result or run.result(f"finetune/{arm}/s{seed_k}")
        parts["finetune"] = res["cost"]
    return {"parts": parts, "total": total(parts)}

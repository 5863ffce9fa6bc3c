import json

import numpy as np
import pytest
import torch

from lotus.cli import main
from lotus.model import build

from ._tiny import TINY, make_npz
from .test_model import CFG


def _fails(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lotus: error: ") and "\n" not in err and "Traceback" not in err
    assert __import__("re").search(match, err), err
    return err


@pytest.mark.parametrize(
    "override, match",
    [
        (dict(x=None), "lacks key"),
        (dict(x=np.zeros((8, 3, 16, 16), np.float64)), "x must be uint8"),
        (dict(y=np.zeros(64, np.float32)), "y must be int64"),
        (dict(y=np.arange(64, dtype=np.int64) - 1), "labels out of range"),
    ],
)
def test_bad_data_exits_2_and_creates_nothing(tmp_path, capsys, override, match):
    bad = make_npz(tmp_path / "bad.npz", **override)
    out = tmp_path / "run"
    _fails(capsys, ["run", "--data", str(bad), "--out", str(out), *TINY], match)
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the deliberately corrupt checkpoint
def test_missing_data_and_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    _fails(capsys, ["run", "--data", str(tmp_path / "none.npz"), "--out", str(out)], "--data: file not found")
    data = make_npz(tmp_path / "d.npz")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80garbage")
    _fails(
        capsys,
        ["run", "--data", str(data), "--out", str(out), *TINY, "--checkpoint", str(bad)],
        "--checkpoint: cannot read",
    )
    other = tmp_path / "other.pt"
    torch.save(build(dict(CFG, embed_dim=48), 4, 16).state_dict(), other)  # another width: not this model
    _fails(
        capsys,
        ["run", "--data", str(data), "--out", str(out), *TINY, "--checkpoint", str(other)],
        "does not match the model",
    )
    assert not out.exists()
    _fails(capsys, ["run", "--resume", str(tmp_path)], "no config.json")
    _fails(capsys, ["run", "--out", str(out)], "--data: required")


def test_existing_run_dir_is_never_touched(tmp_path, capsys):
    data = make_npz(tmp_path / "d.npz")
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    (out / "config.json").write_text("{}")
    for cmd in ("run", "pretrain"):
        _fails(
            capsys, [cmd, "--data", str(data), "--out", str(out), *TINY], "already exists and is not empty.*--resume"
        )
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me" and (out / "config.json").read_text() == "{}"


def test_help_explains_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in (
        "--resume",
        "--isp-vote",
        "--isp-subset",
        "--tolerance",
        "--keep-ratio",
        "--bf16",
        "--threads",
        "--jobs",
        "--layout",
        "--block-size",
        "--block-score",
        "--seeds",
        "--sink",
        "--policies",
        "--isp-recipe",
        "--select-fraction",
        "--compare-sparsities",
        "--arms",
        "--clip-grad",
        "--workers",
        "--crop-pct",
        "--finetune-lr",
        "--isp-lr",
    ):
        assert opt in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "evaluate" in capsys.readouterr().out


def test_view_accuracies_of_fine_tuned_models(tiny_run):
    """Each fine-tuned model's accuracy on the validation images seen only through the start model's
    tickets / random patches: the saved views are the score stage's (the start model's accuracy on them
    is the score stage's), and every arm's recorded figures are recomputed here by a forward with those
    patches."""
    from lotus import pipeline, task
    from lotus.data import loader
    from lotus.rundir import RunDir

    run, _ = tiny_run
    rd = RunDir.open(run)
    cfg = rd.config()
    res = json.loads((run / "results.json").read_text())
    _, _, va = task.target_sets(cfg)
    views = rd.load_torch(pipeline.VIEWS_FILE)
    k = res["score"]["kept"]
    assert views["tickets"].shape == views["random"].shape == (len(va), k)
    assert not torch.equal(views["tickets"], views["random"])

    @torch.no_grad()
    def acc(model, keep):
        model.eval()
        right = 0
        for xb, yb, ids in loader(va, 7, shuffle=False):  # odd batches: rows must follow the image ids
            right += int((model(va.prepare(xb, torch.device("cpu")), keep_idx=keep[ids]).argmax(1) == yb).sum())
        return 100.0 * right / len(va)

    start = pipeline.load_model(rd, cfg, "models/start.pt")
    assert acc(start, views["tickets"]) == pytest.approx(res["score"]["rules"][res["score"]["sink"]]["val"]["accuracy"])
    assert acc(start, views["random"]) == pytest.approx(res["score"]["random"]["val"]["accuracy"])
    for arm, recs in res["finetune"].items():
        for seed, r in enumerate(recs):
            model = pipeline.load_model(rd, cfg, f"models/finetune/{arm}/s{seed}.pt")
            want = {"tickets": acc(model, views["tickets"]), "random": acc(model, views["random"])}
            assert r["accuracy_views"] == pytest.approx(want), (arm, seed)

    # The tiny models often predict one class whatever they see, so the records above may not tell the
    # views apart: a model that answers from the first kept patch's index does, with views built so that
    # the tickets are right on every image and the random patches on none.
    class FirstPatch(torch.nn.Module):
        def forward(self, x, keep_idx):
            return torch.nn.functional.one_hot(keep_idx[:, 0] % 2, 2).float()

    class Views:  # a run directory holding only the views file
        def exists(self, name):
            return name == pipeline.VIEWS_FILE

        def load_torch(self, name):
            y = va.y[:, None].expand(-1, k)
            return {"tickets": y.clone(), "random": (1 - y).clone()}

    assert set(va.y.tolist()) == {0, 1}
    assert pipeline._views(Views(), cfg, FirstPatch(), va) == {"tickets": 100.0, "random": 0.0}
    md = (run / "report.md").read_text()
    assert "| arm | whole images (%) | start's tickets (%) | random patches (%) | recall of its own tickets |" in md
    assert "| start (no fine-tuning) |" in md


def test_report_of_a_run_without_view_accuracies(tiny_run):
    """A run directory from before the view accuracies (no ``accuracy_views``; on other data no object
    recall either) still reports: the after-fine-tuning table keeps the columns it has data for."""
    from lotus import report

    run, _ = tiny_run
    res = json.loads((run / "results.json").read_text())
    for recs in res["finetune"].values():
        for r in recs:
            r.pop("accuracy_views")
    md = report.markdown(res, [])
    assert "| arm | recall of its own tickets |" in md and "start's tickets" not in md
    for recs in res["finetune"].values():
        for r in recs:
            r["object_recall_after"] = None
    assert "After fine-tuning" not in report.markdown(res, [])


def test_every_stage_records_its_machine(tiny_run):
    """Each stage's seconds come with the machine that measured them; the report names it, and a run
    whose stages ran on several machines (resumed elsewhere) says so and which stage ran where."""
    from lotus import report
    from lotus_kernels import machine

    run, _ = tiny_run
    res = json.loads((run / "results.json").read_text())
    here = machine.summary()
    assert res["timing"] and {v["machine"] for v in res["timing"].values()} == {here}
    md = (run / "report.md").read_text()
    assert f"Machine: {here} (every stage)." in md and "| machine |" not in md

    stages = list(res["timing"])
    other = "Other CPU, 4 of 4 CPUs (AVX2), torch 2.11.0"
    res["timing"][stages[-1]]["machine"] = other
    res["timing"][stages[-2]]["machine"] = None
    md = report.markdown(res, [])
    assert "ran on 3 machines" in md and "Machine: " not in md
    assert f"M1 = {here} ({len(stages) - 2} stages); M2 = {other} (1 stage); M3 = not recorded (1 stage)." in md
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ")}
    assert rows[stages[0]].endswith("| M1 |") and rows[stages[-1]].endswith("| M2 |")
    assert rows[stages[-2]].endswith("| M3 |") and rows["total"].endswith(" |")

    for v in res["timing"].values():  # a run made before stages recorded their machine
        del v["machine"]
    md = report.markdown(res, [])
    assert "Machine: not recorded" in md and "| machine |" not in md


def test_tiny_run_report_and_evaluate(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    res = json.loads((run / "results.json").read_text())
    assert {
        "pretrain",
        "probe",
        "score",
        "sweep",
        "prune",
        "finetune",
        "costs",
        "budget",
        "step_time",
        "stats",
    } <= res.keys()
    arms = [
        "dense/full",
        "unstructured-isp/full",
        "block-isp/full",
        "dense/fixed",
        "dense/fixed_random",
        "dense/random",
        "block-isp/fixed",
        "block-isp/random",
        "block-isp/rescore_epoch",
        "block-isp/aug_rescore",
        "dense/matched-cheapest",
        "dense/matched-headline",
    ]
    assert set(res["finetune"]) == set(arms) and all(len(v) == 2 for v in res["finetune"].values())
    assert set(res["step_time"]["ratio_to_dense"]) == set(arms[:-2])  # the matched arms step like dense/full
    assert set(res["stats"]["policies_vs_random"]) == {
        a for a in arms if a.split("/")[1] in ("fixed", "fixed_random", "rescore_epoch", "aug_rescore")
    }
    # two prune replicates per (layout, sparsity), every method with its cost; pruned arms start from them
    for tag, reps in res["prune"].items():
        assert [r["replicate"] for r in reps] == [0, 1]
        assert all(r["methods"][m]["cost"]["cpu"] > 0 for r in reps for m in ("isp", "issp", "control"))
    assert [r["replicate"] for r in res["finetune"]["block-isp/fixed"]] == [0, 1]
    # the whole job of every arm: its parts, in the cost basis (CPU seconds here)
    st = res["stats"]
    assert st["basis"] == "cpu" and set(st["jobs"]) == set(arms) | {"start"}
    parts = st["jobs"]["block-isp/fixed"]["parts"]
    assert set(parts) == {"probe", "sweep/block", "prune/isp", "score choice", "tickets", "finetune"}
    assert set(st["jobs"]["dense/full"]["parts"]) == {"probe", "finetune"}
    assert st["jobs"]["block-isp/fixed"]["mean"] == pytest.approx(sum(parts.values()))
    assert st["jobs"]["dense/full"]["ratio"] == pytest.approx(1.0)
    assert [r["steps"] for r in res["finetune"]["dense/matched-cheapest"]] == [2, 2]  # --matched-steps
    # statistics: both intervals, the wider reported, one Holm family, no p printed as 0
    d = st["vs_dense_full"]["dense/fixed"]
    assert (
        d["t"] is not None
        and d["hi"] - d["lo"] >= max(d["t"]["hi"] - d["t"]["lo"], d["bootstrap"]["hi"] - d["bootstrap"]["lo"]) - 1e-9
    )
    assert d["p_holm"] >= d["p"] and st["family_size"] >= 20
    assert {"finetune_gain", "headline", "tickets"} <= st["goals"].keys()
    # canvas data: each ticket policy's object-patch recall (random: keep, by construction, up to sampling)
    rec = {a: v[0]["object_recall"] for a, v in res["finetune"].items()}
    assert rec["dense/full"] is None and rec["block-isp/aug_rescore"] is None  # all patches; augmented images
    assert rec["block-isp/random"] == pytest.approx(0.5, abs=0.1) and 0 < rec["dense/fixed"] <= 1
    assert res["score"]["random"]["val"]["object_recall"] == pytest.approx(0.5, abs=0.15)
    for png in ("cost.png", "sparsity.png", "step_time.png", "tickets.png"):
        assert (run / png).stat().st_size > 1000
    import numpy as np

    with np.load(run / "predictions.npz") as f:  # per-image predictions of every model, and the labels
        n_val = res["probe"]["n_val"]
        assert {f"finetune/{a}/s{k}" for a in arms for k in range(2)} | {"start"} <= set(f.files)
        assert "labels" in f.files and all(f[k].shape == (n_val,) for k in f.files)
        acc = 100 * float((f["finetune/dense/full/s1"] == f["labels"]).mean())
        assert acc == pytest.approx(res["finetune"]["dense/full"][1]["accuracy"])
    md = (run / "report.md").read_text()
    for text in (
        "The whole job",
        "Goals",
        "Headline `dense/fixed`",
        "essential sparsity",
        "ISSP",
        "control",
        "instant",
        "block-isp/fixed",
        "sink rule",
        "not significant",
        "Holm",
        "seed t",
        "recall",
        "Instant Soup as published",
        "compute-matched",
        "What each job pays for",
    ):
        assert text.lower() in md.lower(), text
    assert "p = 0.000" not in md and "p = 0 " not in md
    # evaluate: the start model and every fine-tuned one, on the target classes of any file
    other = make_npz(tmp_path / "other.npz", n=40, seed=5)  # 4 classes: the target task is classes 2, 3
    n_target = int((np.load(other)["y"] >= 2).sum())
    main(["evaluate", str(run), "--data", str(other), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {f"{a}#s{k}" for a in arms for k in range(2)} | {"start"}
    for name, v in out.items():
        assert set(v) == {
            "arm",
            "seed",
            "accuracy",
            "n",
            "layout",
            "sparsity",
            "keep",
            "step_ratio",
            "finetune_seconds",
            "total_seconds",
        }
        assert v["n"] == n_target and 0 <= v["accuracy"] <= 1 and v["total_seconds"] > 0
        assert v["arm"] == name.split("#")[0]
    assert out["start"]["arm"] == "start" and out["start"]["seed"] is None and out["start"]["finetune_seconds"] == 0
    assert out["block-isp/fixed#s0"]["layout"] == "block" and out["block-isp/fixed#s0"]["keep"] == 0.5
    assert out["dense/full#s1"]["keep"] == 1.0 and out["dense/full#s1"]["sparsity"] == 0.0
    assert out["block-isp/fixed#s1"]["total_seconds"] == pytest.approx(st["jobs"]["block-isp/fixed"]["per_seed"][1])
    assert out["block-isp/fixed#s0"]["total_seconds"] > out["start"]["total_seconds"]
    # other data goes through the run's data config: 32-px images on a 64-px canvas, resized to the model's 32
    main(["evaluate", str(run), "--data", str(make_npz(tmp_path / "big.npz", n=16, size=32)), "--json"])
    big = json.loads(capsys.readouterr().out)
    assert set(big) == set(out) and all(0 <= v["accuracy"] <= 1 for v in big.values())
    _fails(
        capsys, ["evaluate", str(run), "--data", str(make_npz(tmp_path / "c.npz", classes=6))], "labels out of range"
    )
    _fails(
        capsys,
        ["evaluate", str(run), "--data", str(make_npz(tmp_path / "e.npz", classes=2))],
        "no image of the run's target classes",
    )


@pytest.mark.parametrize(
    "args, match",
    [
        (["--layout", "diagonal"], "--layout: expected one of unstructured, block, 2:4"),
        (["--layout", "block", "--block-size", "64"], "--block-size: 64 does not divide blocks.0.attn.qkv.weight"),
        (["--block-size", "24"], "--block-size: expected one of 16, 32, 64"),
        (["--block-score", "l3"], "--block-score"),
        (["--sink", "mean"], "--sink: expected one of none, first, outlier, norm, auto"),
        (["--policies", "fixed,best"], "--policies: unknown best"),
        (["--arms", "dense/everything"], "--arms"),
        (["--arms", "2:4-isp/full"], "prunes in layout 2:4"),
        (["--seeds", "0"], "--seeds"),
        (["--prune-seeds", "0"], "--prune-seeds: expected at least 1"),
        (["--jobs", "0"], "--jobs: expected at least 1, got 0"),
        (["--score-blocks", "first"], "--score-blocks"),
        (["--matched-steps", "0"], "--matched-steps: expected at least 1"),
        (["--headline", "2:4-isp/fixed"], "--headline: 2:4-isp/fixed prunes in layout 2:4"),
        (["--isp-recipe", "soup"], "--isp-recipe"),
        (["--finetune-augment", "shift"], "--finetune-augment: invalid choice: 'shift'"),
        (["--compare-sparsities", "1.2"], "--compare-sparsities"),
    ],
)
def test_bad_options_exit_2_and_write_nothing(tmp_path, capsys, args, match):
    data = make_npz(tmp_path / "d.npz")
    out = tmp_path / "run"
    _fails(capsys, ["run", "--data", str(data), "--out", str(out), *TINY, *args], match)
    assert not out.exists()


def test_24_layout_run(tmp_path, capsys):
    """2:4 through every stage: sweep at 0.5 only, ISP / ISSP / control keep the 2-of-4 pattern."""
    data = make_npz(tmp_path / "d.npz")
    out = tmp_path / "run"
    main(
        [
            "run",
            "--data",
            str(data),
            "--out",
            str(out),
            *TINY,
            "--layout",
            "2:4",
            "--seeds",
            "1",
            "--main-seeds",
            "1",
            "--prune-seeds",
            "1",
            "--arms",
            "dense/full,2:4-isp/fixed,2:4-isp/random",
            "--headline",
            "2:4-isp/fixed",
            "--no-matched",
            "--no-instant-soup",
            "--timing-rounds",
            "0",
        ]
    )
    res = json.loads((out / "results.json").read_text())
    assert [p["sparsity"] for p in res["sweep"]["layouts"]["2:4"]["sweep_val"]] == [0.0, 0.5]
    for name in ("oneshot", "isp", "issp", "control"):
        masks = torch.load(out / "masks" / "2:4@0.5" / "r0" / f"{name}.pt", weights_only=True)
        assert all((m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all() for m in masks.values()), name
    main(["evaluate", str(out), "--data", str(data), "--json"])
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["2:4-isp/fixed#s0"]["layout"] == "2:4" and ev["2:4-isp/fixed#s0"]["sparsity"] == pytest.approx(0.5)
    assert ev["dense/full#s0"]["step_ratio"] is None  # no timing stage in this run


def test_score_blocks_mean_makes_the_runs_tickets(tmp_path):
    from lotus import pipeline, task, tickets
    from lotus.rundir import RunDir

    data = make_npz(tmp_path / "d.npz")
    out = tmp_path / "run"
    main(["pretrain", "--data", str(data), "--out", str(out), *TINY, "--score-blocks", "mean"])
    main(["score", str(out)])
    run = RunDir.open(out)
    cfg = run.config()
    assert cfg["score_blocks"] == "mean"
    tr, _, _ = task.target_sets(cfg)
    model = pipeline.load_model(run, cfg, "models/start.pt")
    rule = run.result("score")["sink"]
    got = run.load_torch("tickets/start.pt")["scores"]
    assert torch.equal(got, tickets.score(model, tr, sink=rule, blocks="mean"))
    assert not torch.allclose(got, tickets.score(model, tr, sink=rule))


def test_score_blocks_auto_chooses_blocks_and_rule_on_the_selection_split(tmp_path):
    from lotus import pipeline, task, tickets
    from lotus.rundir import RunDir

    data = make_npz(tmp_path / "d.npz")
    out = tmp_path / "run"
    main(["pretrain", "--data", str(data), "--out", str(out), *TINY])  # --sink auto --score-blocks auto
    main(["score", str(out)])
    run = RunDir.open(out)
    cfg = run.config()
    res = run.result("score")
    assert cfg["score_blocks"] == "auto" and res["blocks_option"] == "auto"
    assert set(res["rules_by_blocks"]) == {"last", "mean"}
    # the chosen pair has the best selection accuracy; ties go to the simpler rule, then the last block
    order = [(b, r) for b in ("last", "mean") for r in ("none", "outlier", "norm")]
    acc = {(b, r): res["rules_by_blocks"][b][r]["select"]["accuracy"] for b, r in order}
    top = max(acc.values())
    tied = [(b, r) for b, r in order if acc[b, r] == top]
    want = min(tied, key=lambda br: (("none", "outlier", "norm").index(br[1]), ("last", "mean").index(br[0])))
    assert (res["blocks"], res["sink"]) == want
    assert res["rules"] == res["rules_by_blocks"][want[0]]
    # the selection accuracy of the chosen pair, recomputed from the start model
    _, sel, _ = task.target_sets(cfg)
    model = pipeline.load_model(run, cfg, "models/start.pt")
    kept = tickets.keep_indices(tickets.score(model, sel, sink=want[1], blocks=want[0]), cfg["keep_ratio"])
    pred = tickets.ticket_predict(model, sel, kept)
    assert 100 * float((pred == sel.y).float().mean()) == pytest.approx(top)
    # every later stage scores the way the run chose
    assert pipeline.scoring(run, cfg) == {"sink": want[1], "blocks": want[0]}
    tr, _, _ = task.target_sets(cfg)
    assert torch.equal(
        run.load_torch("tickets/start.pt")["scores"], tickets.score(model, tr, sink=want[1], blocks=want[0])
    )
    other = "mean" if want[0] == "last" else "last"
    assert (out / "preds" / f"sink_{want[1]}.pt").exists() and (out / "preds" / f"sink_{other}_{want[1]}.pt").exists()

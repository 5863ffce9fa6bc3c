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


@pytest.mark.parametrize("override, match", [
    (dict(x=None), "lacks key"),
    (dict(x=np.zeros((8, 3, 16, 16), np.float64)), "x must be uint8"),
    (dict(y=np.zeros(64, np.float32)), "y must be int64"),
    (dict(y=np.arange(64, dtype=np.int64) - 1), "labels out of range"),
])
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
    _fails(capsys, ["run", "--data", str(data), "--out", str(out), *TINY, "--checkpoint", str(bad)],
           "--checkpoint: cannot read")
    other = tmp_path / "other.pt"
    torch.save(build(dict(CFG, embed_dim=48), 4, 16).state_dict(), other)  # another width: not this model
    _fails(capsys, ["run", "--data", str(data), "--out", str(out), *TINY, "--checkpoint", str(other)],
           "does not match the model")
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
        _fails(capsys, [cmd, "--data", str(data), "--out", str(out), *TINY], "already exists and is not empty.*--resume")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me" and (out / "config.json").read_text() == "{}"


def test_help_explains_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--resume", "--isp-vote", "--isp-subset", "--tolerance", "--keep-ratio", "--bf16", "--threads",
                "--layout", "--block-size", "--block-score", "--seeds", "--sink", "--policies", "--isp-recipe",
                "--select-fraction", "--compare-sparsities", "--arms", "--clip-grad", "--workers", "--crop-pct",
                "--finetune-lr", "--isp-lr"):
        assert opt in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "evaluate" in capsys.readouterr().out


def test_tiny_run_report_and_evaluate(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    res = json.loads((run / "results.json").read_text())
    assert {"dense", "tickets", "sweep", "prune", "finetune", "step_time", "stats"} <= res.keys()
    arms = ["dense/full", "unstructured-oneshot/full", "unstructured-isp/full", "block-isp/full", "dense/fixed",
            "block-isp/fixed", "block-isp/fixed_random", "block-isp/random", "block-isp/rescore_epoch",
            "block-isp/aug_rescore", "block-isp/mix"]
    assert set(res["finetune"]) == set(arms) and all(len(v) == 2 for v in res["finetune"].values())
    assert set(res["step_time"]["ratio_to_dense"]) == set(arms)
    assert set(res["stats"]["policies_vs_random"]) == {a for a in arms if a.startswith("block-isp/")} - {
        "block-isp/full", "block-isp/random"}
    for png in ("cost.png", "sparsity.png", "finetune.png", "step_time.png", "tickets.png"):
        assert (run / png).stat().st_size > 1000
    import numpy as np
    with np.load(run / "predictions.npz") as f:  # per-image predictions of every model, and the labels
        n_val = res["dense"]["n_val"]
        assert {f"finetune/{a}/s{k}" for a in arms for k in range(2)} <= set(f.files) and "labels" in f.files
        assert all(f[k].shape == (n_val,) for k in f.files)
        acc = 100 * float((f["finetune/dense/full/s1"] == f["labels"]).mean())
        assert acc == pytest.approx(res["finetune"]["dense/full"][1]["accuracy"])
    md = (run / "report.md").read_text()
    for text in ("Cost of fine-tuning", "essential sparsity", "ISSP", "control", "instant", "block-isp/fixed",
                 "sink rule", "not significant", "deviate from Instant Soup"):
        assert text.lower() in md.lower(), text
    other = make_npz(tmp_path / "other.npz", n=24, seed=5)
    main(["evaluate", str(run), "--data", str(other), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {f"{a}#s{k}" for a in arms for k in range(2)}
    for name, v in out.items():
        assert set(v) == {"accuracy", "n", "layout", "sparsity", "keep", "step_ratio", "finetune_seconds"}
        assert v["n"] == 24 and 0 <= v["accuracy"] <= 1 and v["step_ratio"] > 0 and v["finetune_seconds"] > 0
    assert out["block-isp/fixed#s0"]["layout"] == "block" and out["block-isp/fixed#s0"]["keep"] == 0.5
    assert out["dense/full#s1"]["keep"] == 1.0 and out["dense/full#s1"]["sparsity"] == 0.0
    # other data goes through the run's data config: 32-px images are resized to the model's 16
    main(["evaluate", str(run), "--data", str(make_npz(tmp_path / "big.npz", n=8, size=32)), "--json"])
    big = json.loads(capsys.readouterr().out)
    assert set(big) == set(out) and all(v["n"] == 8 and 0 <= v["accuracy"] <= 1 for v in big.values())
    _fails(capsys, ["evaluate", str(run), "--data", str(make_npz(tmp_path / "c.npz", classes=6))],
           "labels out of range")


@pytest.mark.parametrize("args, match", [
    (["--layout", "diagonal"], "--layout: expected one of unstructured, block, 2:4"),
    (["--layout", "block", "--block-size", "64"], "--block-size: 64 does not divide blocks.0.attn.qkv.weight"),
    (["--block-size", "24"], "--block-size: expected one of 16, 32, 64"),
    (["--block-score", "l3"], "--block-score"),
    (["--sink", "mean"], "--sink: expected one of none, first, outlier, norm, auto"),
    (["--policies", "fixed,best"], "--policies: unknown best"),
    (["--arms", "dense/everything"], "--arms"),
    (["--arms", "2:4-isp/full"], "prunes in layout 2:4"),
    (["--seeds", "0"], "--seeds"),
    (["--isp-recipe", "soup"], "--isp-recipe"),
    (["--compare-sparsities", "1.2"], "--compare-sparsities"),
])
def test_bad_options_exit_2_and_write_nothing(tmp_path, capsys, args, match):
    data = make_npz(tmp_path / "d.npz")
    out = tmp_path / "run"
    _fails(capsys, ["run", "--data", str(data), "--out", str(out), *TINY, *args], match)
    assert not out.exists()


def test_24_layout_run(tmp_path, capsys):
    """2:4 through every stage: sweep at 0.5 only, ISP / ISSP / control keep the 2-of-4 pattern."""
    data = make_npz(tmp_path / "d.npz")
    out = tmp_path / "run"
    main(["run", "--data", str(data), "--out", str(out), *TINY, "--layout", "2:4", "--seeds", "1",
          "--arms", "dense/full,2:4-isp/fixed,2:4-isp/random", "--no-instant-soup", "--timing-rounds", "0"])
    res = json.loads((out / "results.json").read_text())
    assert [p["sparsity"] for p in res["sweep"]["layouts"]["2:4"]["sweep_val"]] == [0.0, 0.5]
    for name in ("oneshot", "isp", "issp", "control"):
        masks = torch.load(out / "masks" / "2:4@0.5" / f"{name}.pt", weights_only=True)
        assert all((m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all() for m in masks.values()), name
    main(["evaluate", str(out), "--data", str(data), "--json"])
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["2:4-isp/fixed#s0"]["layout"] == "2:4" and ev["2:4-isp/fixed#s0"]["sparsity"] == pytest.approx(0.5)
    assert ev["dense/full#s0"]["step_ratio"] is None  # no timing stage in this run

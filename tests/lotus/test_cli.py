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
    for opt in ("--resume", "--isp-vote", "--isp-subset", "--tolerance", "--keep-ratio", "--bf16", "--threads"):
        assert opt in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "evaluate" in capsys.readouterr().out


def test_tiny_run_report_and_evaluate(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    res = json.loads((run / "results.json").read_text())
    assert {"dense", "tickets", "oneshot", "isp", "issp", "finetune"} <= res.keys()
    assert set(res["finetune"]) == {"full", "ticket_0.5", "random_0.5"}
    for png in ("sparsity.png", "isp_vs_oneshot.png", "finetune.png", "step_time.png", "tickets.png"):
        assert (run / png).stat().st_size > 1000
    md = (run / "report.md").read_text()
    assert "Essential sparsity" in md and "ISSP" in md and "ticket_0.5" in md
    other = make_npz(tmp_path / "other.npz", n=24, seed=5)
    main(["evaluate", str(run), "--data", str(other), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"dense", "oneshot_30", "essential", "isp", "issp", "ticket_finetuned"}
    assert all(v["n"] == 24 and 0 <= v["accuracy"] <= 100 for v in out.values())
    # other data goes through the run's data config: 32-px images are resized to the model's 16
    main(["evaluate", str(run), "--data", str(make_npz(tmp_path / "big.npz", n=8, size=32)), "--json"])
    assert all(v["n"] == 8 for v in json.loads(capsys.readouterr().out).values())
    _fails(capsys, ["evaluate", str(run), "--data", str(make_npz(tmp_path / "c.npz", classes=6))],
           "labels out of range")

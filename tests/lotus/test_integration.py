"""`lotus run` end to end on a few hundred real CIFAR-10 images (skipped without the shared data)."""
import json
import os
from pathlib import Path

import pytest
import torch

from lotus.prune import sparsity_of

from ._tiny import REPO, run_lotus

DATA = Path(os.environ.get("LOTUS_SHARED_DATA", REPO.parent / "shared" / "data")) / "cifar10_train_subset.npz"


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_file(), reason=f"{DATA} not present")
def test_lotus_run_on_real_cifar10(tmp_path):
    out = tmp_path / "run"
    r = run_lotus("run", "--data", DATA, "--out", out, "--limit", "800", "--val-fraction", "0.25",
                  "--embed-dim", "64", "--depth", "2", "--heads", "2", "--pretrain-epochs", "10", "--finetune-epochs",
                  "1", "--isp-copies", "2", "--isp-rounds", "1", "--sweep", "0,0.3,0.5,0.7", "--keep-ratio", "0.7",
                  "--batch-size", "64", "--overlay-images", "4", "--seeds", "2", "--policies", "fixed,random",
                  "--compare-sparsities", "0.7", timeout=900)
    assert "report.md" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["dense"]["n_val"] == 200 and res["dense"]["n_train"] + res["dense"]["n_select"] == 600
    assert res["dense"]["val_acc"] > 20.0  # chance is 10%
    md = (out / "report.md").read_text()
    for text in ("Cost of fine-tuning", "essential sparsity", "block-isp/fixed", "block-isp/random", "dense/full",
                 "control", "instant"):
        assert text in md
    ess = {k: v["essential_sparsity"] for k, v in res["sweep"]["layouts"].items()}
    for tag, r in res["prune"].items():
        layout, s = tag.split("@")
        for name, m in r["methods"].items():
            masks = torch.load(out / "masks" / tag / f"{name}.pt", weights_only=True)
            assert sparsity_of(masks) == pytest.approx(m["sparsity"], abs=1e-6)
            if name in ("isp", "issp", "control"):  # votes / calibrated unions land on the target
                assert m["sparsity"] == pytest.approx(float(s), abs=0.03)
    assert set(ess) == {"unstructured", "block"}
    for png in ("cost.png", "sparsity.png", "finetune.png", "step_time.png", "tickets.png"):
        assert (out / png).is_file()

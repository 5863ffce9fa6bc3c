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
    r = run_lotus(
        "run",
        "--data",
        DATA,
        "--out",
        out,
        "--limit",
        "800",
        "--val-fraction",
        "0.25",
        "--embed-dim",
        "64",
        "--depth",
        "2",
        "--heads",
        "2",
        "--pretrain-epochs",
        "10",
        "--finetune-epochs",
        "1",
        "--isp-copies",
        "2",
        "--isp-rounds",
        "1",
        "--sweep",
        "0,0.3,0.5,0.7",
        "--keep-ratio",
        "0.5",
        "--batch-size",
        "64",
        "--overlay-images",
        "4",
        "--seeds",
        "2",
        "--main-seeds",
        "2",
        "--prune-seeds",
        "2",
        "--policies",
        "fixed,random",
        "--compare-sparsities",
        "0.7",
        timeout=900,
    )
    assert "report.md" in r.stdout
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    assert cfg["source_classes"] == [0, 1, 2, 3, 4] and cfg["target_classes"] == [5, 6, 7, 8, 9]
    assert cfg["canvas"] == 64 and cfg["patch_size"] == 8  # 32-px objects on a 64-px canvas, an 8 x 8 grid
    assert 90 <= res["probe"]["n_val"] <= 110 and 270 <= res["probe"]["n_train"] + res["probe"]["n_select"] <= 330
    assert res["pretrain"]["source_val_acc"] > 25.0 and res["probe"]["val_acc"] > 25.0  # chance is 20%
    md = (out / "report.md").read_text()
    for text in (
        "The whole job",
        "essential sparsity",
        "block-isp/fixed",
        "block-isp/random",
        "dense/full",
        "control",
        "instant",
        "recall",
    ):
        assert text in md
    ess = {k: v["essential_sparsity"] for k, v in res["sweep"]["layouts"].items()}
    for tag, reps in res["prune"].items():
        layout, s = tag.split("@")
        for r in reps:
            for name, m in r["methods"].items():
                masks = torch.load(out / "masks" / tag / f"r{r['replicate']}" / f"{name}.pt", weights_only=True)
                assert sparsity_of(masks) == pytest.approx(m["sparsity"], abs=1e-6)
                if name in ("isp", "issp", "control"):  # votes / calibrated unions land on the target
                    assert m["sparsity"] == pytest.approx(float(s), abs=0.03)
    assert set(ess) == {"unstructured", "block"}
    for png in ("cost.png", "sparsity.png", "step_time.png", "tickets.png"):
        assert (out / png).is_file()

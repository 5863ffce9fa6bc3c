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
                  "--embed-dim", "64", "--depth", "2", "--heads", "2", "--pretrain-epochs", "6", "--finetune-epochs",
                  "1", "--isp-copies", "2", "--isp-rounds", "1", "--sweep", "0,0.3,0.5,0.7", "--compare-keeps", "0.7",
                  "--keep-ratio", "0.7", "--batch-size", "64", "--overlay-images", "4", timeout=900)
    assert "report.md" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["dense"]["n_val"] == 200 and res["dense"]["n_train"] == 600
    assert res["dense"]["val_acc"] > 20.0  # chance is 10%
    md = (out / "report.md").read_text()
    for text in ("Essential sparsity", "ISP (majority)", "ISSP (union)", "ticket_0.7", "random_0.7", "full"):
        assert text in md
    load = lambda name: torch.load(out / "masks" / name, weights_only=True)  # noqa: E731
    assert sparsity_of(load("oneshot_30.pt")) == pytest.approx(0.3, abs=1e-4)
    assert sparsity_of(load("essential.pt")) == pytest.approx(res["oneshot"]["essential_sparsity"], abs=1e-4)
    for which in ("isp", "issp"):
        assert sparsity_of(load(f"{which}.pt")) == pytest.approx(res[which]["actual_sparsity"], abs=1e-6)
        assert res[which]["actual_sparsity"] > 0
    assert all((out / p).is_file() for p in ("sparsity.png", "finetune.png", "step_time.png", "tickets.png"))

"""`torchrun --nproc_per_node=2 -m lotus finetune` (gloo, CPU) matches one process."""
import shutil
import subprocess
import sys

import torch

from lotus.cli import main

from ._tiny import REPO, TINY, env, make_npz


def test_ddp_finetune_matches_single_process(tmp_path):
    data = make_npz(tmp_path / "d.npz", n=70)  # 56 train images: the last batch of 16 is 8, split 4 / 4
    a = tmp_path / "single"
    # SGD, not AdamW: Adam divides by sqrt(v), so a near-zero gradient's last-bit difference between
    # one process and two ranks' all-reduce becomes a full lr-sized step; SGD keeps it last-bit.
    # 56 = 4 x 12 + 8 training images (no selection split): an uneven last batch
    main(["pretrain", "--data", str(data), "--out", str(a), *TINY, "--seeds", "1",
          "--pretrain-epochs", "1", "--batch-size", "12", "--optimizer", "sgd", "--select-fraction", "0"])
    b = tmp_path / "ddp"
    shutil.copytree(a, b)
    main(["finetune", str(a), "--only", "dense/full"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lotus", "finetune", str(b), "--only", "dense/full"]
    r = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    sa = torch.load(a / "models" / "finetune" / "dense" / "full" / "s0.pt", weights_only=True)
    sb = torch.load(b / "models" / "finetune" / "dense" / "full" / "s0.pt", weights_only=True)
    dense = torch.load(a / "models" / "dense.pt", weights_only=True)
    assert sa.keys() == sb.keys()
    moved = 0.0
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5)
        moved = max(moved, float((sa[k].float() - dense[k].float()).abs().max()))
    assert moved > 1e-3  # fine-tuning changed the weights, so the comparison means something
    import json
    ha = json.loads((a / "stages" / "finetune__dense__full__s0.json").read_text())
    hb = json.loads((b / "stages" / "finetune__dense__full__s0.json").read_text())
    assert [round(x, 4) for x in ha["train_loss"]] == [round(x, 4) for x in hb["train_loss"]]
    assert ha["val_acc"] == hb["val_acc"]

"""`torchrun --nproc_per_node=2 -m lotus finetune` (gloo, CPU) matches one process: two ranks really
run, each on its share of every global batch (uneven shards too), on full images and on tickets of
a pruned (MaskedLinear) model."""

import json
import shutil
import subprocess
import sys

import torch

from lotus.cli import main
from lotus.prune import sparsity_of

from ._tiny import REPO, TINY, env, make_npz


def test_ddp_finetune_matches_single_process(tmp_path):
    # 71 images: 57 train = 4 x 12 + 9, so the last global batch splits 5 / 4 and the shards are uneven
    data = make_npz(tmp_path / "d.npz", n=71)
    a = tmp_path / "single"
    # SGD, not AdamW: Adam divides by sqrt(v), so a near-zero gradient's last-bit difference between
    # one process and two ranks' all-reduce becomes a full lr-sized step; SGD keeps it last-bit.
    # --tolerance 100: the essential sparsity is the sweep's largest (0.6), a really sparse start;
    # --select-fraction 0: all 57 images train. Arms: dense full images, and tickets of the block
    # one-shot model on BlockSparseLinear (keep_fn indexed by image id across the ranks' shares).
    arms = ["dense/full", "block-oneshot/fixed"]
    main(
        [
            "pretrain",
            "--data",
            str(data),
            "--out",
            str(a),
            *TINY,
            "--seeds",
            "1",
            "--main-seeds",
            "1",
            "--prune-seeds",
            "1",
            "--no-matched",
            "--headline",
            "dense/full",
            "--val-fraction",
            "0.2",
            "--source-classes",
            "0-3",
            "--target-classes",
            "0-3",
            "--tolerance",
            "100",
            "--pretrain-epochs",
            "1",
            "--batch-size",
            "12",
            "--optimizer",
            "sgd",
            "--select-fraction",
            "0",
            "--layout",
            "block",
            "--arms",
            ",".join(arms),
            "--no-instant-soup",
            "--isp-rounds",
            "1",
        ]
    )
    main(["score", str(a)])
    main(["prune", str(a)])
    b = tmp_path / "ddp"
    shutil.copytree(a, b)
    main(["finetune", str(a), "--only", *arms])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "lotus",
        "finetune",
        str(b),
        "--only",
        *arms,
    ]
    r = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    dense = torch.load(a / "models" / "start.pt", weights_only=True)
    for arm in arms:
        stage = f"finetune__{arm.replace('/', '__')}__s0.json"
        ha = json.loads((a / "stages" / stage).read_text())
        hb = json.loads((b / "stages" / stage).read_text())
        assert ha["world_size"] == 1 and ha["images_per_rank"] == [57 * 2]
        assert hb["world_size"] == 2 and hb["images_per_rank"] == [29 * 2, 28 * 2]  # both ranks, their shards
        assert [round(x, 4) for x in ha["train_loss"]] == [round(x, 4) for x in hb["train_loss"]]
        assert ha["val_acc"] == hb["val_acc"]
        sa = torch.load(a / "models" / "finetune" / arm / "s0.pt", weights_only=True)
        sb = torch.load(b / "models" / "finetune" / arm / "s0.pt", weights_only=True)
        assert sa.keys() == sb.keys()
        masks = {k: v for k, v in sa.items() if k.endswith(".mask")}
        if arm != "dense/full":
            assert masks and sparsity_of(masks) > 0.55  # a pruned model was fine-tuned
            assert ha["keep"] == 0.5 and ha["layout"] == "block"
        moved = 0.0
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5)
            if k in dense:
                moved = max(moved, float((sa[k].float() - dense[k].float()).abs().max()))
        assert moved > 1e-3  # fine-tuning changed the weights, so the comparison means something
        for k, m in masks.items():
            assert (sb[k[: -len(".mask")] + ".weight"][~m] == 0).all()  # pruned weights stayed pruned

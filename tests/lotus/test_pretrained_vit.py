"""The real users' setting without a hub: a timm ViT at 224 px from a local checkpoint, on an
ImageFolder, end to end; the checkpoint's normalisation reaches the model; memory stays flat."""

import json
import subprocess
import sys

import pytest
import timm
import torch

from lotus import data as data_mod
from lotus import model as model_mod
from lotus.cli import main
from lotus.task import target_sets
from lotus.train import evaluate

from ._tiny import REPO, env, make_image_folder

ARMS = ["dense/full", "block-isp/full", "block-isp/fixed", "block-isp/random"]
CUSTOM = {"mean": [0.2, 0.3, 0.4], "std": [0.6, 0.5, 0.4], "interpolation": "bilinear", "crop_pct": 0.8}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A randomly initialised vit_tiny_patch16_224 (1000-class head) saved twice: as a bare state_dict
    (timm's own data config applies) and with a different data config."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    sd = timm.create_model("vit_tiny_patch16_224", num_classes=1000).state_dict()
    torch.save(sd, root / "plain.pt")
    torch.save({"state_dict": sd, "pretrained_cfg": CUSTOM}, root / "custom.pt")
    return root


def _cfg(data, ckpt, **kw):
    return dict(
        dict(
            data=str(data),
            data_root="data",
            num_classes=None,
            limit=None,
            val_fraction=0.25,
            seed=0,
            workers=0,
            img_size=None,
            crop_pct=None,
            model="vit_tiny_patch16_224",
            pretrained=False,
            checkpoint=str(ckpt),
        ),
        **kw,
    )


@pytest.mark.parametrize(
    "which, mean, std, interp, crop",
    [
        ("plain", [0.5] * 3, [0.5] * 3, "bicubic", 0.9),  # timm's config of vit_tiny_patch16_224
        ("custom", CUSTOM["mean"], CUSTOM["std"], "bilinear", 0.8),
    ],
)
def test_checkpoint_normalisation_reaches_the_model(tmp_path, checkpoints, which, mean, std, interp, crop):
    folder = make_image_folder(tmp_path / "imgs", per_class=(2, 2), size=(50, 40))
    cfg = _cfg(folder, checkpoints / f"{which}.pt")
    train_src = data_mod.open_sources(cfg)[0]
    model = model_mod.build(cfg, train_src.num_classes, None)
    cfg["data_config"] = model_mod.data_config(model, cfg)
    _, va = data_mod.load_split(cfg)
    seen = []
    model.patch_embed.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    evaluate(model, va, batch_size=4)
    x = torch.cat(seen)
    assert x.shape == (1, 3, 224, 224)  # 224 px: 14 x 14 = 196 patches
    conf = {
        "input_size": (3, 224, 224),
        "interpolation": interp,
        "mean": mean,
        "std": std,
        "crop_pct": crop,
        "crop_mode": "center",
    }
    folder_ds = train_src.folder
    ref = timm.data.create_transform(**conf, is_training=False)(
        folder_ds.loader(folder_ds.samples[int(va.index[0])][0])
    )
    torch.testing.assert_close(x[0], ref, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_vit_tiny_checkpoint_end_to_end_at_224(tmp_path, checkpoints):
    folder = make_image_folder(tmp_path / "imgs", per_class=(8, 8, 8, 8), size=(48, 40))
    out = tmp_path / "run"
    main(
        [
            "run",
            "--data",
            str(folder),
            "--model",
            "vit_tiny_patch16_224",
            "--checkpoint",
            str(checkpoints / "custom.pt"),
            "--out",
            str(out),
            "--limit",
            "20",
            "--val-fraction",
            "0.25",
            "--finetune-epochs",
            "1",
            "--batch-size",
            "8",
            "--eval-batch-size",
            "16",
            "--isp-copies",
            "1",
            "--isp-rounds",
            "1",
            "--sweep",
            "0,0.5",
            "--keep-ratio",
            "0.9",
            "--overlay-images",
            "2",
            "--timing-rounds",
            "1",
            "--threads",
            "1",
            "--workers",
            "1",
            "--seeds",
            "1",
            "--main-seeds",
            "1",
            "--prune-seeds",
            "1",
            "--no-matched",
            "--headline",
            "block-isp/fixed",
            "--block-score",
            "l2",
            "--compare-sparsities",
            "",
            "--no-instant-soup",
            "--arms",
            ",".join(ARMS),
        ]
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data_config"]["input_size"] == [3, 224, 224] and cfg["img_size"] == 224
    assert cfg["data_config"]["mean"] == CUSTOM["mean"] and cfg["data_config"]["std"] == CUSTOM["std"]
    # the fine-tuning recipe, not 30 epochs of from-scratch training; the checkpoint is the source task, the
    # target every class, no canvas
    assert cfg["recipe"] == "pretrained" and cfg["optimizer"] == "sgd" and cfg["pretrain_epochs"] == 0
    assert cfg["finetune_lr"] == pytest.approx(0.03 * 8 / 512) and cfg["clip_grad"] == 1.0 and cfg["weight_decay"] == 0
    assert cfg["source_classes"] == [] and cfg["target_classes"] == [0, 1, 2, 3] and cfg["canvas"] == 0
    score = json.loads((out / "stages" / "score.json").read_text())
    assert score["num_patches"] == 196 and score["kept"] == 177
    # 15 training images (--limit 20, --val-fraction 0.25), 2 of them the selection split
    for name in ("start", "block-isp/r0"):  # tickets scored by each start model that fine-tunes on them
        tickets = torch.load(out / "tickets" / f"{name}.pt", weights_only=True)
        assert tickets["scores"].shape == (13, 196)
    tr, sel, va = target_sets(cfg)
    assert (len(tr), len(sel), len(va)) == (13, 2, 5)
    tr, va = data_mod.load_split(cfg)  # --limit 20 of a class-sorted folder: 5 images of each class
    assert torch.bincount(torch.cat([tr.y, va.y]), minlength=4).tolist() == [5, 5, 5, 5]
    dense = torch.load(out / "models" / "start.pt", weights_only=True)
    assert dense["head.weight"].shape == (4, 192)  # the 1000-class head was replaced (by a linear probe)
    res = json.loads((out / "results.json").read_text())
    assert set(res["finetune"]) == set(ARMS)
    arm = res["finetune"]["block-isp/fixed"][0]  # tickets + block-sparse layers at 224 px
    assert arm["layout"] == "block" and arm["keep"] == 0.9 and arm["sparsity"] > 0


_PEAK = """
import resource, sys
from lotus.cli import main
main(sys.argv[1:])
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """A whole run at 224 px on 48 and on 480 images: images are decoded batch by batch, so the peak
    stays put (decoding the set up front, as before, grew it by ~175 MB here)."""
    peaks = {}
    for n in (12, 120):
        folder = make_image_folder(tmp_path / f"imgs{n}", per_class=(n,) * 4, size=(64, 64))
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                _PEAK,
                "run",
                "--data",
                str(folder),
                "--out",
                str(tmp_path / f"r{n}"),
                "--img-size",
                "224",
                "--patch-size",
                "16",
                "--embed-dim",
                "16",
                "--depth",
                "1",
                "--heads",
                "1",
                "--pretrain-epochs",
                "1",
                "--finetune-epochs",
                "1",
                "--batch-size",
                "8",
                "--eval-batch-size",
                "8",
                "--isp-copies",
                "1",
                "--isp-rounds",
                "1",
                "--sweep",
                "0,0.5",
                "--keep-ratio",
                "0.9",
                "--overlay-images",
                "0",
                "--timing-rounds",
                "1",
                "--workers",
                "0",
                "--seeds",
                "1",
                "--main-seeds",
                "1",
                "--prune-seeds",
                "1",
                "--no-matched",
                "--block-score",
                "l2",
                "--compare-sparsities",
                "",
                "--no-instant-soup",
                "--headline",
                "block-isp/fixed",
                "--arms",
                "dense/full,block-isp/fixed",
            ],
            env=env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        peaks[n] = int(r.stdout.split("MAXRSS_KB")[1].split()[0]) / 1024
    assert peaks[120] - peaks[12] < 25, peaks  # MB, for 10x the images

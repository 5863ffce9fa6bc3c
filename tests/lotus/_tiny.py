"""Tiny synthetic data and settings shared by the lotus tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]

# A 2-block ViT (16x16 blocks divide its 32-wide layers) pretrained on classes 0-1 and fine-tuned on
# classes 2-3 of 16x16 images placed on a 32x32 canvas (the defaults), two epochs per stage, three sweep
# points, one keep ratio, two seeds and two prune replicates, every default arm and the ticket policies
# with their own code paths (re-scoring per epoch, per augmented batch),
# the compute-matched arms at a fixed step count (reproducible), Instant Soup in 30% steps.
TINY = [
    "--embed-dim",
    "32",
    "--depth",
    "2",
    "--heads",
    "2",
    "--mlp-ratio",
    "2",
    "--pretrain-epochs",
    "2",
    "--finetune-epochs",
    "2",
    "--batch-size",
    "16",
    "--eval-batch-size",
    "32",
    "--isp-copies",
    "2",
    "--isp-rounds",
    "2",
    "--threads",
    "1",
    "--jobs",
    "1",
    "--sweep",
    "0,0.3,0.6",
    "--keep-ratio",
    "0.5",
    "--overlay-images",
    "2",
    "--lr",
    "3e-3",
    "--timing-rounds",
    "1",
    "--seeds",
    "2",
    "--main-seeds",
    "2",
    "--prune-seeds",
    "2",
    "--matched-steps",
    "2",
    "--instant-copies",
    "2",
    "--instant-step",
    "0.3",
    "--compare-sparsities",
    "0.6",
    "--select-fraction",
    "0.15",
    "--policies",
    "fixed,random,rescore_epoch,aug_rescore",
]


def make_npz(path, n: int = 64, size: int = 16, classes: int = 4, seed: int = 0, **override) -> Path:
    """Random images whose red channel encodes the label, so a tiny model can learn them."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n).astype(np.int64)
    x = rng.integers(0, 256, (n, 3, size, size)).astype(np.uint8)
    x[:, 0] = (y[:, None, None] * (255 // max(classes - 1, 1))).astype(np.uint8)
    arrays = {"x": x, "y": y}
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return Path(path)


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


def lotus_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "lotus", *map(str, args)]


def run_lotus(*args, check=True, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        lotus_cmd(*args), env=env(), cwd=REPO, capture_output=True, text=True, check=check, timeout=timeout
    )


def make_image_folder(root, per_class=(3, 3), size=(40, 30), seed=0) -> Path:
    """An ImageFolder (class_0/, class_1/, ...) of PNGs of ``size`` (W, H) whose colour encodes the class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    for c, n in enumerate(per_class):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = rng.integers(0, 256, (size[1], size[0], 3)).astype(np.uint8)
            a[..., 0] = 255 * c // max(len(per_class) - 1, 1)
            Image.fromarray(a).save(d / f"img_{i:03d}.png")
    return root


def make_fake_cifar10(root, n_train=60, n_test=20, seed=0) -> Path:
    """A ``cifar-10-batches-py`` folder in torchvision's format (5 training batches + test batch) with
    random images; returns the md5 sums torchvision checks, to patch in (the real ones are fixed)."""
    import hashlib
    import pickle

    rng = np.random.default_rng(seed)
    d = Path(root) / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    sums = {}

    def write(name, n):
        labels = [int(v) for v in rng.integers(0, 10, n)]
        data = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        with open(d / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        sums[name] = hashlib.md5((d / name).read_bytes()).hexdigest()

    for i in range(1, 6):
        write(f"data_batch_{i}", n_train // 5)
    write("test_batch", n_test)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    sums["batches.meta"] = hashlib.md5((d / "batches.meta").read_bytes()).hexdigest()
    return sums


def patch_cifar_md5(monkeypatch, sums) -> None:
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", sums[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", sums["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", dict(CIFAR10.meta, md5=sums["batches.meta"]))


def _same(a, b) -> bool:
    """Equal, recursively through dicts and lists of tensors (optimizer states)."""
    import torch

    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return a == b


def assert_same_run(ref, out, context: str = "", ignore_config=()) -> None:
    """Two finished runs hold the same results (timings aside) and the same masks, models,
    predictions and tickets, bit for bit; ``ignore_config``: config keys allowed to differ."""
    import json

    import torch

    from lotus.results import strip_timing

    def results(root):
        r = strip_timing(json.loads((Path(root) / "results.json").read_text()))
        for k in ignore_config:
            r["config"].pop(k, None)
        return r

    assert results(ref) == results(out), context
    for sub in ("masks", "models", "preds", "tickets"):  # tickets: scores, flagged patches
        names = sorted(str(p.relative_to(ref)) for p in (ref / sub).rglob("*.pt"))
        assert names and names == sorted(str(p.relative_to(out)) for p in (out / sub).rglob("*.pt")), context
        for name in names:
            x = torch.load(ref / name, weights_only=True)
            y = torch.load(out / name, weights_only=True)
            assert x.keys() == y.keys()
            assert _same(
                {k: v for k, v in x.items() if k != "seconds"}, {k: v for k, v in y.items() if k != "seconds"}
            ), f"{name} differs; {context}"

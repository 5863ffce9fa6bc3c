"""Tiny synthetic data and settings shared by the lotus tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]

# A 2-block ViT on 16x16 images (16x16 blocks divide its 32-wide layers), two epochs per stage, three
# sweep points, one keep ratio, two fine-tuning seeds, every default arm.
TINY = ["--embed-dim", "32", "--depth", "2", "--heads", "2", "--mlp-ratio", "2", "--pretrain-epochs", "2",
        "--finetune-epochs", "2", "--batch-size", "16", "--eval-batch-size", "32", "--isp-copies", "2",
        "--isp-rounds", "2", "--threads", "1", "--sweep", "0,0.3,0.6", "--keep-ratio", "0.5",
        "--overlay-images", "2", "--lr", "3e-3", "--timing-rounds", "1", "--seeds", "2", "--instant-copies", "2",
        "--select-fraction", "0.15"]


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
    return subprocess.run(lotus_cmd(*args), env=env(), cwd=REPO, capture_output=True, text=True, check=check,
                          timeout=timeout)

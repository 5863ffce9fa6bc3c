"""Stage 1, data: images as one uint8 tensor [N, 3, H, W] + int64 labels, and a seeded split.

Sources (``--data``):
  FILE.npz      keys ``x`` uint8 [N, 3, H, W] and ``y`` int64 [N] (labels in [0, num_classes))
  cifar10       torchvision CIFAR-10 training set under ``--data-root`` (downloaded where the
                network allows)
  DIRECTORY     an ImageFolder (one sub-directory per class), resized to ``--img-size``

Everything is held in memory as uint8: the datasets this pipeline targets are small, and a
tensor indexed by a permutation is the simplest deterministic loader (no workers to seed).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import LotusError

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


@dataclass
class Images:
    x: torch.Tensor  # uint8 [N, 3, H, W]
    y: torch.Tensor  # int64 [N]
    num_classes: int

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, idx: torch.Tensor) -> "Images":
        return Images(self.x[idx], self.y[idx], self.num_classes)

    @property
    def img_size(self) -> int:
        return int(self.x.shape[-1])


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32, per-channel standardised (CIFAR statistics)."""
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def check_arrays(x, y, source: str, num_classes: int | None = None) -> Images:
    """Validate x / y (numpy or torch) and return them as tensors; every problem is a LotusError."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.dtype != np.uint8:
        raise LotusError(f"{source}: x must be uint8 images, got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise LotusError(f"{source}: x must have shape [N, 3, H, W], got {list(x.shape)}")
    if x.shape[0] == 0:
        raise LotusError(f"{source}: x holds no images (N = 0)")
    if x.shape[2] != x.shape[3]:
        raise LotusError(f"{source}: images must be square, got H x W = {x.shape[2]} x {x.shape[3]}")
    if y.dtype != np.int64:
        raise LotusError(f"{source}: y must be int64 labels, got dtype {y.dtype}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise LotusError(f"{source}: y must have shape [N] = [{x.shape[0]}], got {list(y.shape)}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise LotusError(f"{source}: labels out of range: found {lo}, labels must be >= 0")
    classes = hi + 1 if num_classes is None else num_classes
    if hi >= classes:
        raise LotusError(f"{source}: labels out of range: found {hi}, expected labels in [0, {classes})")
    if classes < 2:
        raise LotusError(f"{source}: need at least 2 classes, labels only take the value {lo}")
    return Images(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)), classes)


def load_npz(path, num_classes: int | None = None) -> Images:
    path = Path(path)
    if not path.is_file():
        raise LotusError(f"--data: file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            missing = {"x", "y"} - keys
            if missing:
                raise LotusError(f"--data: {path} lacks key(s) {', '.join(sorted(missing))}; expected "
                                 f"x (uint8 [N, 3, H, W]) and y (int64 [N]), found {sorted(keys)}")
            x, y = f["x"], f["y"]
    except LotusError:
        raise
    except Exception as e:  # not a zip / truncated / pickled objects
        raise LotusError(f"--data: cannot read {path} as .npz: {type(e).__name__}: {e}".splitlines()[0])
    return check_arrays(x, y, f"--data {path}", num_classes)


def load_cifar10(root, download: bool = True) -> Images:
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(root=str(root), train=True, download=download)
    except Exception as e:  # offline: torchvision raises URLError / RuntimeError
        raise LotusError(f"--data cifar10: cannot load CIFAR-10 under {root} ({type(e).__name__}: {e}); "
                         "without network access pass --data FILE.npz".splitlines()[0])
    x = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))  # NHWC -> NCHW
    return check_arrays(x, np.asarray(ds.targets, dtype=np.int64), "cifar10", 10)


def load_image_folder(root, img_size: int) -> Images:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import functional as TF

    try:
        ds = ImageFolder(str(root))
    except Exception as e:
        raise LotusError(f"--data: {root} is not a usable ImageFolder ({type(e).__name__}: {e})".splitlines()[0])
    xs, ys = [], []
    for path, label in ds.samples:
        img = ds.loader(path).convert("RGB")
        img = TF.center_crop(TF.resize(img, img_size), img_size)
        xs.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
        ys.append(label)
    return check_arrays(np.stack(xs), np.asarray(ys, dtype=np.int64), f"--data {root}", len(ds.classes))


def load(source: str, *, data_root: str = "data", img_size: int = 32, num_classes: int | None = None) -> Images:
    """Images from an .npz file, ``cifar10`` or an ImageFolder directory."""
    if source == "cifar10":
        return load_cifar10(data_root)
    if os.path.isdir(source):
        return load_image_folder(source, img_size)
    return load_npz(source, num_classes)


def split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train, val) index tensors: a seeded permutation, the first part for validation."""
    if not 0 < val_fraction < 1:
        raise LotusError(f"--val-fraction: expected a fraction in (0, 1), got {val_fraction}")
    n_val = max(1, round(val_fraction * n))
    if n - n_val < 1:
        raise LotusError(f"--data: {n} images are too few to split off a validation set")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def load_split(cfg: dict) -> tuple[Images, Images]:
    """(train, val) for a run's config."""
    images = load(cfg["data"], data_root=cfg["data_root"], img_size=cfg["img_size"], num_classes=cfg["num_classes"])
    if cfg.get("limit"):
        images = images.subset(torch.arange(min(cfg["limit"], len(images))))
    tr, va = split(len(images), cfg["val_fraction"], cfg["seed"])
    return images.subset(tr), images.subset(va)

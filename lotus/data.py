"""Stage 1, data: image sets streamed through timm's data config by a DataLoader.

Sources (``--data``):
  FILE.npz      keys ``x`` uint8 [N, 3, H, W] and ``y`` int64 [N] (labels in [0, num_classes));
                held in memory (the small-data path: the default run's 4,068 CIFAR images)
  cifar10       torchvision's CIFAR-10 under ``--data-root`` (downloaded where the network allows):
                the official training split, and its official test split as the held-out set
  DIRECTORY     a torchvision ImageFolder (one sub-directory per class), decoded image by image

Every image goes through the model's data config (``timm.data.resolve_model_data_config``: input
size, interpolation, crop, mean / std), as timm's own eval transform (``timm.data.create_transform``
with ``normalize=False``: resize + centre crop to uint8), then is normalised on the training device.
The transform is deterministic, so a ticket's patch indices always refer to the image the model
sees; training augmentation happens later, on whole batches (``train.augment_batch``), and never in
a ticket arm.

Where the transform runs: files are decoded and resized one by one (DataLoader workers); in-memory
sources (npz, CIFAR-10, which torchvision holds as one uint8 array) are sliced per batch and resized
as one tensor on the training device. Nothing is decoded ahead, so memory does not grow with the
number of images (beyond the labels, and the raw arrays of the in-memory sources).

A set yields ``(image uint8 [3, S, S], label, image id)``; the id is the position in the set, which
is what tickets are indexed by. ``loader`` batches a set for one rank: a ``DistributedSampler``
orders the images and each rank takes its share of every global batch, so ranks together see
exactly the batches of a single process.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .errors import LotusError

# CIFAR-10's per-channel statistics: the data config of the small default model.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def default_config(img_size: int) -> dict:
    """The data config of ``lotus_vit`` (and of an ``Images`` set made from tensors): native size,
    no crop, CIFAR statistics, in the shape of timm's ``pretrained_cfg``."""
    return {
        "input_size": (3, int(img_size), int(img_size)),
        "interpolation": "bilinear",
        "mean": MEAN,
        "std": STD,
        "crop_pct": 1.0,
        "crop_mode": "center",
    }


def normalize(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32, per-channel standardised (default: CIFAR statistics)."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def geometry(config: dict):
    """timm's eval transform for ``config`` without normalisation: resize + centre crop, to uint8.
    The same Compose takes a PIL image or a uint8 tensor [..., 3, H, W] (a whole batch)."""
    from timm.data import create_transform

    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in CONFIG_KEYS}
    return create_transform(**cfg, is_training=False, normalize=False)


# ---------------------------------------------------------------- sources (raw images + labels)
class TensorSource:
    """Images held in memory as uint8 [N, 3, H, W] (possibly a strided view, e.g. CIFAR's NHWC);
    ``boxes`` [N, 4] (top, left, height, width in these pixels): where each image's object is, for
    images composed on a canvas (``lotus.canvas``)."""

    in_memory = True

    def __init__(
        self, x: torch.Tensor, labels: torch.Tensor, num_classes: int, name: str, boxes: torch.Tensor | None = None
    ):
        self.x, self.labels, self.num_classes, self.name, self.boxes = x, labels, num_classes, name, boxes

    @property
    def native_size(self) -> int:
        return int(self.x.shape[-1])

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        return self.x[idx].contiguous()


class FolderSource:
    """A torchvision ImageFolder: paths + labels in memory, each image decoded when it is used."""

    in_memory = False
    native_size = None
    boxes = None

    def __init__(self, folder, labels: torch.Tensor, num_classes: int, name: str):
        self.folder, self.labels, self.num_classes, self.name = folder, labels, num_classes, name

    def image(self, i: int):
        path = self.folder.samples[i][0]
        try:
            return self.folder.loader(path)  # PIL, converted to RGB
        except Exception as e:
            raise LotusError(f"--data: cannot decode image {path} ({type(e).__name__}: {e})".splitlines()[0])


# ---------------------------------------------------------------- one set of images
class ImageSet(Dataset):
    """``index`` into a source, seen through ``config`` (a timm data config).

    ``workers`` is the DataLoader worker count used to stream this set (0: the main process)."""

    def __init__(self, source, index: torch.Tensor, config: dict, workers: int = 0):
        self.source, self.index, self.config, self.workers = source, index.long(), dict(config), workers
        self._geo = None

    # -------------------------------------------------------- what it holds
    def __len__(self) -> int:
        return int(self.index.numel())

    @property
    def y(self) -> torch.Tensor:
        return self.source.labels[self.index]

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def img_size(self) -> int:
        """Side of the images the model sees."""
        return int(self.config["input_size"][-1])

    @property
    def mean(self):
        return tuple(self.config["mean"])

    @property
    def std(self):
        return tuple(self.config["std"])

    @property
    def boxes(self) -> torch.Tensor | None:
        """float64 [N, 4] object boxes (top, left, height, width) in the pixels the model sees, or
        None where the images carry no box (only canvas images do)."""
        if self.source.boxes is None:
            return None
        from .canvas import boxes_in_model_pixels

        return boxes_in_model_pixels(self.source.boxes[self.index], self.source.native_size, self.config)

    def for_classes(self, classes) -> ImageSet:
        """The images of ``classes`` only, relabelled 0..len(classes)-1 in that order (a task)."""
        classes = [int(c) for c in classes]
        labels = self.source.labels
        lut = torch.full((max(int(labels.max()), *classes) + 1,), -1, dtype=torch.int64)
        lut[torch.tensor(classes)] = torch.arange(len(classes))
        src = copy.copy(self.source)
        src.labels, src.num_classes = lut[labels], len(classes)
        out = copy.copy(self)
        out.source, out.index = src, self.index[src.labels[self.index] >= 0]
        return out

    def subset(self, idx) -> ImageSet:
        """The images at positions ``idx`` (ids are renumbered 0..len(idx)-1)."""
        out = copy.copy(self)
        out.index = self.index[torch.as_tensor(idx, dtype=torch.long)]
        return out

    def with_config(self, config: dict, workers: int | None = None) -> ImageSet:
        out = copy.copy(self)
        out.config, out._geo = dict(config), None
        if workers is not None:
            out.workers = workers
        return out

    # -------------------------------------------------------- reading images
    @property
    def geometry(self):
        if self._geo is None:
            self._geo = geometry(self.config)
        return self._geo

    def __getitem__(self, i: int):
        x, y, ids = self.__getitems__([i])
        return x[0], y[0], ids[0]

    def __getitems__(self, positions):
        """(images uint8 [B, 3, h, w], labels [B], ids [B]) at ``positions``: model-size images for a
        file source, raw ones for an in-memory source (``prepare`` resizes those as one batch)."""
        ids = torch.as_tensor(positions, dtype=torch.long)
        src = self.index[ids]
        if self.source.in_memory:
            x = self.source.batch(src)
        elif len(src):
            x = torch.stack([self.geometry(self.source.image(int(i))) for i in src])
        else:
            x = torch.empty((0, 3, self.img_size, self.img_size), dtype=torch.uint8)
        return x, self.source.labels[src], ids

    def prepare(self, x: torch.Tensor, device) -> torch.Tensor:
        """A batch from ``__getitems__`` -> the model's float input on ``device``."""
        x = x.to(device, non_blocking=True)
        if self.source.in_memory and len(x):
            x = self.geometry(x)
        return normalize(x, self.mean, self.std)

    def view(self, i: int) -> torch.Tensor:
        """uint8 [3, S, S]: image ``i`` as the model sees it, before normalisation (overlays)."""
        x, _, _ = self.__getitems__([i])
        return self.geometry(x)[0] if self.source.in_memory else x[0]

    @property
    def x(self) -> torch.Tensor:
        """All raw images of an in-memory set (uint8 [N, 3, H, W]); file sets have none in memory."""
        if not self.source.in_memory:
            raise AttributeError("x: a file-backed ImageSet decodes images on the fly; use view(i) or a loader")
        return self.source.batch(self.index)


class Images(ImageSet):
    """A set made from tensors (uint8 x [N, 3, H, W], int64 y [N]), seen through ``config``
    (default: native size, CIFAR statistics)."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, num_classes: int, config: dict | None = None, workers: int = 0
    ):
        super().__init__(
            TensorSource(x, y, num_classes, "tensors"),
            torch.arange(len(y)),
            config or default_config(x.shape[-1]),
            workers,
        )


# ---------------------------------------------------------------- batching for one rank
class GlobalBatches(Sampler):
    """This rank's share of each global batch of ``batch_size`` images, in the order of a
    ``DistributedSampler`` (rank r holds the global positions r, r + world, ...).

    The share is taken by position, not by padding shards to equal length as DistributedSampler's
    own iteration does: a padded shard would count some images twice, and the union of the ranks'
    batches would no longer be the single-process batch. Every rank yields the same number of
    batches (possibly empty ones), so collective calls stay matched."""

    def __init__(self, sampler: DistributedSampler, n: int, batch_size: int):
        self.sampler, self.n, self.batch_size = sampler, n, batch_size

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        stream = list(self.sampler)  # element k sits at global position rank + k * world
        r, w = self.sampler.rank, self.sampler.num_replicas
        for start in range(0, self.n, self.batch_size):
            end = min(start + self.batch_size, self.n)
            first = -(-(start - r) // w)  # ceil: first k with r + k * w >= start
            yield [stream[k] for k in range(max(first, 0), len(stream)) if r + k * w < end]


def my_positions(start: int, size: int, rank: int, world: int) -> torch.Tensor:
    """Positions within the global batch [start, start + size) that ``rank`` holds (see GlobalBatches)."""
    q = torch.arange(size)
    return q[(start + q) % world == rank]


def _batch_as_is(batch):
    return batch


class Loader:
    """A DataLoader whose errors read as the data set's own: a LotusError raised in a worker (an
    image that cannot be decoded) comes back as that one-line error, not the worker's traceback."""

    def __init__(self, dl: DataLoader):
        self.dl = dl

    def __len__(self) -> int:
        return len(self.dl)

    def __iter__(self):
        try:
            yield from self.dl
        except LotusError as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            if len(lines) > 1 and lines[0].startswith("Caught LotusError"):
                raise LotusError(lines[-1].split("LotusError: ", 1)[-1]) from None
            raise


def loader(
    data: ImageSet,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world: int = 1,
    pin_memory: bool = False,
) -> Loader:
    """Batches of ``data`` for ``rank``: (uint8 images, labels, ids), to pass through ``data.prepare``."""
    if batch_size < 1:
        raise LotusError(f"batch size: expected at least 1, got {batch_size}")
    sampler = DistributedSampler(
        data, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed % (1 << 62), drop_last=False
    )
    sampler.set_epoch(epoch)
    return Loader(
        DataLoader(
            data,
            batch_sampler=GlobalBatches(sampler, len(data), batch_size),
            collate_fn=_batch_as_is,
            num_workers=data.workers,
            pin_memory=pin_memory,
        )
    )


# ---------------------------------------------------------------- loading sources
def check_arrays(x, y, source: str, num_classes: int | None = None) -> Images:
    """Validate x / y (numpy or torch) and return them as an ``Images`` set; every problem is a LotusError."""
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
    classes = _check_labels(y, source, num_classes)
    return Images(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)), classes)


def _check_labels(y, source: str, num_classes: int | None) -> int:
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise LotusError(f"{source}: labels out of range: found {lo}, labels must be >= 0")
    classes = hi + 1 if num_classes is None else num_classes
    if hi >= classes:
        raise LotusError(f"{source}: labels out of range: found {hi}, expected labels in [0, {classes})")
    if classes < 2:
        raise LotusError(f"{source}: need at least 2 classes, labels only take the value {lo}")
    return classes


def load_npz(path, num_classes: int | None = None) -> Images:
    path = Path(path)
    if not path.is_file():
        raise LotusError(f"--data: file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            missing = {"x", "y"} - keys
            if missing:
                raise LotusError(
                    f"--data: {path} lacks key(s) {', '.join(sorted(missing))}; expected "
                    f"x (uint8 [N, 3, H, W]) and y (int64 [N]), found {sorted(keys)}"
                )
            x, y = f["x"], f["y"]
    except LotusError:
        raise
    except Exception as e:  # not a zip / truncated / pickled objects
        raise LotusError(f"--data: cannot read {path} as .npz: {type(e).__name__}: {e}".splitlines()[0])
    return check_arrays(x, y, f"--data {path}", num_classes)


def load_cifar10(root, train: bool = True, num_classes: int | None = None) -> TensorSource:
    """One official split of torchvision's CIFAR-10, as it keeps it: uint8 NHWC in memory (no copy)."""
    from torchvision.datasets import CIFAR10

    # Download only into an empty place: a damaged copy is reported, not silently fetched again.
    download = not (Path(root) / CIFAR10.base_folder).exists()
    try:
        ds = CIFAR10(root=str(root), train=train, download=download)
    except Exception as e:  # offline: URLError; a damaged folder: RuntimeError from the checksum test
        raise LotusError(
            f"--data cifar10: cannot load CIFAR-10 under --data-root {root} ({type(e).__name__}: {e})".splitlines()[0]
        )
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # [N, 32, 32, 3] -> a [N, 3, 32, 32] view
    y = torch.as_tensor(ds.targets, dtype=torch.int64)
    split = "train" if train else "test"
    classes = _check_labels(y.numpy(), f"cifar10 ({split})", num_classes or 10)
    return TensorSource(x, y, classes, f"cifar10-{split}")


def load_image_folder(root, num_classes: int | None = None) -> FolderSource:
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(str(root))
    except Exception as e:  # no class folders / no image files
        raise LotusError(f"--data: {root} is not a usable ImageFolder ({type(e).__name__}: {e})".splitlines()[0])
    y = torch.as_tensor(folder.targets, dtype=torch.int64)
    classes = _check_labels(y.numpy(), f"--data {root}", num_classes or len(folder.classes))
    try:  # a folder of unreadable files fails here, before a run directory exists
        folder.loader(folder.samples[0][0])
    except Exception as e:
        raise LotusError(
            f"--data: cannot decode image {folder.samples[0][0]} ({type(e).__name__}: {e})".splitlines()[0]
        )
    return FolderSource(folder, y, classes, str(root))


def open_sources(cfg: dict):
    """(source of the training images, source of an official held-out split or None)."""
    name, n_cls = cfg["data"], cfg.get("num_classes")
    if name == "cifar10":
        train = load_cifar10(cfg["data_root"], True, n_cls)
        return train, load_cifar10(cfg["data_root"], False, train.num_classes)
    if os.path.isdir(name):
        return load_image_folder(name, n_cls), None
    return load_npz(name, n_cls).source, None


# ---------------------------------------------------------------- limits and splits
def stratified(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``n`` images with classes as balanced as the data allows: a seeded
    shuffle within each class, then classes taken in turns (a class that runs out leaves its
    turns to the others)."""
    n = min(int(n), len(labels))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    lab = labels[perm]
    order = torch.argsort(lab, stable=True)  # by class, shuffled within each
    lab_sorted = lab[order]
    starts = torch.searchsorted(lab_sorted, lab_sorted, right=False)
    turn = torch.arange(len(lab)) - starts  # rank of each image within its class
    pick = order[torch.argsort(turn * (int(lab.max()) + 1) + lab_sorted, stable=True)[:n]]
    return perm[pick].sort().values


def split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train, val) index tensors: a seeded permutation, the first part for validation."""
    if not 0 < val_fraction < 1:
        raise LotusError(f"--val-fraction: expected a fraction in (0, 1), got {val_fraction}")
    n_val = max(1, round(val_fraction * n))
    if n - n_val < 1:
        raise LotusError(f"--data: {n} images are too few to split off a validation set")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def default_workers(source) -> int:
    """0 for in-memory data (a batch is one slice and one batched resize); otherwise one worker per
    spare core, at most 8 (decoding is the work)."""
    if source.in_memory:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus - 1))


def run_config(cfg: dict) -> dict:
    """The run's data config (older runs without one: the default model's)."""
    return cfg.get("data_config") or default_config(cfg["img_size"])


def load_split(cfg: dict, sources=None) -> tuple[ImageSet, ImageSet]:
    """(train, held-out) sets for a run's config: the official test split where the source has one,
    else a seeded split off the training images; ``--limit`` takes a class-stratified sample."""
    train_src, test_src = sources or open_sources(cfg)
    limit, seed = cfg.get("limit"), cfg["seed"]
    if limit is not None and limit < 2:
        raise LotusError(f"--limit: expected at least 2 images, got {limit}")
    if test_src is not None:
        if limit:
            n_val = max(1, round(cfg["val_fraction"] * limit)) if 0 < cfg["val_fraction"] < 1 else None
            if n_val is None or limit - n_val < 1:
                raise LotusError(
                    f"--limit / --val-fraction: {limit} images cannot be split with fraction {cfg['val_fraction']}"
                )
            tr_idx = stratified(train_src.labels, limit - n_val, seed)
            va_idx = stratified(test_src.labels, n_val, seed + 1)
        else:
            tr_idx, va_idx = torch.arange(len(train_src.labels)), torch.arange(len(test_src.labels))
    else:
        base = stratified(train_src.labels, limit, seed) if limit else torch.arange(len(train_src.labels))
        tr, va = split(len(base), cfg["val_fraction"], seed)
        tr_idx, va_idx, test_src = base[tr], base[va], train_src
    conf = run_config(cfg)
    workers = cfg.get("workers")
    workers = default_workers(train_src) if workers is None else workers
    return ImageSet(train_src, tr_idx, conf, workers), ImageSet(test_src, va_idx, conf, workers)


def load_eval(source: str, cfg: dict) -> ImageSet:
    """Every image of ``source`` (cifar10: its test split) for evaluating a finished run."""
    c = dict(cfg, data=source, num_classes=cfg["num_classes"])
    train_src, test_src = open_sources(c)
    src = test_src or train_src
    workers = cfg.get("workers")
    workers = default_workers(src) if workers is None else workers
    return ImageSet(src, torch.arange(len(src.labels)), run_config(cfg), workers)

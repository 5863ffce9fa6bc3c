"""Canvas data: each image placed at a random position on a larger canvas of other images' pieces.

A 32-px CIFAR object fills its whole frame, so dropping half the patches drops half the object
whatever the policy; the premise of attention tickets is a larger frame where the object covers only
part of it (as at 224 px). ``compose`` builds that setting from real images: a ``size`` x ``size``
canvas tiled with ``tile`` x ``tile`` crops of *other* images of the same set (realistic clutter,
not noise), and the image itself pasted at a random pixel position (not aligned to any patch grid).
Each set (train, selection, validation, an evaluation file) takes its distractors from its own
images, so no held-out image leaks into training.

Because the object's box is known, ``object_recall`` measures how much of the object a ticket keeps:
the share of the object's pixels that lie in the kept patches (random patches keep ``K / N`` of them
in expectation, whatever the image).
"""

from __future__ import annotations

import torch

from .errors import LotusError


def check_size(size: int, image_side: int, option: str = "--canvas") -> None:
    """A one-line LotusError unless a ``size`` canvas is larger than ``image_side``-px images."""
    if size <= image_side:
        raise LotusError(
            f"{option}: the canvas ({size} px) must be larger than the images ({image_side} px); "
            f"use a size above {image_side}, e.g. {2 * image_side}, or 0 for no canvas"
        )


def compose(
    x: torch.Tensor, size: int, *, seed: int, tile: int | None = None, background: str = "clutter"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(canvases uint8 [N, 3, size, size], boxes int64 [N, 4] = (top, left, height, width)) of the
    uint8 images ``x`` [N, 3, h, w]: image i at a random position on a mosaic of ``tile``-px crops
    (default h // 8) of random other images j != i at random offsets (``background`` "clutter"), or
    on the images' mean colour ("plain": object-centric photos, the source task's kind). Deterministic
    in ``seed``."""
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"x: expected uint8 images [N, 3, H, W], got {x.dtype} {tuple(x.shape)}")
    n, _, h, w = x.shape
    check_size(size, max(h, w))
    if background not in ("clutter", "plain"):
        raise ValueError(f"background: expected clutter or plain, got {background!r}")
    if n < 2 and background == "clutter":
        raise LotusError(f"--canvas: needs at least 2 images in a set (distractors come from other images), got {n}")
    tile = tile or max(1, min(h, w) // 8)
    if not 0 < tile <= min(h, w):
        raise ValueError(f"tile: expected 1..{min(h, w)}, got {tile}")
    g = torch.Generator().manual_seed(seed)
    top = torch.randint(0, size - h + 1, (n,), generator=g)  # positions first: the same for either background
    left = torch.randint(0, size - w + 1, (n,), generator=g)
    canvas = torch.empty((n, 3, size, size), dtype=torch.uint8)
    grid = -(-size // tile)
    ar = torch.arange(tile)
    img = torch.arange(n)
    if background == "plain":
        canvas[:] = x.double().mean((0, 2, 3)).round().to(torch.uint8).view(1, 3, 1, 1)
    for a in range(grid if background == "clutter" else 0):
        for b in range(grid):
            other = (img + torch.randint(1, n, (n,), generator=g)) % n  # never the image itself
            oy = torch.randint(0, h - tile + 1, (n,), generator=g)
            ox = torch.randint(0, w - tile + 1, (n,), generator=g)
            crop = x[other[:, None, None], :, (oy[:, None] + ar)[:, :, None], (ox[:, None] + ar)[:, None, :]]
            y0, x0 = a * tile, b * tile
            th, tw = min(tile, size - y0), min(tile, size - x0)
            canvas[:, :, y0 : y0 + th, x0 : x0 + tw] = crop.permute(0, 3, 1, 2)[:, :, :th, :tw]
    rows = (top[:, None] + torch.arange(h))[:, :, None]
    cols = (left[:, None] + torch.arange(w))[:, None, :]
    canvas.permute(0, 2, 3, 1)[img[:, None, None], rows, cols] = x.permute(0, 2, 3, 1)
    boxes = torch.stack([top, left, torch.full_like(top, h), torch.full_like(top, w)], 1)
    return canvas, boxes


def boxes_in_model_pixels(boxes: torch.Tensor, canvas_size: int, config: dict) -> torch.Tensor:
    """float [N, 4] boxes (top, left, height, width) in the pixels the model sees: timm's eval
    transform resizes the canvas to input / crop_pct and centre-crops to the input size."""
    side = int(config["input_size"][-1])
    resized = side / float(config.get("crop_pct") or 1.0)
    scale = resized / canvas_size
    off = (resized - side) / 2.0
    b = boxes.double() * scale
    b[:, 0] -= off
    b[:, 1] -= off
    return b


def coverage(boxes: torch.Tensor, img_size: int, patch: int) -> torch.Tensor:
    """float64 [N, P]: pixels of each image's object box (model pixels) inside each of the P =
    (img_size // patch)^2 patches, row-major like the ViT's patch order."""
    grid = img_size // patch
    edges = torch.arange(grid, dtype=torch.float64) * patch
    b = boxes.double()

    def overlap(start, length):  # [N, grid]: overlap of [start, start + length) with each patch interval
        lo = torch.maximum(start[:, None], edges[None])
        hi = torch.minimum((start + length)[:, None], edges[None] + patch)
        return (hi - lo).clamp_min(0)

    oy, ox = overlap(b[:, 0], b[:, 2]), overlap(b[:, 1], b[:, 3])
    return (oy[:, :, None] * ox[:, None, :]).reshape(len(b), grid * grid)


def object_recall(keep_idx: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """float64 [N]: share of each object's pixels in the kept patches ``keep_idx`` [N, K]."""
    if keep_idx.shape[0] != cover.shape[0]:
        raise ValueError(f"keep_idx / cover: {keep_idx.shape[0]} and {cover.shape[0]} images")
    total = cover.sum(1)
    if (total <= 0).any():
        raise ValueError("cover: an object box lies outside the image")
    return cover.gather(1, keep_idx.long()).sum(1) / total

"""Stage 3, attention data tickets: score every training image's patches, keep the top ones.

The score of a patch is the class token's attention to it in the last block, averaged over heads,
with the first-token sink replaced by the mean (``model.patch_scores``, one fused forward). A
ticket keeps the top ``keep_ratio`` of each image's patches (``select_keep``); fine-tuning then
embeds and processes only those (``model(images, keep_idx=...)``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from lotus_kernels import select_keep

from .data import ImageSet, loader
from .train import device


@torch.no_grad()
def score(model, data: ImageSet, *, batch_size: int = 256) -> torch.Tensor:
    """[N, num_patches] float32 patch scores of every image in ``data``, row i for image id i."""
    dev = device()
    model.to(dev).eval()
    out = None
    for xb, _, ids in tqdm(loader(data, batch_size, shuffle=False), desc="score patches", leave=False, disable=None):
        s = model.patch_scores(data.prepare(xb, dev)).float().cpu()
        if out is None:
            out = torch.empty((len(data), s.shape[1]), dtype=torch.float32)
        out[ids] = s
    return out


def keep_indices(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """[N, K] sorted int64 indices of each image's top ``keep_ratio`` patches."""
    return select_keep(scores, keep_ratio)


def overlay_figure(data: ImageSet, scores: torch.Tensor, keep_ratio: float, patch_size: int, n_images: int = 8):
    """A figure: per image, the picture, its score map, and the kept patches (dropped ones greyed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n_images, len(data))
    grid = data.img_size // patch_size
    keep = keep_indices(scores[:n], keep_ratio)
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.0), squeeze=False)
    for i in range(n):
        img = data.view(i).permute(1, 2, 0).numpy()  # the image as the model sees it
        mask = np.zeros(grid * grid, dtype=bool)
        mask[keep[i].numpy()] = True
        big = np.kron(mask.reshape(grid, grid), np.ones((patch_size, patch_size), dtype=bool))
        kept = np.where(big[..., None], img, (img * 0.25 + 96).astype(np.uint8))
        axes[0, i].imshow(img)
        axes[1, i].imshow(scores[i].view(grid, grid).numpy(), cmap="viridis")
        axes[2, i].imshow(kept)
        for r in range(3):
            axes[r, i].set_xticks([])
            axes[r, i].set_yticks([])
    axes[0, 0].set_ylabel("image")
    axes[1, 0].set_ylabel("CLS attention")
    axes[2, 0].set_ylabel(f"kept {math.ceil(keep_ratio * grid * grid - 1e-9)}/{grid * grid}")
    fig.suptitle(f"Attention data tickets (keep {keep_ratio:g}); dropped patches greyed")
    return fig

"""Stage 3, attention data tickets: score patches, and the policies that choose which patches a
fine-tuning step sees.

A patch's score is the class token's attention to it in the last block (``--score-blocks mean``: the
mean over every block), averaged over heads, with
an attention-sink rule (``model.patch_scores(images, sink)``, one fused forward; rules in
``lotus_kernels.vit_scores``: "first" is LOTUS's literal rule and changes no patch, "outlier" and
"norm" give outlier patches the mean score). A ticket keeps the top ``keep_ratio`` of an image's
patches (``select_keep``: ceil(keep * N)); the model then embeds and processes only those.

Policies (``make_policy``), every one keeping the same ceil(keep * N) patches per image per step,
through the same kept-patch path (so their costs differ only by what choosing costs):
  fixed          the ticket of each image, scored once by the model that is fine-tuned (LOTUS)
  fixed_random   a random subset per image, drawn once and kept (the control for "fixed")
  random         a new random subset every step (PatchDropout at the ticket's token count)
  rescore_epoch  tickets re-scored by the current model before every epoch after the first
                 (the data-level lottery ticket work's on-the-fly selection)
  rescore_step   re-scored on every batch by the current model (one extra no-grad forward, as EViT
                 selects tokens from the current attention)
  aug_rescore    random flips + shifts, re-scored on every augmented batch (a ticket of the image
                 the model actually sees)
  mix            the top ``mix_top`` share of the kept patches by the fixed ticket's scores, the rest
                 drawn at random from the other patches every step
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from lotus_kernels import select_keep
from lotus_kernels.select import num_keep

from .data import ImageSet, loader
from .train import device

POLICIES = ("fixed", "fixed_random", "random", "rescore_epoch", "rescore_step", "aug_rescore", "mix")
SINKS = ("none", "first", "outlier", "norm")


def _sink(rule: str | None):
    return None if rule in (None, "none") else rule


@torch.no_grad()
def score(
    model,
    data: ImageSet,
    *,
    batch_size: int = 256,
    sink: str | None = "first",
    blocks: str = "last",
    return_flagged: bool = False,
):
    """[N, num_patches] float32 patch scores of every image in ``data``, row i for image id i (and
    the bool mask of the patches the sink rule changed, with ``return_flagged``); ``blocks``: the
    last block's class-token attention (LOTUS's) or the mean over every block's."""
    dev = device()
    was_training = model.training
    model.to(dev).eval()
    out = flags = None
    for xb, _, ids in tqdm(loader(data, batch_size, shuffle=False), desc="score patches", leave=False, disable=None):
        s, f = model.patch_scores(data.prepare(xb, dev), _sink(sink), blocks=blocks, return_flagged=True)
        if out is None:
            out = torch.empty((len(data), s.shape[1]), dtype=torch.float32)
            flags = torch.zeros((len(data), s.shape[1]), dtype=torch.bool)
        out[ids] = s.float().cpu()
        flags[ids] = f.cpu()
    model.train(was_training)
    return (out, flags) if return_flagged else out


def keep_indices(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """[N, K] sorted int64 indices of each image's top ``keep_ratio`` patches."""
    return select_keep(scores, keep_ratio)


# ---------------------------------------------------------------- policies
class _Table:
    """keep_fn for a fixed [N, K] table (fixed tickets, fixed random)."""

    image_frame = True  # indices of the image as stored: ``train`` mirrors them with a flipped image

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, x, idx):
        return self.table[idx]


class _Random:
    """A fresh random subset of k patches per image per step."""

    image_frame = True  # any frame is as random; this one keeps the object-patch recall exact under flips

    def __init__(self, n: int, keep: float, seed: int):
        self.n, self.keep = n, keep
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, x, idx):
        k = num_keep(self.n, self.keep)
        return torch.rand(len(idx), self.n, generator=self.gen).topk(k, dim=1).indices.sort(dim=1).values


class _RescoreEpoch:
    """Tickets re-scored by the current model before every epoch but the first."""

    image_frame = True  # scored on the stored (unaugmented) images

    def __init__(self, table, data: ImageSet, keep: float, sink, batch_size: int, blocks: str = "last"):
        self.table, self.data, self.keep, self.sink, self.batch_size = table, data, keep, sink, batch_size
        self.blocks = blocks

    def new_epoch(self, model, epoch):
        if epoch > 0:
            s = score(model, self.data, batch_size=self.batch_size, sink=self.sink, blocks=self.blocks)
            self.table = keep_indices(s, self.keep)

    def __call__(self, x, idx):
        return self.table[idx]


class _RescoreStep:
    """Tickets from the current model's scores of the batch as the model sees it."""

    image_frame = False  # already where the (augmented) batch has the patches

    def __init__(self, model, keep: float, sink, blocks: str = "last"):
        self.model, self.keep, self.sink, self.blocks = model, keep, _sink(sink), blocks

    def __call__(self, x, idx):
        return select_keep(self.model.patch_scores(x, self.sink, blocks=self.blocks).float(), self.keep).cpu()


class _Mix:
    """The top ``top`` share of the k kept patches by fixed scores, the rest random every step."""

    image_frame = True

    def __init__(self, scores: torch.Tensor, keep: float, top: float, seed: int):
        n = scores.shape[1]
        self.k = num_keep(n, keep)
        self.k_top = min(self.k, max(0, round(top * self.k)))
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        self.top, self.rest = order[:, : self.k_top], order[:, self.k_top :]
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, x, idx):
        rest = self.rest[idx]
        pick = torch.rand(rest.shape, generator=self.gen).topk(self.k - self.k_top, dim=1).indices
        return torch.cat([self.top[idx], rest.gather(1, pick)], 1).sort(dim=1).values


def make_policy(
    policy: str,
    *,
    model,
    train_data: ImageSet,
    scores: torch.Tensor | None,
    keep: float,
    seed: int,
    sink="first",
    blocks: str = "last",
    batch_size: int = 256,
    mix_top: float = 0.5,
):
    """(keep_fn for ``train(keep_fn=...)``, augment flag) of ``policy`` at ``keep``; ``scores`` [N, P]
    are the start model's scores of ``train_data`` (for fixed / rescore_epoch / mix)."""
    n = model.patch_embed.num_patches
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    if policy in ("fixed", "rescore_epoch", "mix") and scores is None:
        raise ValueError(f"scores: policy {policy!r} needs the start model's patch scores")
    if policy == "fixed":
        return _Table(keep_indices(scores, keep)), False
    if policy == "fixed_random":
        g = torch.Generator().manual_seed(seed)
        return _Table(
            torch.rand(len(train_data), n, generator=g).topk(num_keep(n, keep), dim=1).indices.sort(dim=1).values
        ), False
    if policy == "random":
        return _Random(n, keep, seed), False
    if policy == "rescore_epoch":
        return _RescoreEpoch(keep_indices(scores, keep), train_data, keep, sink, batch_size, blocks), False
    if policy == "rescore_step":
        return _RescoreStep(model, keep, sink, blocks), False
    if policy == "aug_rescore":
        return _RescoreStep(model, keep, sink, blocks), True
    return _Mix(scores, keep, mix_top, seed), False


@torch.no_grad()
def ticket_predict(model, data: ImageSet, keep_idx: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Predicted class (int64 [N]) of ``model`` seeing only the kept patches ``keep_idx`` [N, K] of each
    image: how much of what the model needs a ticket keeps (the sink rules' measure)."""
    dev = device()
    was_training = model.training
    model.to(dev).eval()
    out = torch.zeros(len(data), dtype=torch.int64)
    for xb, _, ids in loader(data, batch_size, shuffle=False):
        out[ids] = model(data.prepare(xb, dev), keep_idx=keep_idx[ids].to(dev)).argmax(1).cpu()
    model.train(was_training)
    return out


# ---------------------------------------------------------------- figure
def overlay_figure(
    data: ImageSet,
    scores: torch.Tensor,
    keep_ratio: float,
    patch_size: int,
    n_images: int = 8,
    flagged: torch.Tensor | None = None,
    rule: str | None = None,
    boxes: torch.Tensor | None = None,
    blocks: str = "last",
):
    """Per image: the picture, its score map (patches the sink rule changed outlined in red), and the
    kept patches (dropped ones greyed). ``scores`` are the scores after the rule; ``boxes`` [N, 4]
    (top, left, height, width in model pixels): the object of canvas images, outlined in green;
    ``blocks``: whose attention the scores are (named on the score row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

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
        if flagged is not None:
            for j in flagged[i].nonzero().flatten().tolist():
                r, c = divmod(j, grid)
                axes[1, i].add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
        axes[2, i].imshow(kept)
        if boxes is not None:
            top, left, h, w = boxes[i].tolist()
            for r, scale in ((0, 1.0), (1, 1.0 / patch_size), (2, 1.0)):  # pixels / patches; edges at -0.5
                axes[r, i].add_patch(
                    Rectangle(
                        (left * scale - 0.5, top * scale - 0.5), w * scale, h * scale, fill=False, ec="lime", lw=1.2
                    )
                )
        for r in range(3):
            axes[r, i].set_xticks([])
            axes[r, i].set_yticks([])
    axes[0, 0].set_ylabel("image")
    who = "last block" if blocks == "last" else "mean of blocks"
    axes[1, 0].set_ylabel(f"CLS attention, {who}" + (f"\nsink: {rule}" if rule else ""))
    axes[2, 0].set_ylabel(f"kept {math.ceil(keep_ratio * grid * grid - 1e-9)}/{grid * grid}")
    title = f"Attention data tickets (keep {keep_ratio:g}); dropped patches greyed"
    if boxes is not None:
        title += "; green: the object"
    if flagged is not None:
        title += f"\nred: patches the sink rule '{rule}' set to the mean ({int(flagged[:n].sum())} in these images)"
    fig.suptitle(title)
    return fig

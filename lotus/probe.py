"""The start model: the pretrained backbone with a linear probe for the target task.

A pretrained model has no classifier for the target's classes. A linear probe (logistic regression
on the frozen backbone's pre-logits features, Kumar et al. 2022's "LP" of LP-FT) gives it one, so
that (a) the start model's accuracy is the honest "no fine-tuning" level every arm must beat,
(b) the one-shot sweeps, tickets and ISP rounds judge a model that already classifies the target,
and (c) every fine-tuning arm starts from a head that does not wreck the features in its first
steps. The probe's weight decay is chosen on the selection split; L-BFGS on the features of the
training images (computed once, all patches, no augmentation), full batch, so it is deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import ImageSet, loader
from .train import device

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


@torch.no_grad()
def features(model, data: ImageSet, *, batch_size: int = 256, bf16: bool = False) -> torch.Tensor:
    """float32 [N, D] pre-logits features of every image (row i = image id i)."""
    dev = device()
    was_training = model.training
    model.to(dev).eval()
    out = None
    for xb, _, ids in tqdm(loader(data, batch_size, shuffle=False), desc="features", leave=False, disable=None):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            f = model.forward_head(model.forward_features(data.prepare(xb, dev)), pre_logits=True)
        if out is None:
            out = torch.empty((len(data), f.shape[1]), dtype=torch.float32)
        out[ids] = f.float().cpu()
    model.train(was_training)
    return out


def fit_head(
    feats: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float, iters: int = 100
) -> torch.nn.Linear:
    """Multinomial logistic regression (bias unpenalised) by full-batch L-BFGS, from zeros."""
    head = torch.nn.Linear(feats.shape[1], num_classes).double()
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    x, y = feats.double(), labels.long()
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head.float()


def linear_probe(
    model, train: ImageSet, select: ImageSet, *, batch_size: int = 256, bf16: bool = False, weight_decays=WEIGHT_DECAYS
) -> dict:
    """Replace ``model``'s classifier by a linear probe for ``train``'s classes (in place); the weight
    decay with the best accuracy on ``select`` (ties: the larger). Returns {"weight_decay",
    "select_acc" per candidate}."""
    n = train.num_classes
    model.reset_classifier(n)
    f_tr = features(model, train, batch_size=batch_size, bf16=bf16)
    f_sel = features(model, select, batch_size=batch_size, bf16=bf16)
    accs, heads = {}, {}
    for wd in weight_decays:
        heads[wd] = fit_head(f_tr, train.y, n, wd)
        with torch.no_grad():
            accs[wd] = 100.0 * float((heads[wd](f_sel).argmax(1) == select.y).double().mean())
    best = max(weight_decays, key=lambda wd: (accs[wd], wd))
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.copy_(heads[best].weight)
        head.bias.copy_(heads[best].bias)
    return {"weight_decay": best, "select_acc": {f"{wd:g}": a for wd, a in accs.items()}}

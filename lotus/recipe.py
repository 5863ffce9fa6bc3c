"""Training defaults: one recipe for a model trained from scratch, one for pretrained weights.

A run's options left unset (None) are filled here when the run is created, and the filled values
are what ``config.json`` records, so a resumed run never re-decides them.

scratch     ``lotus_vit`` or a timm ViT from random weights, pretrained on the source task: 30 epochs
            of AdamW at 2e-3 (weight decay 0.05, batch 128); the fine-tuning arms at 2e-3 for 6
            epochs at batch 32 (4x the steps of batch 128 for ~1.2x the CPU time: at batch 128 and
            5e-4 fine-tuning moved a 64-wide ViT too little to beat its linear probe), weak copies
            (ISP, ISSP, Instant Soup) and the recovery pass at 5e-4, batch 32.
pretrained  ``--pretrained`` or ``--checkpoint``: the checkpoint is the start (no pretraining stage,
            its source task is its own); every arm fine-tunes with the original ViT fine-tuning
            recipe (Dosovitskiy et al. 2021, and the vision_transformer repository's CIFAR-10 run:
            SGD momentum 0.9, no weight decay, gradient norm clipped at 1, cosine with warm-up, lr
            0.03 at batch 512, about 500 steps, i.e. 5 epochs of CIFAR-10 at batch 512). Learning rates
            scale linearly with the batch size; the ISP weak copies run at a third of it. A
            from-scratch recipe at lr 2e-3 for 30 epochs would wreck pretrained features.
cost basis  the cost axis counts process CPU seconds without a GPU (robust on a shared CPU) and wall
            seconds with one (``lotus.cost``).
bf16 autocast is on by default where a GPU is visible.
"""

from __future__ import annotations

import torch

SCRATCH = {
    "pretrain_epochs": 30,
    "optimizer": "adamw",
    "lr": 2e-3,
    "weight_decay": 0.05,
    "clip_grad": None,
    "isp_lr": 5e-4,
    "finetune_lr": 2e-3,
    "finetune_epochs": 6,
    "finetune_batch_size": 32,
}


def pretrained(batch_size: int) -> dict:
    scale = batch_size / 512
    return {
        "pretrain_epochs": 0,
        "optimizer": "sgd",
        "lr": 0.03 * scale,
        "weight_decay": 0.0,
        "clip_grad": 1.0,
        "isp_lr": 0.01 * scale,
        "finetune_lr": 0.03 * scale,
        "finetune_epochs": 5,
        "finetune_batch_size": batch_size,
    }


def resolve(cfg: dict) -> dict:
    """Fill the unset training options of ``cfg`` in place (and return it)."""
    kind = "pretrained" if cfg.get("pretrained") or cfg.get("checkpoint") else "scratch"
    defaults = pretrained(cfg["batch_size"]) if kind == "pretrained" else SCRATCH
    cfg["recipe"] = kind
    for key, value in defaults.items():
        if cfg.get(key) is None:
            cfg[key] = value
    if cfg.get("bf16") is None:
        cfg["bf16"] = torch.cuda.is_available()
    if cfg.get("cost_basis") in (None, "auto"):
        cfg["cost_basis"] = "wall" if torch.cuda.is_available() else "cpu"
    return cfg

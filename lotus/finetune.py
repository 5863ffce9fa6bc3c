"""Stage 5, fine-tuning the pruned model: on the attention tickets, on random patches, on full images.

Every configuration starts from the same pruned model (``--finetune-mask``, default the ISP model at
the essential sparsity) with the same seed, so the data order is the same and only the patches seen
differ:
  full          every patch of every image
  ticket_<k>    each image's top-k attention patches (``model(images, keep_idx=...)``: dropped
                patches are never embedded)
  random_<k>    timm's ``PatchDropout`` keeping a random fraction k (timm embeds every patch first
                and rounds the count down, e.g. 44 of 64 at 0.7 where a ticket keeps 45)
"""
from __future__ import annotations

from .data import Images
from .train import epochs_to_within, train

MASK_SOURCES = ("dense", "essential", "isp", "issp")


def configurations(keeps) -> list[tuple[str, str, float]]:
    """(name, kind, keep ratio) of every comparison run."""
    out = [("full", "full", 1.0)]
    out += [(f"ticket_{k:g}", "ticket", float(k)) for k in keeps]
    out += [(f"random_{k:g}", "random", float(k)) for k in keeps]
    return out


def finetune(model, train_data: Images, val_data: Images, cfg: dict, *, kind: str, keep: float, seed: int,
             keep_idx=None, desc: str = "finetune") -> dict:
    """Fine-tune ``model`` in place as one configuration; returns its history plus
    ``epochs_to_within_1``: the first epoch within 1 point of the final accuracy."""
    hist = train(model, train_data, val_data, epochs=cfg["finetune_epochs"], lr=cfg["finetune_lr"],
                 batch_size=cfg["batch_size"], seed=seed, optimizer=cfg["optimizer"],
                 weight_decay=cfg["weight_decay"], warmup=cfg["warmup"], bf16=cfg["bf16"],
                 keep_idx=keep_idx if kind == "ticket" else None,
                 patch_drop_keep=keep if kind == "random" else None,
                 eval_batch_size=cfg["eval_batch_size"], desc=desc)
    hist["kind"], hist["keep"] = kind, keep
    hist["final_acc"] = hist["val_acc"][-1] if hist["val_acc"] else None
    hist["epochs_to_within_1"] = epochs_to_within(hist["val_acc"], 1.0)
    return hist

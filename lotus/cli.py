"""``lotus`` command line: ``run`` (all stages) and each stage alone, ``evaluate`` a finished run.

Bad input (missing or malformed data, a corrupt or mismatched checkpoint, a non-empty --out
without --resume) ends with one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import LotusError

DEFAULT_SWEEP = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
DEFAULT_POLICIES = ("fixed", "random")


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def _fraction(text: str) -> float:
    v = float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return v


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _classes(text: str):
    if text == "auto":
        return text
    from .task import parse_classes

    try:
        return parse_classes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        help="FILE.npz (x uint8 [N,3,H,W], y int64 [N]; held-out split: --val-fraction), "
        "'cifar10' (torchvision; its official test split is the held-out set; downloads "
        "into --data-root where the network allows) or an ImageFolder directory",
    )
    g.add_argument("--data-root", default="data", help="where torchvision keeps CIFAR-10 (default: %(default)s)")
    g.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="model input size; images are resized (and centre-cropped) to it by timm's transform "
        "(default: the model's own, e.g. 224 for vit_*_224; lotus_vit: the data's native size)",
    )
    g.add_argument(
        "--crop-pct",
        type=_fraction,
        default=None,
        help="timm's crop_pct: resize to size / crop_pct, then centre-crop (default: the model's "
        "data config; 1.0 keeps all of a small image such as CIFAR's)",
    )
    g.add_argument("--num-classes", type=int, default=None, help="number of classes (default: max label + 1)")
    g.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use only N images, stratified by class, split by --val-fraction (quick runs)",
    )
    g.add_argument("--val-fraction", type=float, default=0.25, help="held-out validation fraction (default: 0.25)")
    g.add_argument(
        "--source-classes",
        type=_classes,
        default="auto",
        help="classes of the source task the model is pretrained on, e.g. 0-4 (default auto: from scratch "
        "the first half of the classes; with --pretrained / --checkpoint none, the checkpoint's task)",
    )
    g.add_argument(
        "--target-classes",
        type=_classes,
        default="auto",
        help="classes of the target task that is fine-tuned and reported, e.g. 5-9 (default auto: from "
        "scratch the second half of the classes; with pretrained weights all)",
    )
    g.add_argument(
        "--canvas",
        type=int,
        default=None,
        help="place every image at a random position on a SIZE x SIZE canvas of other images' pieces "
        "(object boxes known: the report gives each ticket policy's object-patch recall); 0: none "
        "(default: twice the images' side from scratch, none with pretrained weights)",
    )
    g.add_argument(
        "--canvas-tile",
        type=int,
        default=None,
        help="side of the distractor pieces cut from other images (default: an eighth of the image side)",
    )
    g.add_argument(
        "--source-background",
        choices=("plain", "clutter"),
        default="plain",
        help="with --canvas, the source task's images on a plain background (object-centric "
        "pretraining; default) or on clutter like the target's",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader worker processes (default: 0 for .npz / cifar10, which are sliced and resized "
        "per batch; for an ImageFolder one per spare core, at most 8)",
    )
    g.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="stages run at a time in worker processes: prune replicates, fine-tuning runs (same results "
        "as one at a time; default: the usable cores / --threads, at most 4, on a CPU; 1 on a GPU or "
        "under torchrun)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the split and of every stage (default: 0)")
    g.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads, fixed per run so a resumed run reproduces it (default: 1; the small "
        "default model runs 2.6x faster on 1 thread than on 2 on a shared 2-core machine)",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default="lotus_vit",
        help="'lotus_vit' (small ViT at the data's resolution, below), any timm ViT name, or another "
        "family: tv:vit_b_16 (torchvision), hf:DIR (a local transformers directory), "
        "open_clip:ViT-B-32 (weights from --checkpoint)",
    )
    g.add_argument(
        "--pretrained",
        action="store_true",
        help="start from timm's pretrained weights (needs the hub) with the fine-tuning recipe",
    )
    g.add_argument(
        "--checkpoint",
        default=None,
        help="start from local weights with the fine-tuning recipe: a file (.safetensors, or a torch "
        "state_dict, optionally {'state_dict': ..., 'pretrained_cfg': {mean, std, ...}}) or a "
        "hub-layout directory (config.json + model.safetensors); a classifier for other labels "
        "is replaced by a fresh head",
    )
    g.add_argument(
        "--patch-size",
        type=int,
        default=None,
        help="lotus_vit patch size (default: an 8 x 8 patch grid, e.g. 8 on a 64-px canvas)",
    )
    g.add_argument("--embed-dim", type=int, default=64, help="lotus_vit width (default: 64)")
    g.add_argument("--depth", type=int, default=4, help="lotus_vit blocks (default: 4)")
    g.add_argument("--heads", type=int, default=2, help="lotus_vit attention heads (default: 2)")
    g.add_argument("--mlp-ratio", type=float, default=2.0, help="lotus_vit MLP hidden / width (default: 2)")
    g = p.add_argument_group(
        "training (all stages; unset values come from the recipe: from scratch, or "
        "fine-tuning for --pretrained / --checkpoint, see lotus/recipe.py)"
    )
    g.add_argument("--batch-size", type=int, default=128, help="global batch size (split across ranks; default 128)")
    g.add_argument("--eval-batch-size", type=int, default=512, help="evaluation / scoring batch size")
    g.add_argument(
        "--optimizer",
        choices=("adamw", "sgd"),
        default=None,
        help="timm's AdamW, or SGD with momentum 0.9 (default: adamw from scratch, sgd fine-tuning)",
    )
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="dense (pretrain) peak learning rate (default: 2e-3 from scratch; fine-tuning 0.03 x batch / 512)",
    )
    g.add_argument("--weight-decay", type=float, default=None, help="default: 0.05 from scratch, 0 fine-tuning")
    g.add_argument(
        "--clip-grad",
        type=float,
        default=None,
        help="clip the gradient norm (default: none from scratch, 1.0 fine-tuning; 0: none)",
    )
    g.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps (cosine after)")
    g.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast for training and evaluation (default: on where a GPU is visible)",
    )
    g.add_argument(
        "--pretrain-epochs",
        type=int,
        default=None,
        help="epochs of source-task training (default: 30 from scratch; 0 with pretrained weights)",
    )
    g.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="pretrain without random flips and shifts by 1/8 of the side (fine-tuning: --finetune-augment)",
    )
    g.add_argument(
        "--cost-basis",
        choices=("auto", "cpu", "wall"),
        default="auto",
        help="seconds on the cost axis: process CPU time (robust on a shared CPU) or wall time; auto: "
        "cpu without a GPU, wall with one (default)",
    )
    g = p.add_argument_group("attention tickets")
    g.add_argument(
        "--keep-ratio",
        type=_fraction,
        default=0.5,
        help="patches a ticket policy keeps per image per step, ceil(keep * N) (default: 0.5)",
    )
    g.add_argument(
        "--sink",
        default="auto",
        help="attention-sink rule of the patch scores: none, first (LOTUS's literal rule; changes no "
        "patch), outlier (outlier attention shares -> mean), norm (outlier token norms -> mean), or "
        "auto: the rule whose tickets the dense model classifies best on the selection split (default)",
    )
    g.add_argument(
        "--score-blocks",
        choices=("last", "mean", "auto"),
        default="auto",
        help="whose class-token attention scores a patch: the last block's (LOTUS's), the mean over every "
        "block's, or auto: the one (with the --sink rule) whose tickets the dense model classifies best on the "
        "selection split, ties to the last block (default)",
    )
    g.add_argument(
        "--policies",
        type=_names,
        default=list(DEFAULT_POLICIES),
        help="ticket policies fine-tuned on the pruned model (default: %(default)s; also rescore_step)",
    )
    g.add_argument(
        "--mix-top",
        type=float,
        default=0.5,
        help="mix policy: share of the kept patches taken by top attention, the rest random (default 0.5)",
    )
    g.add_argument(
        "--compare-keeps",
        type=_floats,
        default=[],
        help="extra keep ratios for fixed tickets vs random patches (default: none)",
    )
    g.add_argument("--overlay-images", type=int, default=8, help="images in tickets.png (0: none)")
    g = p.add_argument_group("pruning")
    g.add_argument(
        "--layout",
        default="block",
        help="pruned layout of the combined arm: unstructured, block or 2:4 (default: block, the only one "
        "whose kernels make a CPU step faster); unstructured arms always run as the paper's baseline",
    )
    g.add_argument("--block-size", type=int, default=16, help="block layout: 16, 32 or 64 (default: 16)")
    g.add_argument(
        "--block-score",
        default="auto",
        help="block ranking: l1, l2, grad (|w * dL/dw|), or auto: the best one-shot sweep on the "
        "selection split (default: auto)",
    )
    g.add_argument(
        "--select-fraction",
        type=float,
        default=0.1,
        help="share of the train split held out to choose the essential sparsity, block score and "
        "sink rule (0: choose on the validation split; default 0.1)",
    )
    g.add_argument("--sweep", type=_floats, default=DEFAULT_SWEEP, help="one-shot sparsities (default: 0,0.1,...,0.9)")
    g.add_argument(
        "--tolerance",
        type=float,
        default=1.0,
        help="essential sparsity: accuracy points below dense allowed (default: 1)",
    )
    g.add_argument(
        "--compare-sparsities",
        type=_floats,
        default=[],
        help="unstructured ISP / ISSP / control / Instant Soup / one-shot also at these sparsities, where "
        "one-shot loses accuracy, e.g. 0.7 (default: none; every layout is pruned at its essential "
        "sparsity)",
    )
    g.add_argument("--isp-rounds", type=int, default=2, help="ISP / ISSP rounds towards the target (default: 2)")
    g.add_argument("--isp-copies", type=int, default=3, help="weak copies K per round (default: 3)")
    g.add_argument(
        "--isp-subset",
        type=_fraction,
        default=0.3,
        help="fraction of the training split each weak copy fine-tunes on (default: 0.3; LOTUS: 0.1)",
    )
    g.add_argument("--isp-epochs", type=int, default=1, help="epochs of each weak copy (default: 1)")
    g.add_argument(
        "--isp-lr",
        type=float,
        default=None,
        help="learning rate of the weak copies (ISP, ISSP, control, Instant Soup) and of Instant Soup's "
        "main-model epochs (default: 5e-4 from scratch, 0.01 x batch / 512 fine-tuning)",
    )
    g.add_argument(
        "--isp-vote",
        choices=("any", "majority", "all"),
        default="majority",
        help="ISP mask merge: keep a weight kept by any / a majority / all copies (default: majority)",
    )
    g.add_argument(
        "--isp-recipe",
        default="ours",
        help="ISP feeding the fine-tuning arms: ours (votes + weight soup) or instant-soup (as published)",
    )
    g.add_argument(
        "--prune-seeds",
        type=int,
        default=3,
        help="replicates of every pruning method, each with its own seeds; fine-tuning seed k starts from "
        "replicate k mod this (default: 3)",
    )
    g.add_argument(
        "--no-instant-soup",
        dest="instant_soup",
        action="store_false",
        help="skip Instant Soup as published (by default it runs beside ours at every unstructured target)",
    )
    g.add_argument("--instant-copies", type=int, default=5, help="Instant Soup weak copies per iteration (default 5)")
    g.add_argument(
        "--instant-subset",
        type=_fraction,
        default=0.1,
        help="Instant Soup: data share of each weak copy's one pass (default 0.1)",
    )
    g.add_argument(
        "--instant-main-subset",
        type=_fraction,
        default=0.5,
        help="Instant Soup: data share of the main model's pass before each iteration (default 0.5)",
    )
    g.add_argument(
        "--instant-step",
        type=_fraction,
        default=0.1,
        help="Instant Soup: share of its remaining weights each copy prunes per iteration (default 0.1)",
    )
    g.add_argument(
        "--instant-stop",
        type=_fraction,
        default=0.05,
        help="Instant Soup: iterate until within this of the target, then prune one-shot (default 0.05)",
    )
    g = p.add_argument_group("fine-tuning")
    g.add_argument(
        "--headline",
        default="dense/fixed",
        help="the arm the report's goal is judged on, named before the run (default: %(default)s); the "
        "other arms are exploratory",
    )
    g.add_argument("--seeds", type=int, default=3, help="seeds of every fine-tuning arm (default: 3)")
    g.add_argument(
        "--main-seeds",
        type=int,
        default=5,
        help="seeds of the headline, dense/full and the compute-matched arms (default: 5)",
    )
    g.add_argument(
        "--arms",
        type=_names,
        default=None,
        help="fine-tuning arms <start>/<data> instead of the default set, e.g. "
        "dense/full,block-isp/fixed,block-isp/random@0.7,unstructured-control/full",
    )
    g.add_argument(
        "--no-matched",
        dest="matched",
        action="store_false",
        help="skip the compute-matched dense arms (dense full-data fine-tuning for the whole-job seconds "
        "of the cheapest arm and of the headline)",
    )
    g.add_argument(
        "--matched-steps",
        type=int,
        default=None,
        help="fix the compute-matched arms' steps instead of deriving them from measured seconds "
        "(reproducible test runs)",
    )
    g.add_argument(
        "--finetune-epochs",
        type=int,
        default=None,
        help="epochs of every arm (default: 6 from scratch, 5 with pretrained weights)",
    )
    g.add_argument(
        "--finetune-augment",
        choices=("none", "flip"),
        default="none",
        help="augmentation of every fine-tuning arm: 'flip' mirrors random images left-right, and a "
        "ticket's patch indices with them (shifts would move patches by a fraction of a patch); "
        "default none",
    )
    g.add_argument(
        "--finetune-batch-size",
        type=int,
        default=None,
        help="batch size of the fine-tuning arms, weak copies and recovery pass (default: 32 from scratch, "
        "--batch-size with pretrained weights)",
    )
    g.add_argument(
        "--finetune-lr",
        type=float,
        default=None,
        help="default: 5e-4 from scratch, 0.01 x batch / 512 fine-tuning a pretrained model",
    )
    g.add_argument(
        "--timing-rounds",
        type=int,
        default=5,
        help="interleaved rounds of the train-step timing of every arm (0: skip; default 5)",
    )


CONFIG_KEYS = (
    "data",
    "data_root",
    "img_size",
    "crop_pct",
    "num_classes",
    "limit",
    "val_fraction",
    "workers",
    "source_classes",
    "target_classes",
    "canvas",
    "canvas_tile",
    "source_background",
    "cost_basis",
    "prune_seeds",
    "instant_main_subset",
    "instant_step",
    "instant_stop",
    "headline",
    "main_seeds",
    "matched",
    "matched_steps",
    "finetune_batch_size",
    "finetune_augment",
    "clip_grad",
    "seed",
    "threads",
    "jobs",
    "model",
    "pretrained",
    "checkpoint",
    "patch_size",
    "embed_dim",
    "depth",
    "heads",
    "mlp_ratio",
    "batch_size",
    "eval_batch_size",
    "optimizer",
    "lr",
    "weight_decay",
    "warmup",
    "bf16",
    "pretrain_epochs",
    "augment",
    "keep_ratio",
    "sink",
    "score_blocks",
    "policies",
    "mix_top",
    "compare_keeps",
    "overlay_images",
    "layout",
    "block_size",
    "block_score",
    "select_fraction",
    "sweep",
    "tolerance",
    "compare_sparsities",
    "isp_rounds",
    "isp_copies",
    "isp_subset",
    "isp_epochs",
    "isp_lr",
    "isp_vote",
    "isp_recipe",
    "instant_soup",
    "instant_copies",
    "instant_subset",
    "seeds",
    "arms",
    "finetune_epochs",
    "finetune_lr",
    "timing_rounds",
)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: one line on stderr, exit 2 (no usage block)."""

    def error(self, message):
        print(f"lotus: error: {' '.join(str(message).split())}", file=sys.stderr)
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="lotus",
        description="LOTUS on lotus_kernels: attention data tickets + two-step magnitude pruning "
        "(essential sparsity -> ISP / ISSP), fine-tuned on sparse kernels, with a report.",
        epilog="Also: python -m lotus ...; torchrun --nproc_per_node=N -m lotus finetune RUN_DIR (DDP).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser(
        "run",
        help="all stages: pretrain, probe, score, prune, finetune, timing, report",
        description="Run every stage into --out, or continue an interrupted run with --resume.",
    )
    r.add_argument("--out", help="new (or empty) run directory")
    r.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue this run: unfinished stages are redone from scratch "
        "with the run's saved options (other options are ignored)",
    )
    _add_run_options(r)
    pt = sub.add_parser(
        "pretrain",
        help="create a run, pretrain on the source task and make the start model",
        description="Create RUN_DIR (--out) with the options below, pretrain on the source task "
        "and fit the start model's linear probe on the target task.",
    )
    pt.add_argument("--out", required=True, help="new (or empty) run directory")
    _add_run_options(pt)
    for name, text in (
        ("score", "attention tickets: score every training image, keep the top patches"),
        ("prune", "one-shot sweeps, essential sparsity, ISP / ISSP / control / Instant Soup per layout"),
        (
            "finetune",
            "fine-tune every arm and seed: dense / pruned starts, full data or ticket policies (DDP via torchrun)",
        ),
        ("report", "write report.md, results.json and plots"),
    ):
        s = sub.add_parser(name, help=text, description=text + ". Uses the options saved in RUN_DIR.")
        s.add_argument("run_dir", metavar="RUN_DIR")
        s.add_argument("--redo", action="store_true", help="redo the stage even if it has finished")
        if name == "finetune":
            s.add_argument(
                "--only", nargs="+", metavar="ARM", help="only these arms (dense/full, block-isp/fixed, ...)"
            )
    e = sub.add_parser(
        "evaluate",
        help="accuracy of every final model of a run on another data file",
        description="Evaluate the start model and every fine-tuned model (each arm and seed) of "
        "RUN_DIR on the run's target task within --data (its images of the target classes, on a "
        "canvas if the run used one; all patches).",
    )
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument(
        "--data",
        required=True,
        help="FILE.npz, cifar10 (its test split) or an ImageFolder with the "
        "run's class ids; images of other classes are left out, the rest go through the run's data "
        "config (resized to its input size)",
    )
    e.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object: "<arm>#s<seed>" (and "start", the model before fine-tuning) -> '
        '{"arm", "seed", "accuracy" (fraction), "n", "layout", "sparsity", "keep", "step_ratio", '
        '"finetune_seconds", "total_seconds" (the whole job that made the model, in the run\'s cost '
        "basis)}",
    )
    return p


def auto_jobs(threads: int) -> int:
    """Stages at a time by default: one per ``threads`` usable cores on a CPU, at most 4 (each worker
    holds its own copy of the data and canvases; measured only up to 2); 1 where a GPU or torchrun's
    ranks run them."""
    import os

    import torch

    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores // max(threads, 1)))


def _config(args) -> dict:
    cfg = {k: getattr(args, k) for k in CONFIG_KEYS}
    if cfg["threads"] < 1:
        raise LotusError(f"--threads: expected at least 1, got {cfg['threads']}")
    if cfg["jobs"] is None:
        cfg["jobs"] = auto_jobs(cfg["threads"])
    for k, what in (
        ("jobs", "at least 1"),
        ("workers", "at least 0"),
        ("batch_size", "at least 1"),
        ("eval_batch_size", "at least 1"),
        ("finetune_batch_size", "at least 1"),
    ):
        lo = 0 if k == "workers" else 1
        if cfg[k] is not None and cfg[k] < lo:
            raise LotusError(f"--{k.replace('_', '-')}: expected {what}, got {cfg[k]}")
    if cfg["clip_grad"] is not None and cfg["clip_grad"] < 0:
        raise LotusError(f"--clip-grad: expected a norm >= 0 (0: no clipping), got {cfg['clip_grad']}")
    if cfg["img_size"] is not None and cfg["img_size"] < 1:
        raise LotusError(f"--img-size: expected a positive size, got {cfg['img_size']}")
    for k in ("data", "checkpoint", "data_root"):
        if cfg[k] and cfg[k] != "cifar10":
            cfg[k] = str(Path(cfg[k]).resolve())
    return cfg


def _create(args):
    """Validate everything that can be wrong (data, tasks, canvas, model, checkpoint), then create the run dir."""
    from . import data as data_mod
    from . import model as model_mod
    from . import recipe, task
    from .canvas import check_size
    from .prune import check_layout
    from .rundir import RunDir

    if not args.data:
        raise LotusError("--data: required (FILE.npz, cifar10 or an ImageFolder directory)")
    if not args.out:
        raise LotusError("--out: required (a new run directory), or --resume RUN_DIR")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LotusError(
            f"--out: {out} already exists and is not empty; pass --resume {out} to continue "
            "that run, or choose a new directory"
        )
    cfg = recipe.resolve(_config(args))
    sources = data_mod.open_sources(cfg)
    cfg["num_classes"] = sources[0].num_classes
    native = sources[0].native_size
    cfg["image_side"] = native
    if cfg["canvas"] is None:
        cfg["canvas"] = 2 * native if cfg["recipe"] == "scratch" and native else 0
    if cfg["canvas"]:
        if not native:
            raise LotusError("--canvas: needs images held in memory (a .npz file or cifar10), not an ImageFolder")
        check_size(cfg["canvas"], native)
        if cfg["canvas_tile"] is not None and not 0 < cfg["canvas_tile"] <= native:
            raise LotusError(f"--canvas-tile: expected 1..{native} (the image side), got {cfg['canvas_tile']}")
    task.resolve_classes(cfg, cfg["num_classes"])
    _check_options(cfg)
    size = cfg["img_size"]
    if size is None and cfg["model"] == model_mod.DEFAULT_MODEL:
        size = cfg["canvas"] or native or 32
    if cfg["patch_size"] is None:
        cfg["patch_size"] = max(1, int(size or 32) // 8)  # lotus_vit: an 8 x 8 patch grid
    model = model_mod.build(cfg, len(cfg["target_classes"]), size)  # fails here on a bad --model / --checkpoint
    task.check_source(cfg)
    check_layout(model, cfg["layout"], cfg["block_size"])  # a block size that does not divide a layer
    cfg["img_size"] = int(model.patch_embed.img_size[0])
    cfg["data_config"] = model_mod.data_config(model, cfg)
    del model
    # fails here on a bad --limit / --val-fraction / --select-fraction / class list
    split = data_mod.load_split(cfg, sources)
    task.target_sets(cfg, split)
    task.source_sets(cfg, split)
    return RunDir.create(out, cfg)


def _check_options(cfg: dict) -> None:
    """Every option that can be wrong without looking at the model, as one-line LotusErrors."""
    from .finetune import parse_arm
    from .prune import LAYOUTS, SCORES
    from .tickets import POLICIES, SINKS

    keeps = cfg["compare_keeps"]
    if any(not 0 < k <= 1 for k in keeps):
        raise LotusError(f"--compare-keeps: expected keep ratios in (0, 1], got {keeps}")
    if any(not 0 <= s < 1 for s in cfg["sweep"]) or not any(s > 0 for s in cfg["sweep"]):
        raise LotusError(f"--sweep: expected sparsities in [0, 1), at least one above 0, got {cfg['sweep']}")
    if any(not 0 < s < 1 for s in cfg["compare_sparsities"]):
        raise LotusError(f"--compare-sparsities: expected sparsities in (0, 1), got {cfg['compare_sparsities']}")
    if cfg["isp_rounds"] < 1 or cfg["isp_copies"] < 1 or cfg["instant_copies"] < 1:
        raise LotusError("--isp-rounds / --isp-copies / --instant-copies: expected at least 1")
    if cfg["layout"] not in LAYOUTS:
        raise LotusError(f"--layout: expected one of {', '.join(LAYOUTS)}, got {cfg['layout']!r}")
    if cfg["block_score"] not in ("auto", *SCORES):
        raise LotusError(f"--block-score: expected auto, {', '.join(SCORES)}, got {cfg['block_score']!r}")
    if cfg["sink"] not in (*SINKS, "auto"):
        raise LotusError(f"--sink: expected one of {', '.join(SINKS)}, auto; got {cfg['sink']!r}")
    bad = [p for p in cfg["policies"] if p not in POLICIES]
    if bad:
        raise LotusError(f"--policies: unknown {', '.join(bad)}; expected some of {', '.join(POLICIES)}")
    if cfg["isp_recipe"] not in ("ours", "instant-soup"):
        raise LotusError(f"--isp-recipe: expected ours or instant-soup, got {cfg['isp_recipe']!r}")
    if cfg["isp_recipe"] == "instant-soup" and not cfg["instant_soup"]:
        raise LotusError("--isp-recipe instant-soup: not with --no-instant-soup")
    if not 0 <= cfg["select_fraction"] < 1:
        raise LotusError(f"--select-fraction: expected a fraction in [0, 1), got {cfg['select_fraction']}")
    for k in ("seeds", "main_seeds", "prune_seeds"):
        if cfg[k] < 1:
            raise LotusError(f"--{k.replace('_', '-')}: expected at least 1, got {cfg[k]}")
    if cfg["matched_steps"] is not None and cfg["matched_steps"] < 1:
        raise LotusError(f"--matched-steps: expected at least 1, got {cfg['matched_steps']}")
    if cfg["isp_recipe"] == "instant-soup" and cfg["layout"] == "2:4":
        raise LotusError("--isp-recipe instant-soup: Instant Soup prunes in 10% steps; not with --layout 2:4")
    try:
        head = parse_arm(cfg["headline"])
    except ValueError as e:
        raise LotusError(f"--headline: {e}")
    if head["layout"] not in ("dense", "unstructured", cfg["layout"]):
        raise LotusError(
            f"--headline: {cfg['headline']} prunes in layout {head['layout']}, but this run prunes "
            f"unstructured and --layout {cfg['layout']}"
        )
    if not 0 <= cfg["mix_top"] <= 1:
        raise LotusError(f"--mix-top: expected a fraction in [0, 1], got {cfg['mix_top']}")
    for arm in cfg["arms"] or ():
        try:
            spec = parse_arm(arm)
        except ValueError as e:
            raise LotusError(f"--arms: {e}")
        if spec["layout"] not in ("dense", "unstructured", cfg["layout"]):
            raise LotusError(
                f"--arms: {arm} prunes in layout {spec['layout']}, but this run prunes "
                f"unstructured and --layout {cfg['layout']}"
            )
        if spec["method"] == "instant" and not cfg["instant_soup"]:
            raise LotusError(f"--arms: {arm} starts from Instant Soup, which --no-instant-soup skips")
        if spec["method"] == "instant" and spec["layout"] != "unstructured" and cfg["isp_recipe"] != "instant-soup":
            raise LotusError(f"--arms: {arm}: Instant Soup prunes {spec['layout']} only with --isp-recipe instant-soup")


def _create_once(args):
    """Under torchrun rank 0 validates and creates the run directory, the other ranks open it."""
    from .rundir import RunDir
    from .train import barrier, is_main

    run = _create(args) if is_main() else None
    barrier()
    return run if run is not None else RunDir.open(args.out)


def _evaluate(args) -> None:
    import torch

    from . import cost, pipeline, plan, task
    from .rundir import RunDir
    from .train import evaluate

    run = RunDir.open(args.run_dir)
    cfg = run.config()
    pipeline.setup(cfg)
    images = task.eval_set(args.data, cfg)  # the target classes, through the run's data config (and canvas)
    ratios = run.result("timing")["ratio_to_dense"] if run.done("timing") else {}
    basis = cfg.get("cost_basis", "cpu")
    models = []
    if run.done("probe"):
        models.append(("start", "start", None, "models/start.pt"))
    for k in range(plan.max_seeds(cfg)):
        for arm in plan.arms(cfg):
            if run.done(f"finetune/{arm}/s{k}"):
                models.append((f"{arm}#s{k}", arm, k, f"models/finetune/{arm}/s{k}.pt"))
    if len(models) < 2:
        raise LotusError(f"run directory: {args.run_dir} holds no fine-tuned model yet (run `lotus finetune` first)")
    out = {}
    for key, arm, k, path in models:
        model = pipeline.load_model(run, cfg, path)
        with torch.no_grad():
            acc = evaluate(model, images, batch_size=cfg["eval_batch_size"]) / 100.0
        job = cost.job(run, cfg, arm, k or 0)["total"][basis]
        if arm == "start":
            row = {"layout": "dense", "sparsity": 0.0, "keep": 1.0, "step_ratio": None, "finetune_seconds": 0.0}
        else:
            r = run.result(f"finetune/{arm}/s{k}")
            row = {
                "layout": r["layout"],
                "sparsity": r["sparsity"],
                "keep": r["keep"],
                "step_ratio": ratios.get(arm, ratios.get("dense/full") if arm in plan.MATCHED else None),
                "finetune_seconds": r["cost"][basis],
            }
        out[key] = {"arm": arm, "seed": k, "accuracy": acc, "n": len(images), **row, "total_seconds": job}
    if args.json:
        print(json.dumps(out))
    else:
        for name, r in out.items():
            ratio = "—" if r["step_ratio"] is None else f"{r['step_ratio']:.2f}x"
            print(
                f"{name:36s} {100 * r['accuracy']:6.2f}%  (n={r['n']}, {r['layout']} sparsity {r['sparsity']:.3f}, "
                f"keep {r['keep']:g}, step {ratio}, job {r['total_seconds']:.1f} s {basis})"
            )


def _main(argv) -> None:
    args = parser().parse_args(argv)
    from . import pipeline
    from .rundir import RunDir
    from .train import init_distributed, is_main

    init_distributed()
    if args.command == "run":
        if args.resume:
            if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
                raise LotusError("--out / --resume: give one of them (--resume continues RUN_DIR in place)")
            run = RunDir.open(args.resume)
            if is_main():
                run.remove_stale_temporaries()
        else:
            run = _create_once(args)
        pipeline.run_all(run)
        print(f"lotus: done: {run.root / 'report.md'}")
    elif args.command == "pretrain":
        pipeline.run_all(_create_once(args), stages=("pretrain", "probe"))
    elif args.command in ("score", "report"):
        pipeline.run_all(RunDir.open(args.run_dir), stages=(args.command,), redo=args.redo)
    elif args.command == "prune":
        pipeline.run_all(RunDir.open(args.run_dir), stages=("prune",), redo=args.redo)
    elif args.command == "finetune":
        pipeline.run_all(RunDir.open(args.run_dir), stages=("finetune",), redo=args.redo, only=args.only)
    elif args.command == "evaluate":
        _evaluate(args)


def _missing_extras() -> list[str]:
    """The pipeline's packages beyond the kernels' (pip's ``lotus-kernels[lotus]`` extra) that are absent."""
    import importlib.util

    return [m for m in ("timm", "torchvision", "matplotlib") if importlib.util.find_spec(m) is None]


def main(argv=None) -> None:
    missing = _missing_extras()
    if missing:
        print(
            f"lotus: error: the pipeline needs {', '.join(missing)}: install the torchvision that matches your "
            f"torch, then `pip install --no-build-isolation 'lotus-kernels[lotus]'`",
            file=sys.stderr,
        )
        raise SystemExit(2)
    try:
        _main(sys.argv[1:] if argv is None else argv)
    except LotusError as e:
        print(f"lotus: error: {(str(e).splitlines() or [''])[0]}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("lotus: interrupted (continue with `lotus run --resume RUN_DIR`)", file=sys.stderr)
        raise SystemExit(130)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

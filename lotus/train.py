"""The one training / evaluation loop every stage uses (pretrain, ISP weak copies, fine-tuning).

AdamW or SGD (timm's optimizer factory: no weight decay on biases, norms and embeddings), per-step
cosine schedule with linear warm-up, optional gradient clipping and bf16 autocast, evaluation after
every epoch, and three kinds of training data: full images, per-image kept patches (``keep_idx``
[N, K], the attention tickets, via ``patch_vit``), or timm's random ``PatchDropout``.

Batches come from ``data.loader`` (a DataLoader over the set, ids included, so ``keep_idx`` is
indexed by image id) and become model input on the device through ``data.prepare``.

DDP-aware (``torchrun``): each rank loads its share of every global batch and each rank's loss is
its sum of per-sample losses over the *global* batch size times the world size, so DDP's gradient
average equals the single-process gradient of the global batch mean, shards even or not.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import PatchDropout
from tqdm.auto import tqdm

from .data import ImageSet, loader, my_positions


# ---------------------------------------------------------------- distributed
def init_distributed() -> None:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def world() -> tuple[int, int]:
    """(rank, world size)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _batches(data: ImageSet, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, whole: bool = False):
    """This rank's batches of ``data`` (uint8 images, labels, ids); see ``data.loader``. ``whole``:
    every image on this process (a per-image record made by one rank)."""
    rank, size = (0, 1) if whole else world()
    return loader(
        data,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world=size,
        pin_memory=torch.cuda.is_available(),
    )


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, data: ImageSet, *, batch_size: int = 256, bf16: bool = False, desc: str | None = None) -> float:
    """Top-1 accuracy (%) on ``data`` with every patch (ranks share the work)."""
    dev = device()
    was_training = model.training
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64)
    for xb, yb, _ in tqdm(
        _batches(data, batch_size, shuffle=False), desc=desc, leave=False, disable=None if is_main() else True
    ):
        x = data.prepare(xb, dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            pred = model(x).argmax(dim=1).cpu()
        correct[0] += (pred == yb).sum()
        correct[1] += len(yb)
    if world()[1] > 1:
        dist.all_reduce(correct)
    model.train(was_training)
    return 100.0 * float(correct[0]) / max(float(correct[1]), 1.0)


@torch.no_grad()
def predict(model, data: ImageSet, *, batch_size: int = 256, bf16: bool = False) -> torch.Tensor:
    """Predicted class of every image of ``data`` in image order (int64 [N], all patches, one
    process: every image, no rank shares, no collective calls): the per-image record that paired
    tests between two models need (``lotus.stats``)."""
    dev = device()
    was_training = model.training
    model.eval()
    out = []
    for xb, _, _ in _batches(data, batch_size, shuffle=False, whole=True):
        x = data.prepare(xb, dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(model(x).argmax(dim=1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


# ---------------------------------------------------------------- training
def lr_at(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


AUGMENTS = ("none", "flip", "flip_shift")


def augment_batch(
    x: torch.Tensor,
    gen: torch.Generator,
    shift: int = 4,
    positions: torch.Tensor | None = None,
    total: int | None = None,
    *,
    return_flips: bool = False,
):
    """Random horizontal flips and translations by up to ``shift`` pixels (zero fill, i.e. the mean
    after normalisation; ``shift=0``: flips only), drawn from ``gen`` for the whole global batch of
    ``total`` images (default ``len(x)``), of which ``x`` holds the ``positions`` (default all): DDP
    ranks, each holding its share, see what one process would. ``return_flips``: also the bool [B]
    of the images flipped (to mirror a ticket's patch indices, ``flip_patch_indices``)."""
    b, _, h, w = x.shape
    total = b if total is None else total
    flip = torch.rand(total, generator=gen) < 0.5
    off = torch.randint(0, 2 * shift + 1, (2, total), generator=gen)
    if positions is not None:
        flip, off = flip[positions], off[:, positions]
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    if shift:
        padded = F.pad(x, (shift,) * 4)
        off = off.tolist()
        x = torch.stack([padded[i, :, off[0][i] : off[0][i] + h, off[1][i] : off[1][i] + w] for i in range(b)])
    return (x, flip) if return_flips else x


def flip_patch_indices(idx: torch.Tensor, flips: torch.Tensor, grid_w: int) -> torch.Tensor:
    """Patch indices [B, K] (row-major on a grid ``grid_w`` patches wide) of the images as they
    were, moved to where those patches are once the rows in ``flips`` [B] are mirrored left-right:
    column c becomes ``grid_w - 1 - c``. (Shifts by a fraction of a patch have no such map.)"""
    col = idx % grid_w
    mirrored = idx - col + (grid_w - 1 - col)
    return torch.where(flips.to(idx.device)[:, None], mirrored, idx)


def _augment_mode(augment) -> str:
    mode = ("flip_shift" if augment else "none") if isinstance(augment, bool) else augment
    if mode not in AUGMENTS:
        raise ValueError(f"augment: expected a bool or one of {', '.join(AUGMENTS)}, got {augment!r}")
    return mode


OPTIMIZERS = {"adamw": "adamw", "sgd": "momentum"}  # ours -> timm's name (SGD: momentum 0.9, not Nesterov)


def make_optimizer(model, name: str, lr: float, weight_decay: float):
    """timm's optimizer factory: weight decay on weight matrices only (not on biases, norms, the
    class token or position embeddings, the usual ViT recipe)."""
    from timm.optim import create_optimizer_v2

    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {sorted(OPTIMIZERS)}, got {name!r}")
    return create_optimizer_v2(model, opt=OPTIMIZERS[name], lr=lr, weight_decay=weight_decay, momentum=0.9)


def optimizer_params(model, weight_decay: float) -> list:
    """The parameters in the order ``make_optimizer``'s state_dict numbers them: timm's factory puts
    undecayed then decayed parameters in two groups when weight_decay > 0, so this is not
    ``model.parameters()``'s order."""
    return [p for g in make_optimizer(model, "sgd", 0.0, weight_decay).param_groups for p in g["params"]]


def train(
    model,
    train_data: ImageSet,
    val_data: ImageSet | None,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    optimizer: str = "adamw",
    weight_decay: float = 0.05,
    warmup: float = 0.1,
    bf16: bool = False,
    keep_idx: torch.Tensor | None = None,
    patch_drop_keep: float | None = None,
    eval_batch_size: int = 256,
    augment: bool = False,
    clip_grad: float | None = None,
    desc: str = "train",
    keep_fn=None,
    optimizer_state: dict | None = None,
    steps: int | None = None,
    schedule: tuple[int, int] | None = None,
) -> dict:
    """Train ``model`` in place; returns the history (val accuracy per epoch, losses, step times).

    keep_idx         [len(train_data), K] int64: image i trains on its patches keep_idx[i] only
    patch_drop_keep  keep ratio of timm's random PatchDropout (training only), the random baseline
    augment          ``"flip_shift"`` (or True): random flips and shifts by 1/8 of the image side
                     (``augment_batch``); ``"flip"``: flips only; ``"none"`` (or False). Patch indices
                     that refer to the unaugmented image (keep_idx, a keep_fn with ``image_frame``
                     True: a ticket table) are mirrored with the image under ``"flip"``; shifts move
                     patches by a fraction of a patch, so ``"flip_shift"`` is refused with them
    clip_grad        clip the global gradient norm to this value (None: no clipping)
    keep_fn          ``keep_fn(x, ids)`` -> keep_idx [B, K] (or None: all patches) per step, from the
                     batch as the model sees it (normalised, augmented if ``augment``) and the images'
                     ids in ``train_data`` (this rank's share of the batch): a ticket policy decided
                     on the fly (``lotus.tickets``). If it has a ``new_epoch(model, epoch)`` method,
                     that runs before each epoch (its time counts in ``hist["train_s"]``, e.g.
                     re-scoring every image)
    optimizer_state  a dict carried between calls: loaded into the new optimizer when non-empty,
                     replaced by the optimizer's state at the end (Instant Soup's main model)
    steps            stop after this many optimizer steps (the cosine schedule spans them; epochs is
                     then ignored): a compute-matched run
    schedule         (offset, total): step i uses the learning rate of step offset + i of a schedule of
                     ``total`` steps (warm-up ``warmup * total``), so several calls continue one
                     schedule (Instant Soup's main model); ``hist["steps"]`` says how far this call went

    ``hist["train_s"]`` / ``hist["train_cpu_s"]``: wall / process CPU seconds spent training (batch
    loading, steps, ``keep_fn.new_epoch``), evaluation excluded.
    """
    if sum(v is not None for v in (keep_idx, patch_drop_keep, keep_fn)) > 1:
        raise ValueError("keep_idx / patch_drop_keep / keep_fn: choose one way of dropping patches")
    mode = _augment_mode(augment)
    image_frame = keep_idx is not None or getattr(keep_fn, "image_frame", False)
    if mode == "flip_shift" and image_frame:
        raise ValueError(
            "augment: flips + shifts not with tickets of the unaugmented image (keep_idx or a fixed "
            "ticket table; a shift moves patches by a fraction of a patch): use 'flip'"
        )
    if keep_idx is not None and keep_idx.shape[0] != len(train_data):
        raise ValueError(f"keep_idx: expected one row per training image ({len(train_data)}), got {keep_idx.shape[0]}")
    aug_gen = torch.Generator().manual_seed(seed + 1)
    shift = max(1, train_data.img_size // 8)
    # patches per row (square grid, as the pipeline's object cover), needed only to mirror tickets
    grid_w = train_data.img_size // model.patch_embed.patch_size[0] if image_frame and mode == "flip" else 0
    torch.manual_seed(seed)  # PatchDropout draws from the global generator
    dev = device()
    model.to(dev).train()
    rank, size = world()
    saved_patch_drop = model.patch_drop
    if patch_drop_keep is not None and patch_drop_keep < 1:
        model.patch_drop = PatchDropout(1.0 - patch_drop_keep, num_prefix_tokens=model.num_prefix_tokens)
    net = model
    if size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = make_optimizer(model, optimizer, lr, weight_decay)
    if optimizer_state:
        opt.load_state_dict(optimizer_state)
    n = len(train_data)
    steps_per_epoch = math.ceil(n / batch_size)
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps: expected at least 1, got {steps}")
        epochs = math.ceil(steps / steps_per_epoch)
    last = epochs * steps_per_epoch if steps is None else steps
    offset, total = schedule if schedule is not None else (0, last)
    warm = round(warmup * total)
    hist = {
        "epoch": [],
        "val_acc": [],
        "train_loss": [],
        "step_time_s": None,
        "images_per_s": None,
        "epoch_wall": [],
        "epoch_cpu": [],
    }
    times, step = [], 0
    spent = {"wall": 0.0, "cpu": 0.0}  # training time, evaluation excluded
    seen = torch.zeros(size, dtype=torch.float64)  # images each rank trained on (its shard of every batch)
    try:
        for epoch in range(epochs):
            w0, c0 = time.perf_counter(), time.process_time()
            if hasattr(keep_fn, "new_epoch"):
                keep_fn.new_epoch(model, epoch)
                model.train()
            batches = _batches(train_data, batch_size, shuffle=True, seed=seed, epoch=epoch)
            bar = tqdm(batches, desc=f"{desc} {epoch + 1}/{epochs}", leave=False, disable=None if rank == 0 else True)
            loss_sum = torch.zeros(2, dtype=torch.float64)
            for b, (xb, yb, ids) in enumerate(bar):
                if step >= last:
                    break
                start = b * batch_size
                n_global = min(batch_size, n - start)  # this global batch, all ranks together
                t0 = time.perf_counter()
                for g in opt.param_groups:
                    g["lr"] = lr_at(offset + step, total, lr, warm)
                x = train_data.prepare(xb, dev)
                flips = None
                if mode != "none":
                    x, flips = augment_batch(
                        x,
                        aug_gen,
                        shift if mode == "flip_shift" else 0,
                        positions=my_positions(start, n_global, rank, size),
                        total=n_global,
                        return_flips=True,
                    )
                y = yb.to(dev, non_blocking=True)
                k = keep_idx[ids] if keep_idx is not None else None
                if keep_fn is not None:  # tickets are indexed by image id
                    k = keep_fn(x, ids)
                if k is not None and flips is not None and image_frame:
                    k = flip_patch_indices(k, flips, grid_w)
                kwargs = {} if k is None else {"keep_idx": k.to(dev)}
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = net(x, **kwargs)
                loss = F.cross_entropy(logits.float(), y, reduction="sum") * (size / n_global)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
                opt.step()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                loss_sum += torch.tensor([float(loss.detach()) * n_global / size, len(ids)], dtype=torch.float64)
                seen[rank] += len(ids)
                step += 1
            spent["wall"] += time.perf_counter() - w0
            spent["cpu"] += time.process_time() - c0
            hist["epoch_wall"].append(spent["wall"])  # cumulative training seconds at each epoch's end
            hist["epoch_cpu"].append(spent["cpu"])
            if size > 1:
                dist.all_reduce(loss_sum)
            hist["epoch"].append(epoch + 1)
            hist["train_loss"].append(float(loss_sum[0] / loss_sum[1]))
            if val_data is not None:
                acc = evaluate(model, val_data, batch_size=eval_batch_size, bf16=bf16, desc="eval")
                hist["val_acc"].append(acc)
                if rank == 0:
                    tqdm.write(
                        f"  {desc} epoch {epoch + 1}/{epochs}: loss {hist['train_loss'][-1]:.3f}, val acc {acc:.2f}%"
                    )
    finally:
        model.patch_drop = saved_patch_drop
    if size > 1:
        dist.all_reduce(seen)
    hist["world_size"], hist["images_per_rank"] = size, [int(v) for v in seen]
    if optimizer_state is not None:
        optimizer_state.clear()
        optimizer_state.update(opt.state_dict())
    hist["train_s"], hist["train_cpu_s"], hist["steps"] = spent["wall"], spent["cpu"], step
    steady = times[1:] if len(times) > 1 else times
    if steady:
        hist["step_time_s"] = statistics.median(steady)
        hist["images_per_s"] = batch_size / hist["step_time_s"]
    return hist


def epochs_to_within(accs: list[float], points: float = 1.0) -> int | None:
    """First epoch (1-based) whose accuracy is within ``points`` of the final one."""
    if not accs:
        return None
    return next(i + 1 for i, a in enumerate(accs) if a >= accs[-1] - points)


def time_steps(
    setups: dict,
    data: ImageSet,
    *,
    batch_size: int,
    rounds: int,
    seed: int,
    optimizer: str = "adamw",
    lr: float = 1e-4,
    bf16: bool = False,
) -> dict:
    """Median seconds of one training step per configuration, measured in interleaved rounds on one
    fixed batch so that a busy machine slows every configuration alike.

    setups: name -> (model or a function building it, {"keep_idx": [N, K] | None, "patch_drop_keep":
    float | None, "keep_fn": callable | None, "make_keep_fn": model -> keep_fn | None}), where
    ``make_keep_fn`` builds a policy for the model of this turn (one that scores with the model it
    trains). A function is called afresh in every round and its model dropped after its steps, so
    only one model and optimizer are alive at a time (a ViT-B with AdamW state is ~1 GB); a model
    given as such is trained in place (pass a copy). Each turn runs one untimed warm-up step
    (optimizer state, allocator) and one timed step; a ``keep_fn`` policy decides inside the step,
    so its time is part of the step's."""
    dev = device()
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:batch_size]
    xb, yb, ids = data.__getitems__(idx.tolist())
    x, y = data.prepare(xb, dev), yb.to(dev)
    held_opts: dict = {}
    times: dict = {n: [] for n in setups}
    torch.manual_seed(seed)
    for _ in range(max(rounds, 1)):
        for name, (made, kw) in setups.items():
            model = made if isinstance(made, torch.nn.Module) else made()
            model.to(dev).train()
            if isinstance(made, torch.nn.Module):
                opt = held_opts.setdefault(name, make_optimizer(model, optimizer, lr, 0.0))
            else:
                opt = make_optimizer(model, optimizer, lr, 0.0)
            keep_fn = kw["make_keep_fn"](model) if kw.get("make_keep_fn") is not None else kw.get("keep_fn")
            saved = model.patch_drop
            if kw.get("patch_drop_keep") is not None and kw["patch_drop_keep"] < 1:
                model.patch_drop = PatchDropout(1.0 - kw["patch_drop_keep"], num_prefix_tokens=model.num_prefix_tokens)
            kwargs = {} if kw.get("keep_idx") is None else {"keep_idx": kw["keep_idx"][ids].to(dev)}
            for timed in (False, True):
                t0 = time.perf_counter()
                if keep_fn is not None:  # a policy deciding per step: its time is part of the step
                    k = keep_fn(x, ids)
                    kwargs = {} if k is None else {"keep_idx": k.to(dev)}
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = F.cross_entropy(model(x, **kwargs).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if timed:
                    times[name].append(time.perf_counter() - t0)
            model.patch_drop = saved
            del model, opt, loss, keep_fn
    return {n: statistics.median(t) for n, t in times.items()}

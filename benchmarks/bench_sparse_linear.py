"""Unstructured-sparse linear layers: dense nn.Linear vs torch.nn.utils.prune vs lotus MaskedLinear.

    PYTHONPATH=. python benchmarks/bench_sparse_linear.py            # ViT-S shapes -> results/sparse_linear.*
    PYTHONPATH=. python benchmarks/bench_sparse_linear.py --quick    # smoke run -> results/sparse_linear_quick.*

Sections: (a) one layer, forward + backward, at the ViT-S MLP shapes (M = batch * 197 tokens,
384 -> 1536 and 1536 -> 384); (b) a timm ViT train step (forward, backward, SGD step). Every config
of a section starts from the same weights and prunes the same fraction of the same layers by
magnitude; the configs of a section are timed interleaved.
"""
from __future__ import annotations

import argparse
import copy

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import lotus_kernels
from lotus_kernels.nn import MaskedLinear

try:
    from benchmarks import _harness
except ImportError:  # run as a script from outside the repo root's sys.path
    import _harness

TARGET_TRAIN = 1.03  # wanted MaskedLinear train-step time / dense
METHODS = ("dense", "torch_prune", "lotus")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=197, help="rows per image in the layer section")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--layer-repeats", type=int, default=30)
    p.add_argument("--step-repeats", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    _harness.add_run_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.tokens, args.dim, args.hidden = "vit_tiny_patch16_224", 16, 32, 128
        args.layer_repeats = args.step_repeats = 2
        args.warmup = 1
    return args


def stat_row(stats, times, name, **extra):
    s = stats[name]
    return {**extra, "config": name, "median_ms": 1e3 * s["median_s"], "p25_ms": 1e3 * s["p25_s"],
            "p75_ms": 1e3 * s["p75_s"], "min_ms": 1e3 * s["min_s"], "ratio": s["ratio"],
            "ratio_paired": s["ratio_paired"], "times_ms": [1e3 * t for t in times[name]]}


# ---------------------------------------------------------------- (a) one layer
def layer_configs(in_f, out_f, m, sparsity, device):
    base = nn.Linear(in_f, out_f, device=device)
    x = torch.randn(m, in_f, device=device, requires_grad=True)
    g = torch.randn(m, out_f, device=device)
    layers = {"dense": copy.deepcopy(base), "torch_prune": copy.deepcopy(base)}
    prune.l1_unstructured(layers["torch_prune"], "weight", amount=sparsity)
    layers["lotus"] = MaskedLinear.from_linear(base, layers["torch_prune"].weight_mask.bool())  # same mask

    def make(layer):
        def fn():
            layer(x).backward(g)
            layer.zero_grad(set_to_none=True)
            x.grad = None
        return fn
    density = layers["lotus"].density
    return {name: make(layer) for name, layer in layers.items()}, density


def run_layers(args, device, sync):
    rows = []
    m = args.batch * args.tokens
    for in_f, out_f in ((args.dim, args.hidden), (args.hidden, args.dim)):
        shape = f"{m}x{in_f}->{out_f}"
        configs, density = layer_configs(in_f, out_f, m, args.sparsity, device)
        print(f"[layer {shape}] timing {len(configs)} configs x {args.layer_repeats} rounds ...", flush=True)
        times = _harness.interleaved(configs, args.warmup, args.layer_repeats, progress=not args.no_progress, sync=sync)
        stats = _harness.summarize(times, "dense")
        rows += [stat_row(stats, times, name, section="layer fwd+bwd", shape=shape, density=density,
                          target=None) for name in METHODS]
    return rows


# ---------------------------------------------------------------- (b) train step
def train_configs(base, images, labels, sparsity):
    """name -> (step fn, model). All three start from ``base``'s weights; the pruned two prune the
    layers ``sparsify_`` targets (every Linear but the head) globally by |w|."""
    lotus = lotus_kernels.sparsify_(copy.deepcopy(base), sparsity=sparsity)
    names = [n for n, mod in lotus.named_modules() if isinstance(mod, MaskedLinear)]
    torch_pruned = copy.deepcopy(base)
    prune.global_unstructured([(torch_pruned.get_submodule(n), "weight") for n in names],
                              pruning_method=prune.L1Unstructured, amount=sparsity)
    n_lotus = sum(int((~lotus.get_submodule(n).mask).sum()) for n in names)
    n_torch = sum(int((torch_pruned.get_submodule(n).weight_mask == 0).sum()) for n in names)
    assert n_lotus == n_torch, (n_lotus, n_torch)
    models = {"dense": copy.deepcopy(base).train(), "torch_prune": torch_pruned.train(), "lotus": lotus.train()}

    def make(model):
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def fn():
            F.cross_entropy(model(images), labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return fn
    total = sum(lotus.get_submodule(n).mask.numel() for n in names)
    return {name: make(m) for name, m in models.items()}, 1 - n_lotus / total, len(names)


def run_train(args, device, sync):
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).to(device)
    images = torch.randn(args.batch, 3, *base.patch_embed.img_size, device=device)
    labels = torch.randint(base.num_classes, (args.batch,), device=device)
    configs, density, n_layers = train_configs(base, images, labels, args.sparsity)
    print(f"[train {args.model}] timing {len(configs)} configs x {args.step_repeats} rounds ...", flush=True)
    times = _harness.interleaved(configs, args.warmup, args.step_repeats, progress=not args.no_progress, sync=sync)
    stats = _harness.summarize(times, "dense")
    shape = f"{args.model} b{args.batch} ({n_layers} linears)"
    return [stat_row(stats, times, name, section="train step", shape=shape, density=density,
                     target=TARGET_TRAIN if name == "lotus" else None) for name in METHODS]


# ---------------------------------------------------------------- report
def plot(rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["section"], r["shape"]) for r in rows))
    fig, ax = plt.subplots(figsize=(3 + 2.2 * len(groups), 4))
    width = 0.8 / len(METHODS)
    for j, method in enumerate(METHODS):
        for i, (section, shape) in enumerate(groups):
            r = next(r for r in rows if (r["section"], r["shape"], r["config"]) == (section, shape, method))
            dense = next(d for d in rows if (d["section"], d["shape"], d["config"]) == (section, shape, "dense"))
            x = i + (j - (len(METHODS) - 1) / 2) * width
            err = [[(r["median_ms"] - r["p25_ms"]) / dense["median_ms"]], [(r["p75_ms"] - r["median_ms"]) / dense["median_ms"]]]
            ax.bar(x, r["ratio"], width, yerr=err, capsize=3, color=f"C{j}", label=method if i == 0 else None)
            ax.text(x, r["ratio"] + 0.03, f"{r['ratio']:.2f}", ha="center", fontsize=8)
            if r["target"] is not None:
                ax.plot(x, r["target"], "r*", ms=10, label="target" if method == "lotus" else None)
    ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax.set_xticks(range(len(groups)), [f"{s}\n{sh}" for s, sh in groups], fontsize=8)
    ax.set_ylabel("median time / dense median")
    ax.set_ylim(0, max(1.4, 1.15 * max(r["ratio"] for r in rows)))
    ax.legend(fontsize=8, loc="upper left", ncol=4)
    ax.set_title(f"unstructured sparsity {rows[0]['sparsity']:g}: ratio to dense (IQR error bars)")
    return fig


COLUMNS = [("section", "section", ""), ("shape", "shape", ""), ("config", "config", ""),
           ("density", "density", ".3f"), ("median ms", "median_ms", ".2f"), ("p25 ms", "p25_ms", ".2f"),
           ("p75 ms", "p75_ms", ".2f"), ("min ms", "min_ms", ".2f"), ("ratio to dense", "ratio", ".3f"),
           ("paired ratio", "ratio_paired", ".3f"), ("target", "target", ".2f")]


def notes(rows):
    out = ["ratio to dense = median / dense median of the same section and shape; paired ratio = median "
           "over rounds of time / dense time in the same round; IQR = p25..p75 over rounds.",
           "torch_prune = torch.nn.utils.prune (l1_unstructured per layer, global_unstructured for the "
           "model): a forward pre-hook recomputes weight = weight_orig * weight_mask every call, and "
           "autograd masks the gradient through that product.",
           "lotus = MaskedLinear (sparsify_): the weight is stored already masked, the forward is the "
           "dense GEMM, the backward adds one in-place pass zeroing the weight gradient.",
           "density = kept weights / weights of the pruned layers (the head is not pruned)."]
    for r in rows:
        if r["target"] is not None:
            out.append(_harness.verdict(f"{r['section']} {r['config']}", r))
    return out


def main(argv=None):
    args = parse_args(argv)
    device, sync, meta = _harness.prepare(args)

    rows = run_layers(args, device, sync) + run_train(args, device, sync)
    for r in rows:
        r["sparsity"] = args.sparsity
    name = "sparse_linear_quick" if args.quick else "sparse_linear"
    title = (f"Sparse linear (unstructured {args.sparsity:g}): {args.model}, batch {args.batch}, "
             f"{meta['threads']} threads, {device}")
    md = _harness.write_results(name, meta, rows, COLUMNS, plot, title=title, notes=notes(rows))
    print(md)
    return rows


if __name__ == "__main__":
    main()

"""Sparse linear layers: dense nn.Linear vs torch.nn.utils.prune vs lotus MaskedLinear (unstructured),
and dense vs torch.nn.utils.prune / torch BSR vs lotus BlockSparseLinear (block).

    PYTHONPATH=. python benchmarks/bench_sparse_linear.py            # -> results/sparse_linear.*, block_sparse_linear.*
    PYTHONPATH=. python benchmarks/bench_sparse_linear.py --quick    # smoke run -> results/*_quick.*
    PYTHONPATH=. python benchmarks/bench_sparse_linear.py --sections block   # the block-sparse part only

Unstructured sections: (a) one layer, forward + backward, at the ViT-S MLP shapes (M = batch * 197
tokens, 384 -> 1536 and 1536 -> 384); (b) a timm ViT train step (forward, backward, SGD step). Every
config of a section starts from the same weights and prunes the same fraction of the same layers by
magnitude; the configs of a section are timed interleaved.

Block sections (block size 32), per dtype (fp32; bf16 = ``torch.autocast("cpu", torch.bfloat16)``
around dense and ours alike) and per thread count (``--threads-list 1,2``): (c) one layer at the
ViT-S and ViT-B MLP shapes (384 <-> 1536, 768 <-> 3072), densities 0.5 / 0.3 / 0.1 of blocks kept by
L2 norm, all densities of a (shape, dtype, threads) group timed interleaved: dense fwd+bwd, dense fwd
only, and in fp32 prune (the same block mask through torch.nn.utils.prune.custom_from_mask) and torch
BSR (``to_sparse_bsr``; forward only: it has no autograd for a BSR weight, so its ratio is to the
dense forward), then lotus BlockSparseLinear fwd+bwd; (d) the ViT-S train step: dense, block-sparse
MLP 50%, token keep 0.7 (``patch_vit``), both, block-sparse 50% on every linear (qkv, proj, fc1,
fc2; head dense), and keep 0.7 with that. Every row records its threads, dtype, achieved GFLOP/s
(useful FLOPs / median time) and which of our CPU kernel variants ran (``lk.cpu_kernel_path``);
the metadata records the CPU, its ISA flags, torch's CPU capability and MKL / oneDNN versions.
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
from lotus_kernels.nn import BlockSparseLinear, MaskedLinear

try:
    from benchmarks import _harness
except ImportError:  # run as a script from outside the repo root's sys.path
    import _harness

TARGET_TRAIN = 1.03  # wanted MaskedLinear train-step time / dense
METHODS = ("dense", "torch_prune", "lotus")
BLOCK_TARGETS = {0.5: 0.60, 0.3: 0.40, 0.1: 0.20}  # wanted BlockSparseLinear fwd+bwd time / dense
BLOCK_TRAIN_TARGET = 0.45  # keep 0.7 + 50% block-sparse MLP train step / dense
SECTIONS = ("unstructured", "block")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BSR_OPS = ("fwd", "bwd_input", "bwd_weight")


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
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: unstructured, block")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--densities", default="0.5,0.3,0.1", help="block densities (fraction of blocks kept)")
    p.add_argument(
        "--block-shapes",
        default="384x1536,1536x384,768x3072,3072x768",
        help="in x out of the block layer section (ViT-S and ViT-B MLP)",
    )
    p.add_argument("--block-model", default="vit_small_patch16_224")
    p.add_argument("--block-keep", type=float, default=0.7)
    p.add_argument("--dtypes", default="fp32,bf16", help="block sections: fp32 and/or bf16 (autocast)")
    p.add_argument(
        "--threads-list",
        default=None,
        help="block sections: comma-separated thread counts, each a group of its own (default: --threads)",
    )
    p.add_argument(
        "--short",
        action="store_true",
        help="the version `make bench` runs: ViT-S shapes only, 5 / 3 rounds; writes results/<name>_short.*",
    )
    _harness.add_run_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.tokens, args.dim, args.hidden = "vit_tiny_patch16_224", 16, 32, 128
        args.block_shapes, args.block_model = "64x128,128x64", "vit_tiny_patch16_224"
        args.layer_repeats = args.step_repeats = 2
        args.warmup = 1
    elif args.short:
        args.block_shapes, args.layer_repeats, args.step_repeats = "384x1536,1536x384", 5, 3
        args.dtypes = "fp32"
    args.sections = [x for x in args.sections.split(",") if x]
    bad = [x for x in args.sections if x not in SECTIONS]
    if bad:
        p.error(f"--sections: unknown {bad}; expected some of {SECTIONS}")
    args.densities = [float(d) for d in args.densities.split(",")]
    args.dtypes = [x for x in args.dtypes.split(",") if x]
    if set(args.dtypes) - set(DTYPES):
        p.error(f"--dtypes: expected some of {tuple(DTYPES)}, got {args.dtypes}")
    args.threads_list = (
        [int(t) for t in args.threads_list.split(",")]
        if args.threads_list
        else [args.threads if args.threads > 0 else torch.get_num_threads()]
    )
    args.block_shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.block_shapes.split(",")]
    return args


def stat_row(stats, times, name, **extra):
    s = stats[name]
    return {
        **extra,
        "config": name,
        "median_ms": 1e3 * s["median_s"],
        "p25_ms": 1e3 * s["p25_s"],
        "p75_ms": 1e3 * s["p75_s"],
        "min_ms": 1e3 * s["min_s"],
        "ratio": s["ratio"],
        "ratio_paired": s["ratio_paired"],
        "times_ms": [1e3 * t for t in times[name]],
    }


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
        rows += [
            stat_row(stats, times, name, section="layer fwd+bwd", shape=shape, density=density, target=None)
            for name in METHODS
        ]
    return rows


# ---------------------------------------------------------------- (b) train step
def train_configs(base, images, labels, sparsity):
    """name -> (step fn, model). All three start from ``base``'s weights; the pruned two prune the
    layers ``sparsify_`` targets (every Linear but the head) globally by |w|."""
    lotus = lotus_kernels.sparsify_(copy.deepcopy(base), sparsity=sparsity)
    names = [n for n, mod in lotus.named_modules() if isinstance(mod, MaskedLinear)]
    torch_pruned = copy.deepcopy(base)
    prune.global_unstructured(
        [(torch_pruned.get_submodule(n), "weight") for n in names], pruning_method=prune.L1Unstructured, amount=sparsity
    )
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
    return [
        stat_row(
            stats,
            times,
            name,
            section="train step",
            shape=shape,
            density=density,
            target=TARGET_TRAIN if name == "lotus" else None,
        )
        for name in METHODS
    ]


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
            err = [
                [(r["median_ms"] - r["p25_ms"]) / dense["median_ms"]],
                [(r["p75_ms"] - r["median_ms"]) / dense["median_ms"]],
            ]
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


COLUMNS = [
    ("section", "section", ""),
    ("shape", "shape", ""),
    ("config", "config", ""),
    ("density", "density", ".3f"),
    ("median ms", "median_ms", ".2f"),
    ("p25 ms", "p25_ms", ".2f"),
    ("p75 ms", "p75_ms", ".2f"),
    ("min ms", "min_ms", ".2f"),
    ("ratio to dense", "ratio", ".3f"),
    ("paired ratio", "ratio_paired", ".3f"),
    ("target", "target", ".2f"),
]


def notes(rows):
    out = [
        "ratio to dense = median / dense median of the same section and shape; paired ratio = median "
        "over rounds of time / dense time in the same round; IQR = p25..p75 over rounds.",
        "torch_prune = torch.nn.utils.prune (l1_unstructured per layer, global_unstructured for the "
        "model): a forward pre-hook recomputes weight = weight_orig * weight_mask every call, and "
        "autograd masks the gradient through that product.",
        "lotus = MaskedLinear (sparsify_): the weight is stored already masked, the forward is the "
        "dense GEMM, the backward adds one in-place pass zeroing the weight gradient.",
        "density = kept weights / weights of the pruned layers (the head is not pruned).",
    ]
    for r in rows:
        if r["target"] is not None:
            out.append(_harness.verdict(f"{r['section']} {r['config']}", r))
    return out


# ---------------------------------------------------------------- (c) block-sparse layer
def kernel_paths(dtype, bs) -> str:
    """Our CPU kernel variant per product, e.g. 'avx512_bf16' or 'fwd avx2, bwd_input avx2, ...'."""
    if not lotus_kernels.backends()["cpu"]:
        return "-"
    paths = [lotus_kernels.cpu_kernel_path(f"block_sparse_linear.{op}", dtype, bs) for op in BSR_OPS]
    return paths[0] if len(set(paths)) == 1 else ", ".join(f"{op} {p}" for op, p in zip(BSR_OPS, paths))


def block_layer_configs(in_f, out_f, m, densities, bs, device, dtype):
    """name -> fn for one shape: dense (fwd+bwd and fwd only), and per density the same block mask
    (largest-L2 blocks) through BlockSparseLinear (and in fp32 prune and torch BSR). bf16 runs every
    forward under torch.autocast, as a bf16 training step would."""
    base = nn.Linear(in_f, out_f, device=device)
    x = torch.randn(m, in_f, device=device, requires_grad=True)
    amp = dtype != torch.float32
    g = torch.randn(m, out_f, device=device, dtype=dtype)

    def train(layer):
        def fn():
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                y = layer(x)
            y.backward(g)
            layer.zero_grad(set_to_none=True)
            x.grad = None

        return fn

    dense = copy.deepcopy(base)
    configs = {"dense": train(dense)}

    def dense_fwd():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=amp):
            dense(x)

    configs["dense_fwd"] = dense_fwd
    kept = {}
    for d in densities:
        ours = BlockSparseLinear.from_linear(base, density=d, block_size=bs)
        kept[d] = ours.density
        if not amp:
            bm = ours.block_mask.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
            pruned = copy.deepcopy(base)
            prune.custom_from_mask(pruned, "weight", bm)
            w_bsr = ours.weight.detach().to_sparse_bsr((bs, bs))
            b = base.bias.detach()

            def bsr_fwd(w_bsr=w_bsr, b=b):
                with torch.no_grad():
                    torch.addmm(b[:, None], w_bsr, x.detach().t()).t()

            configs[f"torch_prune@{d:g}"] = train(pruned)
            configs[f"torch_bsr_fwd@{d:g}"] = bsr_fwd
        configs[f"lotus_block@{d:g}"] = train(ours)
    return configs, kept


def run_block_layers(args, device, sync, dtype_name, threads):
    rows = []
    dtype = DTYPES[dtype_name]
    m = args.batch * args.tokens
    for in_f, out_f in args.block_shapes:
        shape = f"{m}x{in_f}->{out_f}"
        configs, kept = block_layer_configs(in_f, out_f, m, args.densities, args.block_size, device, dtype)
        print(
            f"[block layer {shape} {dtype_name} {threads} threads] timing {len(configs)} configs x "
            f"{args.layer_repeats} rounds ...",
            flush=True,
        )
        times = _harness.interleaved(configs, args.warmup, args.layer_repeats, progress=not args.no_progress, sync=sync)
        stats = _harness.summarize(times, "dense")
        fwd = _harness.summarize(times, "dense_fwd")
        for name in configs:
            method, _, d = name.partition("@")
            d = float(d) if d else 1.0
            density = kept.get(d, 1.0)
            fwd_only = method in ("torch_bsr_fwd", "dense_fwd")
            flops = (2 if fwd_only else 6) * m * in_f * out_f * (density if method != "dense_fwd" else 1.0)
            row = stat_row(
                stats,
                times,
                name,
                section="block layer fwd+bwd",
                shape=shape,
                method=method,
                threads=threads,
                dtype=dtype_name,
                density=density,
                ideal=density,
                gflops=flops / stats[name]["median_s"] / 1e9,
                kernel=kernel_paths(dtype, args.block_size) if method == "lotus_block" else None,
                target=BLOCK_TARGETS.get(d) if method == "lotus_block" else None,
            )
            if fwd_only:  # forward only: compare with the dense forward
                row.update(
                    section="block layer fwd only", ratio=fwd[name]["ratio"], ratio_paired=fwd[name]["ratio_paired"]
                )
            rows.append(row)
    return rows


# ---------------------------------------------------------------- (d) block-sparse train step
def run_block_train(args, device, sync, dtype_name, threads):
    torch.manual_seed(0)
    dtype = DTYPES[dtype_name]
    amp = dtype != torch.float32
    base = timm.create_model(args.block_model, pretrained=False).to(device)
    images = torch.randn(args.batch, 3, *base.patch_embed.img_size, device=device)
    labels = torch.randint(base.num_classes, (args.batch,), device=device)
    dense = lotus_kernels.patch_vit(copy.deepcopy(base)).train()

    def sparse_model(include):
        model = lotus_kernels.sparsify_(
            copy.deepcopy(base), sparsity=0.5, layout="block", block_size=args.block_size, include=include
        )
        return lotus_kernels.patch_vit(model).train()

    mlp = sparse_model(["blocks.*.mlp.fc1", "blocks.*.mlp.fc2"])
    every = sparse_model(["blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2"])
    keep = args.block_keep

    def make(model, **kw):
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def fn():
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                loss = F.cross_entropy(model(images, **kw), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return fn

    # Two optimizers per model share its parameters: harmless for timing (SGD on the same tensors).
    configs = {
        "dense": make(dense),
        "block-sparse MLP 50%": make(mlp),
        f"keep {keep:g}": make(dense, keep_ratio=keep),
        f"keep {keep:g} + block-sparse MLP 50%": make(mlp, keep_ratio=keep),
        "block-sparse every linear 50%": make(every),
        f"keep {keep:g} + block-sparse every linear 50%": make(every, keep_ratio=keep),
    }
    print(
        f"[block train {args.block_model} {dtype_name} {threads} threads] timing {len(configs)} configs x "
        f"{args.step_repeats} rounds ...",
        flush=True,
    )
    times = _harness.interleaved(configs, args.warmup, args.step_repeats, progress=not args.no_progress, sync=sync)
    stats = _harness.summarize(times, "dense")
    shape = f"{args.block_model} b{args.batch}"
    rows = []
    for name in configs:
        target = BLOCK_TRAIN_TARGET if name.startswith("keep") and "every linear" in name else None
        rows.append(
            stat_row(
                stats,
                times,
                name,
                section="train step",
                shape=shape,
                method=name,
                threads=threads,
                dtype=dtype_name,
                density=None,
                ideal=None,
                gflops=None,
                kernel=kernel_paths(dtype, args.block_size) if "block" in name else None,
                target=target,
            )
        )
    return rows


def plot_block(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer = [r for r in rows if r["section"].startswith("block layer") and "@" in r["config"]]
    train = [r for r in rows if r["section"] == "train step"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    series = list(dict.fromkeys((r["shape"], r["dtype"], r["threads"]) for r in layer))
    styles = {"lotus_block": "o-", "torch_prune": "s--", "torch_bsr_fwd": "^:"}
    for j, (sh, dt, th) in enumerate(series):
        for method, style in styles.items():
            pts = sorted(
                (r["density"], r["ratio"])
                for r in layer
                if (r["shape"], r["dtype"], r["threads"], r["method"]) == (sh, dt, th, method)
            )
            if pts:
                ax.plot(*zip(*pts), style, color=f"C{j % 10}", label=f"{method} {sh} {dt} {th}t", ms=4)
    ds = sorted({r["density"] for r in layer} | {0.0, 1.0})
    ax.plot(ds, ds, "k-", lw=1, label="ideal (ratio = density)")
    for d, t in BLOCK_TARGETS.items():
        ax.plot(d, t, "r*", ms=10, label="target" if d == 0.5 else None)
    ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("density (fraction of 32x32 blocks kept)")
    ax.set_ylabel("median time / dense of the same dtype and threads")
    ax.set_ylim(0, max(1.2, 1.1 * max((r["ratio"] for r in layer), default=1)))
    ax.legend(fontsize=5, ncol=2)
    ax.set_title("block-sparse layer vs dense (fwd+bwd; torch_bsr: fwd / dense fwd)")
    ax = axes[1]
    for i, r in enumerate(train):
        ax.bar(i, r["ratio"], color=f"C{i % 10}")
        ax.text(i, r["ratio"] + 0.02, f"{r['ratio']:.2f}", ha="center", fontsize=6)
        if r["target"] is not None:
            ax.plot(i, r["target"], "r*", ms=10)
    ax.set_xticks(
        range(len(train)),
        [f"{r['config']} [{r['dtype']} {r['threads']}t]".replace(" + ", "\n+ ") for r in train],
        fontsize=5,
        rotation=90,
    )
    ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax.set_title(f"train step {train[0]['shape'] if train else ''}")
    return fig


BLOCK_COLUMNS = [
    ("section", "section", ""),
    ("threads", "threads", "d"),
    ("dtype", "dtype", ""),
    ("shape", "shape", ""),
    ("config", "config", ""),
    ("density", "density", ".3f"),
    ("median ms", "median_ms", ".2f"),
    ("p25 ms", "p25_ms", ".2f"),
    ("p75 ms", "p75_ms", ".2f"),
    ("GFLOP/s", "gflops", ".1f"),
    ("ratio", "ratio", ".3f"),
    ("paired ratio", "ratio_paired", ".3f"),
    ("ideal", "ideal", ".2f"),
    ("target", "target", ".2f"),
    ("our kernel", "kernel", ""),
]


def block_notes(rows, meta):
    out = [
        f"Machine: {meta.get('cpu_model')} ({meta.get('cpu_count')} CPUs; {', '.join(meta.get('cpu_flags', []))}); "
        f"torch's CPU capability {meta.get('torch_cpu_capability')}, MKL {meta.get('mkl', '?')}, oneDNN "
        f"{meta.get('onednn', '?')}; our kernels' ISA {meta.get('lotus_cpu_isa', '-')}. Dense GEMM speed, and "
        "so every ratio, depends on the CPU: on a CPU with two 512-bit FMA pipes MKL's fp32 GEMM runs AVX-512 "
        "at twice this machine's per-cycle rate, so numbers from one machine are not numbers for another.",
        "ratio = median / dense median of the same shape, dtype and thread count (fwd+bwd); for the fwd-only "
        "rows (dense_fwd, torch_bsr_fwd) the ratio is to the dense forward. ideal = density (FLOPs / dense "
        "FLOPs). GFLOP/s = useful FLOPs (2 per multiply-add of the stored blocks, 3 products fwd+bwd) / median.",
        "bf16 = torch.autocast('cpu', torch.bfloat16) around the forward of dense nn.Linear (oneDNN bf16 GEMM) "
        "and of BlockSparseLinear alike; the backward runs in bf16 for both.",
        "torch_prune = the same block mask through torch.nn.utils.prune.custom_from_mask (a dense GEMM on "
        "weight_orig * mask). torch_bsr_fwd = addmm(bias, W.to_sparse_bsr((32, 32)), x.T): torch has no "
        "autograd for a BSR weight, so only its forward is timed.",
        "lotus_block = BlockSparseLinear; 'our kernel' = the variant lk.cpu_kernel_path reports (avx2: 6x16 "
        "fp32 tiles; avx512: 12x32 fp32 tiles; avx512_bf16: 12x32 vdpbf16ps tiles on bf16 operands, fp32 sums).",
        "train step: block-sparse = sparsify_(layout='block', sparsity=0.5) on blocks.*.mlp.fc1/fc2 (MLP) or "
        "on qkv, proj, fc1, fc2 (every linear; the head stays dense); keep = patch_vit token dropping.",
    ]
    for r in rows:
        if r["target"] is not None:
            out.append(_harness.verdict(f"{r['section']} {r['threads']}t {r['dtype']} {r['shape']} {r['config']}", r))
    return out


def main(argv=None):
    args = parse_args(argv)
    device, sync, meta = _harness.prepare(args)

    rows, quick = [], "_quick" if args.quick else "_short" if args.short else ""
    if "unstructured" in args.sections:
        rows = run_layers(args, device, sync) + run_train(args, device, sync)
        for r in rows:
            r["sparsity"] = args.sparsity
        title = (
            f"Sparse linear (unstructured {args.sparsity:g}): {args.model}, batch {args.batch}, "
            f"{meta['threads']} threads, {device}"
        )
        print(
            _harness.write_results(f"sparse_linear{quick}", meta, rows, COLUMNS, plot, title=title, notes=notes(rows))
        )
    if "block" in args.sections:
        block = []
        for threads in args.threads_list:
            torch.set_num_threads(threads)
            for dtype_name in args.dtypes:
                block += run_block_layers(args, device, sync, dtype_name, threads)
            for dtype_name in args.dtypes:
                block += run_block_train(args, device, sync, dtype_name, threads)
        meta["threads"] = args.threads_list if len(args.threads_list) > 1 else args.threads_list[0]
        title = (
            f"Block-sparse linear (block {args.block_size}): M = {args.batch}x{args.tokens}, "
            f"{args.block_model}, {'/'.join(map(str, args.threads_list))} threads, {', '.join(args.dtypes)}, "
            f"{meta['cpu_model']}, {device}"
        )
        print(
            _harness.write_results(
                f"block_sparse_linear{quick}",
                meta,
                block,
                BLOCK_COLUMNS,
                plot_block,
                title=title,
                notes=block_notes(block, meta),
            )
        )
        rows += block
    return rows


if __name__ == "__main__":
    main()

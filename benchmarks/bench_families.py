"""Train step of ViT-B models of each family with patches dropped (and 50% block sparsity), each against
its own dense step and its own native patch dropout where it has one.

    PYTHONPATH=. python benchmarks/bench_families.py            # 224 px, batch 4 -> results/families.*
    PYTHONPATH=. python benchmarks/bench_families.py --quick    # 112 px (B/16), batch 2 -> families_quick.*

Families: timm ``vit_base_patch16_224`` (the reference ratios), torchvision ``vit_b_16``, transformers
``ViTForImageClassification`` (ViT-B/16 config), open_clip ``ViT-B-32`` image tower. Per family, timed
interleaved: dense (the model's own forward), lotus keep 0.7 / 0.5 (``patch_vit`` + ``keep_ratio``),
lotus keep 0.7 + 50% block sparsity (``sparsify_(layout="block", block_size=32)``, a copy), and the
family's native patch dropout at the same keep ratios (timm ``PatchDropout``, open_clip
``patch_dropout``: both embed every patch first and act in training only; torchvision and
transformers ViTs have none). Random weights, random images and labels, SGD; a step is forward +
cross-entropy + backward + optimizer step (open_clip: a linear head on the image embedding).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import lotus_kernels

try:
    from benchmarks import _harness
except ImportError:  # run as a script from outside the repo root's sys.path
    import _harness

TARGETS = {"lotus@0.5": 0.52, "lotus@0.7+block50": 0.45}  # wanted ratio to dense (issue 19)
FAMILIES = ("timm", "torchvision", "hf", "open_clip")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=224, help="image size of the B/16 models (B/32: 224 always)")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    _harness.add_run_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.repeats, args.warmup = 2, 112, 2, 1
    args.families = [f for f in args.families.split(",") if f]
    bad = set(args.families) - set(FAMILIES)
    if bad:
        p.error(f"--families: unknown {sorted(bad)}; expected some of {', '.join(FAMILIES)}")
    return args


class Classifier(torch.nn.Module):
    """An image tower with a linear head (open_clip's tower outputs an embedding)."""

    def __init__(self, tower, dim, classes):
        super().__init__()
        self.tower, self.head = tower, torch.nn.Linear(dim, classes)

    def forward(self, x, **kw):
        return self.head(self.tower(x, **kw))


def build(family: str, size: int, classes: int):
    """(model, image size, native patch dropout setter or None)."""
    if family == "timm":
        import timm
        from timm.layers import PatchDropout

        m = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=classes, img_size=size)

        def native(keep):
            m.patch_drop = torch.nn.Identity() if keep is None else PatchDropout(1 - keep, num_prefix_tokens=1)

        return m, size, native
    if family == "torchvision":
        from torchvision.models.vision_transformer import VisionTransformer

        # vit_b_16's architecture at this size (torchvision has no position interpolation)
        m = VisionTransformer(
            image_size=size,
            patch_size=16,
            num_layers=12,
            num_heads=12,
            hidden_dim=768,
            mlp_dim=3072,
            num_classes=classes,
        )
        return m, size, None
    if family == "hf":
        import transformers

        conf = transformers.ViTConfig(image_size=size, num_labels=classes, attn_implementation="sdpa")
        return HFLogits(transformers.ViTForImageClassification(conf)), size, None
    import open_clip

    visual = open_clip.create_model("ViT-B-32").visual
    m = Classifier(visual, visual.output_dim, classes)

    def native(keep):
        visual.patch_dropout = torch.nn.Identity() if keep is None else open_clip.transformer.PatchDropout(1 - keep)

    return m, 224, native


class HFLogits(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, **kw):
        return self.net(x, **kw).logits


def patch(model):
    inner = model.net if isinstance(model, HFLogits) else model.tower if isinstance(model, Classifier) else model
    lotus_kernels.patch_vit(inner)
    return model


def train_step(model, opt, images, labels, **kw):
    loss = F.cross_entropy(model(images, **kw), labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_family(family, args, device, sync):
    torch.manual_seed(0)
    base, size, native = build(family, args.size, args.num_classes)
    model = patch(base).to(device).train()
    sparse = copy.deepcopy(model)
    lotus_kernels.sparsify_(sparse, sparsity=0.5, layout="block", block_size=32)
    n_sparse = sum(isinstance(m, lotus_kernels.nn.BlockSparseLinear) for m in sparse.modules())
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    opt_sparse = torch.optim.SGD(sparse.parameters(), lr=1e-4, momentum=0.9)
    images = torch.randn(args.batch, 3, size, size, device=device)
    labels = torch.randint(args.num_classes, (args.batch,), device=device)
    configs = {}

    def add(name, keep, m=model, o=opt, drop=None, **kw):
        def fn():
            if native is not None:
                native(drop)
            train_step(m, o, images, labels, **kw)

        configs[name] = (fn, keep)

    add("dense", 1.0)
    for r in (0.7, 0.5):
        add(f"lotus@{r:g}", r, keep_ratio=r)
    add("lotus@0.7+block50", 0.7, m=sparse, o=opt_sparse, keep_ratio=0.7)
    if native is not None:
        for r in (0.7, 0.5):
            add(f"native_drop@{r:g}", r, drop=r)
    print(
        f"[{family}] {size}px batch {args.batch}: timing {len(configs)} configs x {args.repeats} rounds "
        f"({n_sparse} block-sparse layers) ...",
        flush=True,
    )
    times = _harness.interleaved(
        {n: c[0] for n, c in configs.items()}, args.warmup, args.repeats, progress=not args.no_progress, sync=sync
    )
    if native is not None:
        native(None)
    stats = _harness.summarize(times, "dense")
    rows = []
    for name, (_, keep) in configs.items():
        s = stats[name]
        rows.append(
            {
                "family": family,
                "config": name,
                "keep": keep,
                "size": size,
                "batch": args.batch,
                "block_sparse_layers": n_sparse if "block" in name else 0,
                "median_ms": 1e3 * s["median_s"],
                "p25_ms": 1e3 * s["p25_s"],
                "p75_ms": 1e3 * s["p75_s"],
                "ratio": s["ratio"],
                "ratio_paired": s["ratio_paired"],
                "target": TARGETS.get(name),
                "times_ms": [1e3 * t for t in times[name]],
            }
        )
    return rows


COLUMNS = [
    ("family", "family", ""),
    ("config", "config", ""),
    ("px", "size", "d"),
    ("batch", "batch", "d"),
    ("median ms", "median_ms", ".0f"),
    ("p25 ms", "p25_ms", ".0f"),
    ("p75 ms", "p75_ms", ".0f"),
    ("ratio to dense", "ratio", ".3f"),
    ("paired ratio", "ratio_paired", ".3f"),
    ("target", "target", ".2f"),
    ("block layers", "block_sparse_layers", "d"),
]


def notes(rows):
    out = [
        "ratio = median / the same family's dense median (paired: median over rounds of the per-round ratio); "
        "configs of a family are timed interleaved.",
        "torchvision and open_clip attention is nn.MultiheadAttention (fused in_proj, kept dense by sparsify_): "
        "their 50% block sparsity covers the MLP only; transformers and timm prune q/k/v/out too.",
    ]
    by = {(r["family"], r["config"]): r for r in rows}
    for r in rows:
        if r["target"] is not None:
            out.append(_harness.verdict(f"{r['family']} {r['config']}", r))
        t = by.get(("timm", r["config"]))
        if r["family"] != "timm" and t is not None and r["config"].startswith("lotus"):
            d = r["ratio"] - t["ratio"]
            out.append(
                f"{r['family']} {r['config']}: ratio {r['ratio']:.3f} vs timm's {t['ratio']:.3f} "
                f"({d:+.3f}; goal <= +0.03 -> {'met' if d <= 0.03 else 'missed'})"
            )
    return out


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(dict.fromkeys(r["family"] for r in rows))
    configs = [
        c
        for c in ("lotus@0.7", "lotus@0.5", "lotus@0.7+block50", "native_drop@0.7", "native_drop@0.5")
        if any(r["config"] == c for r in rows)
    ]
    fig, ax = plt.subplots(figsize=(10, 4))
    w = 0.8 / len(configs)
    for j, c in enumerate(configs):
        xs, ys = [], []
        for i, f in enumerate(fams):
            r = next((r for r in rows if r["family"] == f and r["config"] == c), None)
            if r is not None:
                xs.append(i + (j - (len(configs) - 1) / 2) * w)
                ys.append(r["ratio"])
        ax.bar(xs, ys, w, label=c)
    for name, t in TARGETS.items():
        ax.axhline(t, ls=":", lw=0.8, color="r")
    ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax.set_xticks(range(len(fams)), fams)
    ax.set_ylabel("train step / dense")
    ax.legend(fontsize=8, ncol=3)
    ax.set_title("ViT-B train step, ratio to each family's own dense step (red: targets 0.52 / 0.45)")
    return fig


def main(argv=None):
    args = parse_args(argv)
    device, sync, meta = _harness.prepare(args)
    rows = []
    for family in args.families:
        rows += run_family(family, args, device, sync)
    name = "families_quick" if args.quick else "families"
    title = f"ViT families: train step with dropped patches, {meta['threads']} threads, {device}"
    md = _harness.write_results(name, meta, rows, COLUMNS, plot, title=title, notes=notes(rows))
    print(md)
    return rows


if __name__ == "__main__":
    main()

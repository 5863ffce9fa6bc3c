"""Train-step and inference time of a timm ViT with patches dropped: dense vs timm's PatchDropout vs
lotus (``patch_vit`` + ``keep_ratio``).

    PYTHONPATH=. python benchmarks/bench_token_drop.py            # vit_small, batch 8 -> results/token_drop.*
    PYTHONPATH=. python benchmarks/bench_token_drop.py --quick    # smoke run -> results/token_drop_quick.*

Every config owns a deepcopy of one randomly initialised model (identical weights, its own SGD
optimizer) and sees the same images and labels. The configs of a section are timed interleaved.
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchDropout

import lotus_kernels

try:
    from benchmarks import _harness
except ImportError:  # run as a script from outside the repo root's sys.path
    import _harness

TARGETS = {0.9: 0.91, 0.5: 0.50}  # wanted train-step ratio to dense for lotus at these keep ratios


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--keeps", default="0.9,0.7,0.5", help="comma-separated keep ratios")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    _harness.add_run_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.repeats, args.warmup = "vit_tiny_patch16_224", 2, 1
    args.keeps = [float(k) for k in args.keeps.split(",")]
    return args


def train_step(model, opt, images, labels, **kw):
    loss = F.cross_entropy(model(images, **kw), labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def tokens_seen(model, images, **kw) -> int:
    """Sequence length the first block actually receives (prefix tokens included): proves each
    config runs at its own keep ratio rather than trusting the arithmetic."""
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[1]))
    try:
        with torch.no_grad():
            model(images, **kw)
    finally:
        hook.remove()
    return seen[0]


def build_configs(base, images, labels, keeps, train: bool):
    """name -> (zero-arg callable, model, forward kwargs, keep ratio).

    All configs share ONE patched model and optimizer: ``patch_vit`` leaves the plain forward
    untouched, and timm's PatchDropout is switched in per call. Separate model copies measured
    noisier (each config's weights and optimizer state at other addresses, 9x the memory), and
    timing does not depend on the weight values."""
    model = lotus_kernels.patch_vit(copy.deepcopy(base)).train(train)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    configs = {}

    def add(name, keep, patch_drop=None, **kw):
        drop = patch_drop if patch_drop is not None else torch.nn.Identity()

        def fn():
            model.patch_drop = drop
            if train:
                train_step(model, opt, images, labels, **kw)
            else:
                with torch.inference_mode():
                    model(images, **kw)

        configs[name] = (fn, model, kw, keep, drop)

    add("dense", None)
    if train:  # PatchDropout only acts in training mode: in eval it is the dense model
        for r in keeps:
            add(f"timm_patchdrop@{r:g}", r, PatchDropout(1 - r, num_prefix_tokens=model.num_prefix_tokens))
    n = base.patch_embed.num_patches
    for r in keeps:
        add(f"lotus@{r:g}", r, keep_ratio=r)
        # timm keeps int(N*(1-prob)) patches, lotus ceil(N*keep): where the counts differ, also time
        # lotus at timm's count, so that the method comparison is at equal work.
        k_timm = max(1, int(n * (1.0 - (1.0 - r))))
        if k_timm != lotus_kernels.select.num_keep(n, r):
            idx = lotus_kernels.select.random_keep(images.shape[0], n, k_timm / n, device=images.device)
            assert idx.shape[1] == k_timm
            add(f"lotus_timmK@{r:g}", r, keep_idx=idx)
    return configs


def run_section(mode, base, images, labels, args, sync):
    train = mode == "train"
    configs = build_configs(base, images, labels, args.keeps, train)
    n_patches = base.patch_embed.num_patches
    tokens = {}
    for name, (_, m, kw, _, drop) in configs.items():
        m.patch_drop = drop
        tokens[name] = tokens_seen(m, images, **kw)
    print(f"[{mode}] timing {len(configs)} configs x {args.repeats} rounds ...", flush=True)
    times = _harness.interleaved(
        {n: c[0] for n, c in configs.items()}, args.warmup, args.repeats, progress=not args.no_progress, sync=sync
    )
    stats = _harness.summarize(times, "dense")
    rows = []
    for name, (_, m, _, keep, _) in configs.items():
        s = stats[name]
        rows.append(
            {
                "mode": mode,
                "config": name,
                "method": name.split("@")[0],
                "keep": keep,
                "patches": tokens[name] - m.num_prefix_tokens,
                "tokens": tokens[name],
                "median_ms": 1e3 * s["median_s"],
                "p25_ms": 1e3 * s["p25_s"],
                "p75_ms": 1e3 * s["p75_s"],
                "min_ms": 1e3 * s["min_s"],
                "iqr_ms": 1e3 * (s["p75_s"] - s["p25_s"]),
                "ratio": s["ratio"],
                "ratio_paired": s["ratio_paired"],
                "ideal": tokens[name] / tokens["dense"],
                "target": TARGETS.get(keep) if name.startswith("lotus@") else None,
                "times_ms": [1e3 * t for t in times[name]],
            }
        )
    assert tokens["dense"] == n_patches + base.num_prefix_tokens
    return rows


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, mode in zip(axes, ("train", "eval")):
        sub = [r for r in rows if r["mode"] == mode and r["keep"] is not None]
        keeps = sorted({r["keep"] for r in sub}, reverse=True)
        methods = [m for m in ("timm_patchdrop", "lotus", "lotus_timmK") if any(r["method"] == m for r in sub)]
        width = 0.8 / len(methods)
        labelled = set()  # one legend entry per kind of mark

        def label(what):
            if what in labelled:
                return None
            labelled.add(what)
            return what

        for j, method in enumerate(methods):
            for i, k in enumerate(keeps):
                r = next((r for r in sub if r["method"] == method and r["keep"] == k), None)
                if r is None:
                    continue
                x = i + (j - (len(methods) - 1) / 2) * width
                dense = next(d for d in rows if d["mode"] == mode and d["config"] == "dense")["median_ms"]
                err = [[(r["median_ms"] - r["p25_ms"]) / dense], [(r["p75_ms"] - r["median_ms"]) / dense]]
                ax.bar(x, r["ratio"], width, yerr=err, capsize=3, color=COLORS[method], label=label(method))
                ax.hlines(
                    r["ideal"], x - width / 2, x + width / 2, colors="k", label=label("ideal (tokens kept / all)")
                )
                ax.text(x + width / 4, r["ratio"] + 0.02, f"{r['ratio']:.2f}", ha="left", fontsize=8)
                if r["target"] is not None:
                    ax.plot(x, r["target"], "r*", ms=10, label=label("target"))
        ax.axhline(1.0, color="gray", ls="--", lw=0.8)
        ax.set_xticks(range(len(keeps)), [f"keep {k:g}" for k in keeps])
        ax.set_title(f"{mode}: {'forward+backward+SGD step' if mode == 'train' else 'inference forward'}")
        ax.legend(fontsize=8, loc="upper center", ncol=2)
    axes[0].set_ylabel("median time / dense median")
    axes[0].set_ylim(0, max(1.4, 1.15 * max(r["ratio"] for r in rows)))
    fig.suptitle(f"{rows[0].get('model', '')} token drop, ratio to dense (IQR error bars)")
    return fig


COLORS = {"timm_patchdrop": "C0", "lotus": "C1", "lotus_timmK": "C2"}  # same colour per method in both panels

COLUMNS = [
    ("mode", "mode", ""),
    ("config", "config", ""),
    ("patches kept", "patches", "d"),
    ("tokens", "tokens", "d"),
    ("median ms", "median_ms", ".1f"),
    ("p25 ms", "p25_ms", ".1f"),
    ("p75 ms", "p75_ms", ".1f"),
    ("min ms", "min_ms", ".1f"),
    ("ratio to dense", "ratio", ".3f"),
    ("paired ratio", "ratio_paired", ".3f"),
    ("ideal (tokens/all)", "ideal", ".3f"),
    ("target", "target", ".2f"),
]


def notes(rows, n_patches):
    out = [
        "ratio to dense = median / dense median of the same section (train or eval); paired ratio = "
        "median over rounds of time / dense time in the same round; IQR = p25..p75 over rounds.",
        f"timm PatchDropout keeps int({n_patches}*(1-prob)) patches, lotus keeps ceil({n_patches}*keep): "
        "the counts above are what the first block received (hooked), class token included in 'tokens'.",
        "timm PatchDropout does nothing in eval mode (every patch is embedded and kept), so the eval "
        "section has no timm rows: timm eval = dense.",
    ]
    by = {(r["mode"], r["config"]): r for r in rows}
    for r in rows:
        if r["target"] is not None:
            out.append(_harness.verdict(f"{r['mode']} {r['config']}", r))
        t = by.get((r["mode"], f"timm_patchdrop@{r['keep']:g}")) if r["method"].startswith("lotus") else None
        if t is not None and r["median_ms"] > t["median_ms"]:
            out.append(
                f"{r['mode']} {r['config']} is slower than {t['config']} "
                f"({r['median_ms']:.1f} vs {t['median_ms']:.1f} ms)"
            )
    return out


def main(argv=None):
    args = parse_args(argv)
    device, sync, meta = _harness.prepare(args)
    base = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes).to(device)
    size = base.patch_embed.img_size
    images = torch.randn(args.batch, 3, *size, device=device)
    labels = torch.randint(args.num_classes, (args.batch,), device=device)

    rows = []
    for mode in ("train", "eval"):
        rows += run_section(mode, base, images, labels, args, sync)
    for r in rows:
        r["model"] = args.model

    name = "token_drop_quick" if args.quick else "token_drop"
    title = f"Token drop: {args.model}, batch {args.batch}, {meta['threads']} threads, {device}"
    md = _harness.write_results(
        name, meta, rows, COLUMNS, plot, title=title, notes=notes(rows, base.patch_embed.num_patches)
    )
    print(md)
    return rows


if __name__ == "__main__":
    main()

"""End-to-end patch scoring: ``model.patch_scores(images)`` (lotus, fused kernel) vs what users do today
with timm (``fused_attn = False`` on the last block + a forward hook on its softmax, then the
class-token row averaged over heads and the sink fix), in images/s.

    PYTHONPATH=. python benchmarks/bench_patch_scores.py          # ViT-S/16 224, batch 8 -> results/patch_scores.*
    PYTHONPATH=. python benchmarks/bench_patch_scores.py --quick  # smoke run -> results/patch_scores_quick.*

Configs (one randomly initialised model, the same images, timed interleaved, no grad):
  timm_forward             plain timm inference, no scores (reference point)
  timm_hook_last_block     timm inference, last block unfused + hook: what users do for scores
  timm_hook_all_blocks     the same with every block unfused (timm.layers.set_fused_attn(False) style)
  lotus_patch_scores       ``patch_vit(model).patch_scores(images)``: fused blocks, scores from the
                           fused kernel of the last block (whose MLP and the head are skipped)
Ratios are to timm_hook_last_block (the cheapest hook recipe).
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch

from lotus_kernels import patch_vit
from lotus_kernels.ops.attention import apply_sink

try:
    from benchmarks import _harness
except ImportError:  # run as a script from outside the repo root's sys.path
    import _harness


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    _harness.add_run_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.warmup = 2, 2, 1
    return args


class HookedScores:
    """timm today: unfused attention in ``blocks`` and a forward hook on the last block's softmax
    (attn_drop's output), then the class-token row averaged over heads and the sink fix."""

    def __init__(self, model, unfused_blocks):
        self.model = model
        for blk in unfused_blocks:
            blk.attn.fused_attn = False
        self.maps = []
        model.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, i, o: self.maps.append(o))

    @torch.no_grad()
    def __call__(self, images):
        self.maps.clear()
        self.model(images)
        return apply_sink(self.maps[0][:, :, 0, :].mean(1))[:, self.model.num_prefix_tokens :]


def main(argv=None):
    args = parse_args(argv)
    device, sync, meta = _harness.prepare(args)
    base = timm.create_model(args.model, pretrained=False).to(device).eval()
    images = torch.randn(args.batch, 3, *base.patch_embed.img_size, device=device)
    plain = copy.deepcopy(base)
    last = copy.deepcopy(base)
    last = HookedScores(last, [last.blocks[-1]])
    every = copy.deepcopy(base)
    every = HookedScores(every, list(every.blocks))
    lotus = patch_vit(copy.deepcopy(base))

    # Same scores from every scoring path (checked once, before timing).
    want = last(images)
    for name, got in (("all_blocks", every(images)), ("lotus", lotus.patch_scores(images))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} scores differ: {m}")

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    configs = {
        "timm_forward": no_grad(lambda: plain(images)),
        "timm_hook_last_block": lambda: last(images),
        "timm_hook_all_blocks": lambda: every(images),
        "lotus_patch_scores": lambda: lotus.patch_scores(images),
    }
    print(f"timing {len(configs)} configs x {args.repeats} rounds ...", flush=True)
    times = _harness.interleaved(configs, args.warmup, args.repeats, progress=not args.no_progress, sync=sync)
    stats = _harness.summarize(times, "timm_hook_last_block")
    rows = [
        {
            "config": n,
            "median_ms": 1e3 * s["median_s"],
            "p25_ms": 1e3 * s["p25_s"],
            "p75_ms": 1e3 * s["p75_s"],
            "min_ms": 1e3 * s["min_s"],
            "images_per_s": args.batch / s["median_s"],
            "ratio": s["ratio"],
            "ratio_paired": s["ratio_paired"],
            "n": s["n"],
            "times_ms": [1e3 * t for t in times[n]],
        }
        for n, s in stats.items()
    ]
    name = "patch_scores_quick" if args.quick else "patch_scores"
    title = f"Patch scores end to end: {args.model}, batch {args.batch}, {meta['threads']} threads, {device}"
    notes = [
        "ratio = median / timm_hook_last_block median; paired ratio = median over rounds of time / "
        "timm_hook_last_block time in the same round; IQR = p25..p75 over rounds.",
        "lotus_patch_scores stops after the last block's attention (its MLP and the head are not needed "
        "for the scores); the timm rows run the whole model because the hook recipe does.",
        "All scoring rows return the same [B, num_patches] sink-fixed class-token scores (checked).",
    ]
    md = _harness.write_results(name, meta, rows, COLUMNS, plot, title=title, notes=notes)
    print(md)
    return rows


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(rows))
    ax.bar(
        xs, [r["images_per_s"] for r in rows], color=["C1" if r["config"].startswith("lotus") else "C0" for r in rows]
    )
    for x, r in zip(xs, rows):
        ax.text(x, r["images_per_s"], f"{r['ratio']:.2f}x time", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [r["config"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("images / s (median)")
    ax.set_title("patch scores end to end (label: time ratio to timm_hook_last_block)")
    fig.tight_layout()
    return fig


COLUMNS = [
    ("config", "config", ""),
    ("images/s", "images_per_s", ".1f"),
    ("median ms", "median_ms", ".1f"),
    ("p25 ms", "p25_ms", ".1f"),
    ("p75 ms", "p75_ms", ".1f"),
    ("min ms", "min_ms", ".1f"),
    ("time ratio to hook (last block)", "ratio", ".3f"),
    ("paired ratio", "ratio_paired", ".3f"),
    ("rounds", "n", "d"),
]


if __name__ == "__main__":
    main()

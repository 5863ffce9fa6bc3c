"""Micro-benchmark: ``gather_tokens`` forward + backward against the stock PyTorch ways of keeping
rows ``idx[b]`` of every ``x[b]``, at ViT-S / ViT-B token shapes.

    PYTHONPATH=. python benchmarks/bench_gather.py [--repeats 15 --number 20]   -> results/gather.*

Methods (all forward + backward via ``torch.autograd.grad``; index preparation is part of each, as a
training step would pay it every time):
  lotus         lotus_kernels.ops.gather_tokens(x, idx)
  torch.gather  torch.gather(x, 1, idx[..., None].expand(-1, -1, C))        (the baseline)
  adv_index     x[arange(B)[:, None], idx]
  index_select  x.view(B*N, C).index_select(0, (idx + N*arange(B)[:, None]).flatten())

Cost model for GB/s: the least traffic a gather + its adjoint can move,
  forward  read B*K*C + write B*K*C elements (+ idx)
  backward read B*K*C (grad) + write B*N*C (dx: kept rows and zeros) elements (+ idx)
the same byte count for every method, so GB/s compares to the machine's memory bandwidth.
"""

from __future__ import annotations

import argparse
import itertools

import torch

import lotus_kernels
from lotus_kernels.ops import gather_tokens
from lotus_kernels.select import random_keep

try:
    from benchmarks import _harness
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import _harness

BASELINE = "torch.gather"


def method_fns(B, N, C):
    ar = torch.arange(B)[:, None]
    return {
        "lotus": lambda x, idx: gather_tokens(x, idx),
        "torch.gather": lambda x, idx: torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, C)),
        "adv_index": lambda x, idx: x[ar, idx],
        "index_select": lambda x, idx: x.reshape(B * N, C).index_select(0, (idx + N * ar).flatten()).view(B, -1, C),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=197, help="N, tokens per image (class token included)")
    p.add_argument("--channels", default="384,768", help="C: ViT-S, ViT-B")
    p.add_argument("--keeps", default="98,177", help="K, kept tokens")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--number", type=int, default=20, help="calls per timed sample (one call is ~1 ms)")
    _harness.add_run_args(p)
    args = p.parse_args(argv)
    args.channels = [int(c) for c in args.channels.split(",")]
    args.keeps = [int(k) for k in args.keeps.split(",")]
    args.dtypes = args.dtypes.split(",")
    if args.quick:
        args.channels, args.keeps, args.dtypes = args.channels[:1], args.keeps[:1], args.dtypes[:1]
        args.repeats, args.warmup, args.number = 3, 1, 5
    return args


def check_agree(fns, x, idx, g):
    """Every method must give torch.gather's output and gradient, or the timings compare nothing."""
    ref = None
    for name, f in fns.items():
        out = f(x, idx)
        (dx,) = torch.autograd.grad(out, x, g)
        if ref is None:
            ref = (out, dx)
        torch.testing.assert_close((out, dx), ref, msg=lambda m: f"{name} disagrees with torch.gather: {m}")


def bench_group(B, N, C, K, dtype, args):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, C, generator=gen).to(dtype).requires_grad_()
    # Prefix token 0 always kept, like the ViT path; the rest a random sorted subset.
    idx = torch.cat(
        [torch.zeros(B, 1, dtype=torch.long), 1 + random_keep(B, N - 1, (K - 1) / (N - 1), generator=gen)], dim=1
    )
    assert idx.shape == (B, K)
    g = torch.randn(B, K, C, generator=gen).to(dtype)
    fns = method_fns(B, N, C)
    fns = {BASELINE: fns.pop(BASELINE), **fns}
    check_agree(fns, x, idx, g)

    def loop(f):
        def run():
            for _ in range(args.number):
                torch.autograd.grad(f(x, idx), x, g)

        return run

    times = _harness.interleaved(
        {n: loop(f) for n, f in fns.items()}, args.warmup, args.repeats, progress=not args.no_progress
    )
    times = {n: [t / args.number for t in ts] for n, ts in times.items()}
    stats = _harness.summarize(times, BASELINE)
    e = x.element_size()
    nbytes = e * B * C * (3 * K + N) + 2 * 8 * B * K
    return [
        {
            "dtype": str(dtype).removeprefix("torch."),
            "B": B,
            "N": N,
            "C": C,
            "K": K,
            "method": n,
            "median_us": 1e6 * s["median_s"],
            "p25_us": 1e6 * s["p25_s"],
            "p75_us": 1e6 * s["p75_s"],
            "min_us": 1e6 * s["min_s"],
            "ratio": s["ratio"],
            "ratio_paired": s["ratio_paired"],
            "bytes": nbytes,
            "gbps": nbytes / s["median_s"] / 1e9,
        }
        for n, s in stats.items()
    ]


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), sharey=True, squeeze=False)
    for ax, dt in zip(axes[0], dtypes):
        shapes = list(dict.fromkeys((r["C"], r["K"]) for r in rows if r["dtype"] == dt))
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            vals = [
                next(r for r in rows if r["dtype"] == dt and r["method"] == m and (r["C"], r["K"]) == s) for s in shapes
            ]
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(shapes))]
            ax.bar(xs, [v["ratio"] for v in vals], width, color=f"C{j}", label=m)
            if m == "lotus":
                for x, v in zip(xs, vals):
                    ax.text(x, v["ratio"], f"{v['gbps']:.0f} GB/s", ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="gray", ls="--", lw=0.8)
        ax.set_xticks(range(len(shapes)), [f"C={c}\nK={k}" for c, k in shapes])
        ax.set_title(f"{dt}: gather fwd+bwd, time / torch.gather")
        ax.legend(fontsize=8, loc="upper center", ncol=2)
    axes[0][0].set_ylim(0, max(1.4, 1.15 * max(r["ratio"] for r in rows)))
    axes[0][0].set_ylabel("median time / torch.gather median")
    return fig


COLUMNS = [
    ("dtype", "dtype", ""),
    ("C", "C", "d"),
    ("K", "K", "d"),
    ("method", "method", ""),
    ("median us", "median_us", ".1f"),
    ("p25 us", "p25_us", ".1f"),
    ("p75 us", "p75_us", ".1f"),
    ("min us", "min_us", ".1f"),
    ("ratio to torch.gather", "ratio", ".3f"),
    ("paired ratio", "ratio_paired", ".3f"),
    ("GB/s", "gbps", ".1f"),
]


def main(argv=None):
    args = parse_args(argv)
    device, _, meta = _harness.prepare(args)
    if device.type != "cpu":
        raise SystemExit("bench_gather.py: the CPU micro-benchmark; --device cuda is not supported yet")
    rows = []
    for dt, C, K in itertools.product(args.dtypes, args.channels, args.keeps):
        print(f"{dt} C={C} K={K} ...", flush=True)
        rows += bench_group(args.batch, args.tokens, C, K, getattr(torch, dt), args)

    meta["backend"] = "cpu" if lotus_kernels.backends()["cpu"] else "reference"
    notes = [
        f"B={args.batch}, N={args.tokens}; forward + backward (torch.autograd.grad), median of "
        f"{args.repeats} interleaved rounds of {args.number} calls each; lotus backend: {meta['backend']}.",
        "GB/s = (B*K*C read + B*K*C written forward, B*K*C read + B*N*C written backward, + idx) "
        "/ median time: the least traffic possible, the same count for every method.",
    ]
    md = _harness.write_results(
        "gather_quick" if args.quick else "gather",
        meta,
        rows,
        COLUMNS,
        plot,
        title="gather_tokens vs torch (CPU)",
        notes=notes,
    )
    print(md)
    return rows


if __name__ == "__main__":
    main()

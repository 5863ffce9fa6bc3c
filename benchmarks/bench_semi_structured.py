"""2:4 semi-structured sparse linear (SemiStructuredLinear) vs dense nn.Linear on a CUDA GPU, bf16.

    PYTHONPATH=. python benchmarks/bench_semi_structured.py            # -> results/semi_structured.*
    PYTHONPATH=. python benchmarks/bench_semi_structured.py --quick    # smoke run -> *_quick.*

ViT-L MLP shapes (1024 -> 4096 and 4096 -> 1024, M = batch * 197 tokens), one layer, timed
interleaved: forward only and forward + backward, for dense, SemiStructuredLinear (every call bumps
the weight's version, as an optimizer step does, so the layer compresses again: what training pays
once per step), its transposable-mask variant (W^T compressed too, so dx is sparse) and, forward
only, F.linear on a weight compressed once (inference; the gap to the 2:4 row is the compression).
For context, torchao reports 1.25x for ViT-L MLP forward + backward on an A100 with its runtime-
sparsified training path. Needs CUDA (sm80+): elsewhere it says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn

try:
    from benchmarks import _harness
except ImportError:  # run as a script from outside the repo root's sys.path
    import _harness

from lotus_kernels.nn import SemiStructuredLinear


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    _harness.add_run_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.warmup = 2, 3, 1
    return args


def configs_for(in_f, out_f, m, device):
    dtype = torch.bfloat16
    dense = nn.Linear(in_f, out_f, device=device, dtype=dtype)
    sparse = SemiStructuredLinear.from_linear(copy.deepcopy(dense), strict=True)  # raises rather than fall back
    sparse_t = SemiStructuredLinear.from_linear(copy.deepcopy(dense), strict=True, transposable=True)
    w_once = torch.sparse.to_sparse_semi_structured(sparse.weight.detach().contiguous())
    x = torch.randn(m, in_f, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(m, out_f, device=device, dtype=dtype)

    def new_step(layer):  # what an optimizer step does to the version counter (dense pays the same add)
        with torch.no_grad():
            layer.weight.add_(0.0)

    def fwd(layer):
        def fn():
            new_step(layer)
            with torch.no_grad():
                layer(x)

        return fn

    def fwd_bwd(layer):
        def fn():
            new_step(layer)
            layer(x).backward(g)
            layer.zero_grad(set_to_none=True)
            x.grad = None

        return fn

    def fwd_precompressed():
        with torch.no_grad():
            F.linear(x, w_once, sparse.bias)

    return {
        "fwd": {"dense": fwd(dense), "2:4": fwd(sparse), "2:4 precompressed": fwd_precompressed},
        "fwd+bwd": {"dense": fwd_bwd(dense), "2:4": fwd_bwd(sparse), "2:4 transposable": fwd_bwd(sparse_t)},
    }


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['section']}\n{r['shape']}\n{r['config']}" for r in rows if r["config"] != "dense"]
    ratios = [r["ratio"] for r in rows if r["config"] != "dense"]
    fig, ax = plt.subplots(figsize=(2 + 1.4 * len(labels), 4))
    ax.bar(range(len(labels)), ratios, color="C1")
    for i, v in enumerate(ratios):
        ax.text(i, v + 0.02, f"{v:.2f}", ha="center", fontsize=8)
    ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("median time / dense median")
    ax.set_title("2:4 sparse vs dense nn.Linear, bf16")
    return fig


COLUMNS = [
    ("section", "section", ""),
    ("shape", "shape", ""),
    ("config", "config", ""),
    ("median ms", "median_ms", ".3f"),
    ("p25 ms", "p25_ms", ".3f"),
    ("p75 ms", "p75_ms", ".3f"),
    ("ratio to dense", "ratio", ".3f"),
    ("paired ratio", "ratio_paired", ".3f"),
]


def main(argv=None):
    args = parse_args(argv)
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)):
        print(
            "bench_semi_structured: needs a CUDA GPU with compute capability 8.0+ (2:4 sparse tensor cores); "
            "nothing to measure here."
        )
        return []
    args.device = "cuda"
    device, sync, meta = _harness.prepare(args)
    rows = []
    m = args.batch * args.tokens
    for in_f, out_f in ((args.dim, args.hidden), (args.hidden, args.dim)):
        shape = f"{m}x{in_f}->{out_f}"
        for section, configs in configs_for(in_f, out_f, m, device).items():
            print(f"[{section} {shape}] timing {len(configs)} configs x {args.repeats} rounds ...", flush=True)
            times = _harness.interleaved(configs, args.warmup, args.repeats, progress=not args.no_progress, sync=sync)
            stats = _harness.summarize(times, "dense")
            for name in configs:
                s = stats[name]
                rows.append(
                    {
                        "section": section,
                        "shape": shape,
                        "config": name,
                        "median_ms": 1e3 * s["median_s"],
                        "p25_ms": 1e3 * s["p25_s"],
                        "p75_ms": 1e3 * s["p75_s"],
                        "ratio": s["ratio"],
                        "ratio_paired": s["ratio_paired"],
                        "times_ms": [1e3 * t for t in times[name]],
                    }
                )
    name = "semi_structured_quick" if args.quick else "semi_structured"
    notes = [
        "2:4 = SemiStructuredLinear: weight compressed once per step (every call here is a step), "
        "sparse GEMM forward, dense dx, masked dense dW; 2:4 transposable: W^T compressed too, sparse dx.",
        "2:4 precompressed = F.linear on a weight compressed once (inference cost, no compression).",
        "torchao reports 1.25x speed-up (ratio 0.80) for ViT-L MLP fwd+bwd on A100 (runtime 2:4 on both "
        "the weight and its transpose, so dx is sparse too).",
    ]
    md = _harness.write_results(
        name, meta, rows, COLUMNS, plot, title=f"2:4 sparse linear, bf16, {meta.get('gpu')}", notes=notes
    )
    print(md)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)

"""Attention with patch scores: SDPA vs the explicit-softmax path (what users do today to read the
class-token attention) vs lotus ``ops.attention(return_scores="cls")``, and fwd+bwd vs SDPA.

    PYTHONPATH=. python benchmarks/bench_attention.py            # ViT-S shapes -> results/attention.*
    PYTHONPATH=. python benchmarks/bench_attention.py --quick    # smoke run -> results/attention_quick.*

Shapes: B=8, H=6, D=64 (ViT-S/16), N=197 (224^2) and N=1025 (448^2, fewer repeats). Every config of a
section sees the same q, k, v and is timed interleaved; ratios are to the section's SDPA row.

Varlen sections ("varlen fwd", "varlen fwd+bwd", N = the longest sequence): a ragged batch whose
images keep between half and all of N tokens (linspace over the batch, as ragged token dropping gives),
run three ways: SDPA on the padded batch with a boolean mask (the baseline), lotus on the padded batch
with ``key_padding_mask``, and lotus on the packed [T, H, D] tokens with ``cu_seqlens`` (no padding).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import lotus_kernels
from lotus_kernels.ops import attention
from lotus_kernels.ops.attention import ENV_PATH

try:
    from benchmarks import _harness
except ImportError:  # run as a script from outside the repo root's sys.path
    import _harness


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tokens", default="197,1025", help="comma-separated sequence lengths N")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--long-repeats", type=int, default=5, help="repeats for N > 512")
    p.add_argument("--warmup", type=int, default=2)
    # One thread by default, as in bench_token_drop: on the shared 2-vCPU machines 2-thread timings
    # scattered by several x between rounds.
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 2, 2 repeats, 1 warm-up")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-malloc-tuning", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.long_repeats, args.warmup = 2, 2, 2, 1
    args.tokens = [int(n) for n in args.tokens.split(",")]
    return args


def explicit_scores(q, k, v):
    """The unfused path users hook today: materialise softmax(q k^T), read row 0, then attn @ v."""
    attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    return attn @ v, attn[:, :, 0].float().mean(1)


def fwd_configs(q, k, v):
    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    return {
        "sdpa_fwd": no_grad(lambda: F.scaled_dot_product_attention(q, k, v)),
        "explicit_softmax_fwd+maps": no_grad(lambda: explicit_scores(q, k, v)),
        "lotus_fwd": no_grad(lambda: attention(q, k, v)),
        "lotus_fwd+cls_scores": no_grad(lambda: attention(q, k, v, return_scores="cls")),
        # the two ways ops.attention can produce out + cls scores (DEFAULT_PATH picks the faster per device):
        # SDPA + the cls row in PyTorch ops, and the fused kernel
        "lotus_fwd+cls_scores_sdpa_path": no_grad(_path("sdpa", lambda: attention(q, k, v, return_scores="cls"))),
        "lotus_fwd+cls_scores_fused_path": no_grad(_path("fused", lambda: attention(q, k, v, return_scores="cls"))),
        "lotus_fwd+received_scores": no_grad(lambda: attention(q, k, v, return_scores="received")),
    }


def _path(path, fn):
    """``fn`` with ops.attention's output path forced (LOTUS_KERNELS_ATTENTION_PATH)."""

    def run():
        old = os.environ.get(ENV_PATH)
        os.environ[ENV_PATH] = path
        try:
            fn()
        finally:
            os.environ.pop(ENV_PATH) if old is None else os.environ.__setitem__(ENV_PATH, old)

    return run


def train_configs(q, k, v):
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    g = torch.randn_like(q)

    def step(fn):
        return lambda: torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), g)

    return {
        "sdpa_fwd+bwd": step(F.scaled_dot_product_attention),
        "lotus_fwd+bwd": step(lambda a, b, c: attention(a, b, c)),
        "lotus_fwd+bwd_sdpa_path": _path("sdpa", step(lambda a, b, c: attention(a, b, c))),
    }


def ragged_batch(shape, dtype):
    """(padded q, k, v [B, H, N, D], attend mask [B, 1, 1, N] for SDPA, key_padding_mask [B, N], packed
    q, k, v [T, H, D], cu_seqlens) of one ragged batch: image b keeps lengths[b] of N tokens."""
    B, H, N, D = shape
    lengths = torch.linspace(0.5, 1.0, B).mul(N).round().long().clamp(1, N)
    mask = torch.arange(N)[None, :] >= lengths[:, None]
    padded = [torch.randn(shape, dtype=dtype).masked_fill(mask[:, None, :, None], 0) for _ in range(3)]
    packed = [t.transpose(1, 2)[~mask].contiguous() for t in padded]  # [T, H, D], image-major
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    return padded, (~mask)[:, None, None, :], mask, packed, cu


def varlen_configs(shape, dtype, train):
    (q, k, v), attend, mask, (pq, pk, pv), cu = ragged_batch(shape, dtype)
    calls = {
        "sdpa_padded_mask": ((q, k, v), lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=attend)),
        "lotus_padded_mask": ((q, k, v), lambda a, b, c: attention(a, b, c, key_padding_mask=mask)),
        "lotus_varlen_packed": ((pq, pk, pv), lambda a, b, c: attention(a, b, c, cu_seqlens=cu)),
    }
    configs = {}
    for name, (inputs, fn) in calls.items():
        if train:
            ins = [t.detach().clone().requires_grad_() for t in inputs]
            g = torch.randn_like(ins[0])
            configs[name] = lambda fn=fn, ins=ins, g=g: torch.autograd.grad(fn(*ins), ins, g)
        else:
            configs[name] = lambda fn=fn, ins=inputs: _no_grad_call(fn, ins)
    return {f"{k}{'_fwd+bwd' if train else '_fwd'}": f for k, f in configs.items()}


def _no_grad_call(fn, inputs):
    with torch.no_grad():
        fn(*inputs)


def run_section(section, configs, baseline, shape, repeats, args):
    print(f"[{section} N={shape[2]}] timing {len(configs)} configs x {repeats} rounds ...", flush=True)
    times = _harness.interleaved(configs, args.warmup, repeats, progress=not args.no_progress)
    stats = _harness.summarize(times, baseline)
    rows = []
    for name, s in stats.items():
        rows.append(
            {
                "section": section,
                "N": shape[2],
                "config": name,
                "median_ms": 1e3 * s["median_s"],
                "p25_ms": 1e3 * s["p25_s"],
                "p75_ms": 1e3 * s["p75_s"],
                "min_ms": 1e3 * s["min_s"],
                "ratio": s["ratio"],
                "ratio_paired": s["ratio_paired"],
                "n": s["n"],
                "times_ms": [1e3 * t for t in times[name]],
            }
        )
    return rows


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["section"], r["N"]) for r in rows}, key=lambda t: (t[1], t[0]))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4.2), squeeze=False)
    for ax, (section, n) in zip(axes[0], keys):
        sub = [r for r in rows if r["section"] == section and r["N"] == n]
        xs = range(len(sub))
        err = [[r["median_ms"] - r["p25_ms"] for r in sub], [r["p75_ms"] - r["median_ms"] for r in sub]]
        ax.bar(
            xs,
            [r["median_ms"] for r in sub],
            yerr=err,
            capsize=3,
            color=[
                "C0" if r["config"].startswith("sdpa") else "C1" if r["config"].startswith("lotus") else "C2"
                for r in sub
            ],
        )
        for x, r in zip(xs, sub):
            ax.text(x, r["median_ms"], f"{r['ratio']:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [r["config"] for r in sub], rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{section}, N={n}")
        ax.set_ylabel("median ms (IQR bars; label: ratio to SDPA)")
    fig.tight_layout()
    return fig


COLUMNS = [
    ("section", "section", ""),
    ("N", "N", "d"),
    ("config", "config", ""),
    ("median ms", "median_ms", ".2f"),
    ("p25 ms", "p25_ms", ".2f"),
    ("p75 ms", "p75_ms", ".2f"),
    ("min ms", "min_ms", ".2f"),
    ("ratio to SDPA", "ratio", ".3f"),
    ("paired ratio", "ratio_paired", ".3f"),
    ("rounds", "n", "d"),
]


def main(argv=None):
    args = parse_args(argv)
    malloc_tuned = False if args.no_malloc_tuning else _harness.tune_malloc()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows = []
    for n in args.tokens:
        shape = (args.batch, args.heads, n, args.head_dim)
        q, k, v = (torch.randn(shape, dtype=dtype) for _ in range(3))
        repeats = args.long_repeats if n > 512 else args.repeats
        rows += run_section("forward", fwd_configs(q, k, v), "sdpa_fwd", shape, repeats, args)
        rows += run_section("fwd+bwd", train_configs(q, k, v), "sdpa_fwd+bwd", shape, repeats, args)
        rows += run_section(
            "varlen fwd", varlen_configs(shape, dtype, False), "sdpa_padded_mask_fwd", shape, repeats, args
        )
        rows += run_section(
            "varlen fwd+bwd", varlen_configs(shape, dtype, True), "sdpa_padded_mask_fwd+bwd", shape, repeats, args
        )

    meta = _harness.env_meta(args, torch.device("cpu"))
    meta["malloc_tuned"] = malloc_tuned
    meta["backend"] = lotus_kernels._backend.select(torch.device("cpu"), "attention")
    name = "attention_quick" if args.quick else "attention"
    title = (
        f"Attention (+ patch scores): B={args.batch}, H={args.heads}, D={args.head_dim}, {args.dtype}, "
        f"{meta['threads']} threads, lotus backend {meta['backend']}"
    )
    notes = [
        "ratio = median / the section's SDPA median; paired ratio = median over rounds of time / SDPA time "
        "in the same round; IQR = p25..p75 over rounds.",
        "explicit_softmax_fwd+maps materialises the [B, H, N, N] map (timm fused_attn=False + a hook); "
        "lotus_fwd+cls_scores returns out and the [B, N] class-token scores from the fused pass.",
        "lotus *_scores rows include the sink rule (sink='mean') applied in PyTorch.",
        "varlen sections: image b keeps round(N * r_b) tokens, r_b = linspace(0.5, 1, B); padded rows run "
        "on [B, H, N, D] with a mask, lotus_varlen_packed on the T = sum of kept tokens only.",
    ]
    md = _harness.write_results(name, meta, rows, COLUMNS, plot, title=title, notes=notes)
    print(md)
    return rows


if __name__ == "__main__":
    main()

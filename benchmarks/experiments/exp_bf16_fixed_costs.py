"""Experiment (not part of `make bench`): the fixed per-layer costs of a bf16-autocast block-sparse
layer, and where the bf16 ViT-S train step's time goes beyond our kernels.

    PYTHONPATH=. python benchmarks/experiments/exp_bf16_fixed_costs.py layers --threads 1 --dtype bf16
    PYTHONPATH=. python benchmarks/experiments/exp_bf16_fixed_costs.py layers --threads 2 --x-dtype bf16  # x bf16
    PYTHONPATH=. python benchmarks/experiments/exp_bf16_fixed_costs.py step --threads 1

``layers``: BlockSparseLinear fwd+bwd (x fp32 [1576, in], forward under autocast, as the benchmark)
with the bias gradient fused into bwd_input (the default) vs the previous separate ``dy.sum(0)``,
beside dense ``nn.Linear``; with x fp32 under bf16 autocast also "cast": x cast to bf16 before the
layer, as autocast did before the mixed call (an fp32 x now goes into the kernels as it is: "fused"); interleaved rounds in one process, per-process CPU time (min over
rounds: a descheduled process does not accumulate it) and wall clock.
``step``: ViT-S batch 8 train step under bf16 autocast, dense vs keep 0.7 + 50% blocks on every
linear, with SDPA as autocast runs it (bf16) and with SDPA run in fp32 (inputs upcast, output
rounded back): torch's CPU bf16 flash-attention backward is slower than its fp32 one on CPUs
without AMX, and does not shrink with the token count as fp32 does.
Prints only (no result files): loaded-machine numbers are indicative.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from benchmarks import _harness
except ImportError:  # run as a script without the repo root on sys.path: _harness.py is one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import _harness
from lotus_kernels.nn import BlockSparseLinear

_ops = sys.modules["lotus_kernels.ops.block_sparse_linear"]
FUSED = _ops._bsl_bwd_input_bias


def separate(dy, *fmt):
    """The previous path: bwd_input, then a reduction over dy of its own."""
    return _ops._bsl_bwd_input(dy, *fmt), dy.sum(0)


def interleaved(configs: dict, rounds: int, setup, gc_per_call: bool = False):
    """configs: name -> (fn, variant); setup(variant) switches before each call. gc_per_call: a full
    ``gc.collect()`` before every timed call, as benchmarks/_harness.interleaved does (a cold start:
    the collection walks the heap, evicting caches, and the OpenMP pool falls asleep)."""
    for fn, variant in configs.values():
        setup(variant)
        fn(), fn()
    cpu = {k: [] for k in configs}
    wall = {k: [] for k in configs}
    for _ in range(rounds):
        for name, (fn, variant) in configs.items():
            setup(variant)
            if gc_per_call:
                gc.collect()
            t, w = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - t)
            wall[name].append(time.perf_counter() - w)
    return cpu, wall


def layers(args):
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    amp = dtype != torch.float32

    def set_variant(v):
        _ops._bsl_bwd_input_bias = v

    try:
        for shape in args.shapes.split(","):
            in_f, out_f = map(int, shape.split("x"))
            torch.manual_seed(0)
            base = torch.nn.Linear(in_f, out_f)
            # fp32 x: as the benchmark and as qkv / fc1 see it (LayerNorm runs fp32 under CPU autocast);
            # bf16 x: as fc2 / proj see it (GELU / attention output already bf16): no cast either way.
            x = torch.randn(
                args.m, in_f, dtype=torch.bfloat16 if args.x_dtype == "bf16" else torch.float32, requires_grad=True
            )
            g = torch.randn(args.m, out_f, dtype=dtype)

            def train(layer, cast_x=False):
                def fn():
                    with torch.autocast("cpu", dtype=dtype, enabled=amp):
                        y = layer(x.to(dtype) if cast_x else x)
                    y.backward(g)
                    layer.zero_grad(set_to_none=True)
                    x.grad = None

                return fn

            configs = {"dense": (train(copy.deepcopy(base)), FUSED)}
            cast = amp and x.dtype == torch.float32
            for d in map(float, args.densities.split(",")):
                ours = BlockSparseLinear.from_linear(base, density=d, block_size=32)
                configs[f"separate@{d:g}"] = (train(ours), separate)
                configs[f"fused@{d:g}"] = (train(ours), FUSED)
                if cast:  # before the mixed call: autocast's cast of x, ToCopyBackward's of dx
                    configs[f"cast@{d:g}"] = (train(ours, cast_x=True), FUSED)
            cpu, wall = interleaved(configs, args.rounds, set_variant, args.gc_per_call)
            dc, dw = min(cpu["dense"]), min(wall["dense"])
            print(
                f"{args.dtype} (x {args.x_dtype}) {args.threads} thread(s) {args.m}x{in_f}->{out_f}: dense CPU {dc * 1e3:.2f} ms, "
                f"wall {dw * 1e3:.2f} ms (min of {args.rounds})"
            )
            for d in map(float, args.densities.split(",")):
                s, f = min(cpu[f"separate@{d:g}"]), min(cpu[f"fused@{d:g}"])
                print(
                    f"  d = {d:g}: separate {s * 1e3:6.2f} ms ({s / dc:.3f}), fused {f * 1e3:6.2f} ms ({f / dc:.3f}) "
                    f"CPU time; saved {(s - f) * 1e3:+.3f} ms; wall median fused / dense "
                    f"{statistics.median(wall[f'fused@{d:g}']) / statistics.median(wall['dense']):.3f}"
                )
                if cast:
                    c = min(cpu[f"cast@{d:g}"])
                    print(
                        f"          x cast first (before) {c * 1e3:6.2f} ms ({c / dc:.3f}) CPU time; fused saves "
                        f"{(c - f) * 1e3:+.3f} ms; wall median cast / dense "
                        f"{statistics.median(wall[f'cast@{d:g}']) / statistics.median(wall['dense']):.3f}"
                    )
    finally:
        set_variant(FUSED)


def step(args):
    import timm

    import lotus_kernels

    sdpa = F.scaled_dot_product_attention

    def sdpa_fp32(q, k, v, *a, **kw):
        if q.dtype != torch.bfloat16:
            return sdpa(q, k, v, *a, **kw)
        with torch.autocast("cpu", enabled=False):
            return sdpa(q.float(), k.float(), v.float(), *a, **kw).to(q.dtype)

    torch.manual_seed(0)
    base = timm.create_model("vit_small_patch16_224", pretrained=False)
    images = torch.randn(8, 3, 224, 224)
    labels = torch.randint(base.num_classes, (8,))
    dense = lotus_kernels.patch_vit(copy.deepcopy(base)).train()
    sparse = lotus_kernels.patch_vit(
        lotus_kernels.sparsify_(
            copy.deepcopy(base),
            sparsity=0.5,
            layout="block",
            block_size=32,
            include=["blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2"],
        )
    ).train()

    def make(model, **kw):
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def fn():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(images, **kw), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return fn

    configs = {}
    for name, attn in (("bf16 SDPA", sdpa), ("fp32 SDPA", sdpa_fp32)):
        configs[f"dense, {name}"] = (make(dense), attn)
        configs[f"keep 0.7 + blocks 50%, {name}"] = (make(sparse, keep_ratio=0.7), attn)

    def set_attn(a):
        F.scaled_dot_product_attention = a

    try:
        cpu, _ = interleaved(configs, args.rounds, set_attn)
    finally:
        set_attn(sdpa)
    for k in configs:
        print(f"{k:34s} CPU time min {min(cpu[k]) * 1e3:7.1f} ms, median {statistics.median(cpu[k]) * 1e3:7.1f}")
    for name in ("bf16 SDPA", "fp32 SDPA"):
        ours = min(cpu[f"keep 0.7 + blocks 50%, {name}"])
        print(f"keep 0.7 + blocks 50% / dense, both with {name}: {ours / min(cpu[f'dense, {name}']):.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("layers", "step"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--shapes", default="384x1536,1536x384")
    p.add_argument("--densities", default="0.1,0.3,0.5")
    p.add_argument("--m", type=int, default=1576)
    p.add_argument(
        "--gc-per-call", action="store_true", help="layers: gc.collect() before every call (as the benchmark)"
    )
    p.add_argument("--x-dtype", default="fp32", choices=("fp32", "bf16"), help="layers: the input's dtype")
    p.add_argument("--rounds", type=int, default=None, help="default: 15 (layers), 5 (step)")
    args = p.parse_args()
    args.rounds = args.rounds or (15 if args.what == "layers" else 5)
    _harness.tune_malloc()
    torch.set_num_threads(args.threads)
    (layers if args.what == "layers" else step)(args)


if __name__ == "__main__":
    main()

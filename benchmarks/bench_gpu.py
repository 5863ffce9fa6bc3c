"""GPU benchmarks with goals, bf16, each peer side by side in one interleaved run (``make gpu-check``
runs them after the GPU tests; alone: ``PYTHONPATH=. python3 benchmarks/bench_gpu.py``).

Sections (each row: median seconds per call over interleaved rounds of CUDA-event timings, ratio to the
section's baseline, paired ratio = median over rounds of the per-round ratio):

  vit_step    ViT-B/16 train step (fwd + bwd + AdamW, bf16 autocast), keep 0.5: dense timm, timm
              PatchDropout(0.5), lotus ``patch_vit`` with keep_idx (98 of 196 patches), lotus + 50%
              block-sparse MLP. Goals: lotus <= 0.55x dense, and not slower than PatchDropout.
  block       block-sparse linear at ViT-B shapes (768 -> 3072, 3072 -> 768, M = batch * 197 tokens,
              32 x 32 blocks), density 0.5 / 0.3 / 0.1: fwd + bwd of the triton and cuda backends vs
              cuBLAS dense ``F.linear``; forward only also vs torch BSR (no autograd for its values).
              Goals (fwd + bwd): <= 0.65 / 0.45 / 0.20x dense.
  semi24      2:4 ViT-L MLP (1024 -> 4096 -> GELU -> 1024) fwd + bwd with a weight update per call (so
              the once-per-step compression is paid), row-wise and transposable masks vs dense.
              Goal: >= 1.2x faster than dense (torchao reports 1.25x).
  attention   ViT-B attention (B x 12 heads x 197 tokens x 64) forward: SDPA on the flash backend vs
              lotus (Triton) forward, and forward + class-token scores. Goal: + scores <= 1.15x SDPA.
              Forward + backward also, for information.

``--smoke`` runs every section on tiny sizes on whatever device there is (CPU: Triton interpreted),
to check the code paths, not the speed.
"""
from __future__ import annotations

import argparse
import copy
import math
import random
import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn

import lotus_kernels
from lotus_kernels import _backend
from lotus_kernels.ops import attention, block_sparse_linear
from lotus_kernels.ops.block_sparse_linear import bsr_from_dense

GOALS = {  # section -> row -> (kind, target): "<=" ratio to the baseline, ">=" speed-up over it
    "vit_step": {"lotus keep 0.5": ("<=", 0.55), "lotus vs PatchDropout": ("<=", 1.0)},
    "block": {"d=0.5": ("<=", 0.65), "d=0.3": ("<=", 0.45), "d=0.1": ("<=", 0.20)},
    "semi24": {"2:4 MLP speed-up": (">=", 1.2)},
    "attention": {"fwd + cls scores": ("<=", 1.15)},
}


# ---------------------------------------------------------------- timing
class Timer:
    """Interleaved timing: every round runs every config (``reps`` calls back to back) in a fresh
    random order; CUDA events on a GPU (the device's own timeline), perf_counter + sync elsewhere."""

    def __init__(self, device: torch.device, warmup: int, rounds: int, reps: int):
        self.device, self.warmup, self.rounds, self.reps = device, warmup, rounds, reps

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, configs: dict) -> dict[str, list[float]]:
        for fn in configs.values():
            for _ in range(self.warmup):
                fn()
        self._sync()
        names = list(configs)
        rng = random.Random(0)
        times = {n: [] for n in names}
        for _ in range(self.rounds):
            rng.shuffle(names)
            for n in names:
                if self.device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(self.reps):
                        configs[n]()
                    end.record()
                    end.synchronize()
                    times[n].append(start.elapsed_time(end) / 1e3 / self.reps)
                else:
                    self._sync()
                    t0 = time.perf_counter()
                    for _ in range(self.reps):
                        configs[n]()
                    self._sync()
                    times[n].append((time.perf_counter() - t0) / self.reps)
        return times


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def rows_from(section: str, times: dict, baseline: str, extra: dict | None = None) -> list[dict]:
    base = times[baseline]
    rows = []
    for name, ts in times.items():
        rows.append({"section": section, "config": name, "median_ms": 1e3 * _median(ts),
                     "min_ms": 1e3 * min(ts), "ratio": _median(ts) / _median(base),
                     "ratio_paired": _median([a / b for a, b in zip(ts, base)]), "baseline": baseline,
                     "n": len(ts), **(extra or {})})
    return rows


# ---------------------------------------------------------------- sections
def bench_vit_step(device, timer, smoke) -> list[dict]:
    import timm
    from timm.layers import PatchDropout

    from lotus_kernels import patch_vit, sparsify_
    if smoke:
        kw, batch = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2), 4
    else:
        kw, batch = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12), 128
    torch.manual_seed(0)
    base = timm.models.vision_transformer.VisionTransformer(num_classes=1000, **kw).to(device)
    n = base.patch_embed.num_patches
    keep = n // 2  # timm's PatchDropout keeps int(n * (1 - 0.5)) patches: the same count
    dense = base
    drop = copy.deepcopy(base)
    drop.patch_drop = PatchDropout(0.5, num_prefix_tokens=drop.num_prefix_tokens)
    lotus = patch_vit(copy.deepcopy(base))
    lotus_block = patch_vit(copy.deepcopy(base))
    sparsify_(lotus_block, sparsity=0.5, layout="block", block_size=16 if smoke else 32, include=["*.mlp.*"])
    images = torch.randn(batch, 3, kw["img_size"], kw["img_size"], device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    idx = torch.rand(batch, n, device=device).topk(keep, dim=1).indices.sort(dim=1).values
    amp = dict(device_type=device.type, dtype=torch.bfloat16)

    def step_fn(model, **fwd_kw):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
        model.train()

        def step():
            with torch.autocast(**amp):
                loss = F.cross_entropy(model(images, **fwd_kw), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    configs = {"dense": step_fn(dense), "timm PatchDropout 0.5": step_fn(drop),
               "lotus keep 0.5": step_fn(lotus, keep_idx=idx), "lotus keep 0.5 + block MLP 0.5": step_fn(lotus_block, keep_idx=idx)}
    rows = rows_from("vit_step", timer.run(configs), "dense", {"batch": batch, "kept": keep, "patches": n})
    by = {r["config"]: r for r in rows}
    rows.append({"section": "vit_step", "config": "lotus vs PatchDropout", "baseline": "timm PatchDropout 0.5",
                 "ratio": by["lotus keep 0.5"]["median_ms"] / by["timm PatchDropout 0.5"]["median_ms"],
                 "ratio_paired": None, "median_ms": None})
    return rows


def _block_configs(x, w, b, g, fmt, backends, fwd_only):
    """{name: callable}: dense F.linear and each lotus backend, fwd+bwd (or forward only)."""
    values = fmt[0].detach().requires_grad_(not fwd_only)
    wd = w.detach().requires_grad_(not fwd_only)
    bd = b.detach().requires_grad_(not fwd_only)
    xs = x.detach().requires_grad_(not fwd_only)
    configs = {}

    def dense():
        y = F.linear(xs, wd, bd)
        if not fwd_only:
            torch.autograd.grad(y, (xs, wd, bd), g)
    configs["dense (cuBLAS)"] = dense
    for be in backends:
        def sparse(be=be):
            with lotus_kernels.use_backend(be):
                y = block_sparse_linear(xs, values, *fmt[1:], bd)
                if not fwd_only:
                    torch.autograd.grad(y, (xs, values, bd), g)
        configs[f"lotus {be}"] = sparse
    return configs


def bench_block(device, timer, smoke) -> list[dict]:
    backends = [b for b in ("triton", "cuda") if lotus_kernels.backends().get(b)]
    if device.type == "cpu":
        backends = ["cpu"]
    M, bs, dtype = (64, 16, torch.float32) if smoke else (64 * 197, 32, torch.bfloat16)
    shapes = [(128, 32), (32, 128)] if smoke else [(3072, 768), (768, 3072)]  # (out, in): fc1, fc2
    rows = []
    for out_f, in_f in shapes:
        for d in (0.5, 0.3, 0.1):
            torch.manual_seed(0)
            w = torch.randn(out_f, in_f, device=device) / math.sqrt(in_f)
            nb = (out_f // bs) * (in_f // bs)
            mask = torch.zeros(nb, dtype=torch.bool, device=device)
            mask[torch.randperm(nb, device=device)[:round(d * nb)]] = True  # exactly d of the blocks
            mask = mask.reshape(out_f // bs, in_f // bs)
            fmt = [t.to(dtype) if t.is_floating_point() else t for t in bsr_from_dense(w, mask, bs)]
            wm = (w * mask.repeat_interleave(bs, 0).repeat_interleave(bs, 1)).to(dtype)
            b = torch.randn(out_f, device=device, dtype=dtype)
            x = torch.randn(M, in_f, device=device, dtype=dtype)
            g = torch.randn(M, out_f, device=device, dtype=dtype)
            extra = {"shape": f"{in_f}->{out_f}", "density": d, "M": M, "block": bs, "dtype": str(dtype)[6:]}
            times = timer.run(_block_configs(x, wm, b, g, fmt, backends, fwd_only=False))
            rows += rows_from("block", times, "dense (cuBLAS)", {**extra, "pass": "fwd+bwd"})
            fwd = _block_configs(x, wm, b, g, fmt, backends, fwd_only=True)
            try:  # torch BSR: y^T = W_bsr @ x^T (its kernels take BSR on the left)
                w_bsr = wm.to_sparse_bsr((bs, bs))
                xt = x.t().contiguous()
                (w_bsr @ xt)  # noqa: B018  (fails here if this dtype / device is unsupported)

                def torch_bsr():
                    (w_bsr @ xt).t() + b
                fwd["torch BSR"] = torch_bsr
            except Exception as e:  # noqa: BLE001
                extra["torch_bsr_error"] = f"{type(e).__name__}: {str(e)[:120]}"
            with torch.no_grad():
                rows += rows_from("block", timer.run(fwd), "dense (cuBLAS)", {**extra, "pass": "fwd"})
    return rows


def bench_semi24(device, timer, smoke) -> list[dict]:
    from lotus_kernels.nn import SemiStructuredLinear
    dim, hidden, M = (64, 256, 128) if smoke else (1024, 4096, 64 * 197)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(dim, hidden, device=device, dtype=dtype), nn.Linear(hidden, dim, device=device, dtype=dtype)
    dense = nn.Sequential(fc1, nn.GELU(), fc2)
    strict = device.type == "cuda"

    def sparse_mlp(transposable):
        return nn.Sequential(SemiStructuredLinear.from_linear(fc1, strict=strict, transposable=transposable), nn.GELU(),
                             SemiStructuredLinear.from_linear(fc2, strict=strict, transposable=transposable))
    models = {"dense": dense, "2:4 row-wise mask": sparse_mlp(False), "2:4 transposable mask": sparse_mlp(True)}
    x = torch.randn(M, dim, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(M, dim, device=device, dtype=dtype)

    def fwd_bwd(model):
        params = [p for p in model.parameters()]

        def fn():
            model(x).backward(g)
            with torch.no_grad():  # stands for the optimizer step: new weight values, new compression
                for p in params:
                    p.add_(0.0)
                    p.grad = None
            x.grad = None
        return fn
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = timer.run({name: fwd_bwd(m) for name, m in models.items()})
    rows = rows_from("semi24", times, "dense", {"M": M, "dim": dim, "hidden": hidden})
    best = min((r for r in rows if r["config"] != "dense"), key=lambda r: r["ratio"])
    rows.append({"section": "semi24", "config": "2:4 MLP speed-up", "baseline": "dense", "ratio": 1 / best["ratio"],
                 "ratio_paired": None, "median_ms": None, "best": best["config"]})
    return rows


def bench_attention(device, timer, smoke) -> list[dict]:
    B, H, N, D = (2, 2, 50, 32) if smoke else (64, 12, 197, 64)
    dtype = torch.bfloat16
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
    backend = "triton" if lotus_kernels.backends().get("triton") and device.type == "cuda" else (
        "cpu" if device.type == "cpu" else "reference")

    def sdpa_ctx():
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
        import contextlib
        return contextlib.nullcontext()

    def sdpa():
        with sdpa_ctx():
            F.scaled_dot_product_attention(q, k, v)

    def ours(scores):
        def fn():
            with lotus_kernels.use_backend(backend):
                attention(q, k, v, return_scores="cls" if scores else None)
        return fn
    with torch.no_grad():
        times = timer.run({"SDPA flash fwd": sdpa, "lotus fwd": ours(False), "fwd + cls scores": ours(True)})
    rows = rows_from("attention", times, "SDPA flash fwd", {"shape": f"{B}x{H}x{N}x{D}", "backend": backend})
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    go = torch.randn_like(q)

    def sdpa_fb():
        with sdpa_ctx():
            torch.autograd.grad(F.scaled_dot_product_attention(qg, kg, vg), (qg, kg, vg), go)

    def ours_fb():
        with lotus_kernels.use_backend(backend):
            torch.autograd.grad(attention(qg, kg, vg), (qg, kg, vg), go)
    times = timer.run({"SDPA flash fwd+bwd": sdpa_fb, "lotus fwd+bwd": ours_fb})
    rows += rows_from("attention", times, "SDPA flash fwd+bwd", {"shape": f"{B}x{H}x{N}x{D}", "backend": backend})
    return rows


SECTIONS = {"attention": bench_attention, "block": bench_block, "semi24": bench_semi24, "vit_step": bench_vit_step}


# ---------------------------------------------------------------- goals
def goal_rows(rows: list[dict]) -> list[dict]:
    """One row per goal: measured value, target, met or not (None when the section did not run)."""
    out = []
    for section, goals in GOALS.items():
        sec = [r for r in rows if r.get("section") == section]
        for label, (kind, target) in goals.items():
            if section == "block":
                d = float(label.split("=")[1])
                cands = [r for r in sec if r.get("pass") == "fwd+bwd" and r.get("density") == d
                         and r["config"].startswith("lotus")]
                for shape in sorted({r["shape"] for r in cands}):
                    for r in (r for r in cands if r["shape"] == shape):
                        out.append(_goal(section, f"{label} {shape} {r['config']}", kind, target, r["ratio"]))
                continue
            r = next((r for r in sec if r["config"] == label), None)
            out.append(_goal(section, label, kind, target, None if r is None else r["ratio"]))
    return out


def _goal(section, label, kind, target, value):
    met = None if value is None else (value <= target if kind == "<=" else value >= target)
    return {"section": section, "goal": label, "kind": kind, "target": target, "value": value, "met": met}


def run(device: torch.device, sections, smoke: bool, deadline: float, log=print) -> tuple[list[dict], dict]:
    """Runs the sections in order until ``deadline`` (time.monotonic()); returns (rows, status)."""
    timer = Timer(device, warmup=1 if smoke else 3, rounds=2 if smoke else 10, reps=1 if smoke else 3)
    rows, status = [], {}
    for name in sections:
        if time.monotonic() > deadline:
            status[name] = "skipped: out of time"
            log(f"bench {name}: skipped (out of time)")
            continue
        t0 = time.monotonic()
        try:
            rows += SECTIONS[name](device, timer, smoke)
            status[name] = f"ok in {time.monotonic() - t0:.0f} s"
        except Exception as e:  # noqa: BLE001  (one broken section must not lose the others)
            status[name] = f"error: {type(e).__name__}: {e}"
            log(traceback.format_exc())
        log(f"bench {name}: {status[name]}")
    return rows, status


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--smoke", action="store_true", help="tiny sizes, any device: checks the code paths only")
    p.add_argument("--budget", type=float, default=300, help="seconds; sections past it are skipped")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, status = run(device, args.sections, args.smoke, time.monotonic() + args.budget)
    for r in goal_rows(rows):
        print(r)
    print(status, _backend.backends())


if __name__ == "__main__":
    main()

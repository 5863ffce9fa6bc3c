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

Every row also carries its roofline prediction (``roofline.py``: per kernel max(bytes / 4.3 TB/s, FLOPs /
peak) summed, plus a launch overhead per kernel): ``floor_ms`` (the physical floor), ``predicted_ms``,
``bound`` (memory / compute) and ``measured_over_predicted``; ``prediction_table(rows)`` prints them side
by side. A goal below its floor (the best ratio the roofline allows: the row's floor over the
baseline's) is unreachable whatever the kernel: ``goal_rows`` then sets it at the floor + 10% and says
so (``target_original``, ``note``).

``--smoke`` runs every section on tiny sizes on whatever device there is (CPU: Triton interpreted),
to check the code paths, not the speed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import random
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lotus_kernels
from lotus_kernels import _backend
from lotus_kernels.ops import attention, block_sparse_linear
from lotus_kernels.ops.block_sparse_linear import bsr_from_dense

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402

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
        rows.append(
            {
                "section": section,
                "config": name,
                "median_ms": 1e3 * _median(ts),
                "min_ms": 1e3 * min(ts),
                "ratio": _median(ts) / _median(base),
                "ratio_paired": _median([a / b for a, b in zip(ts, base)]),
                "baseline": baseline,
                "n": len(ts),
                **(extra or {}),
            }
        )
    return add_predictions(rows)


def add_predictions(rows: list[dict]) -> list[dict]:
    """Each row with a roofline model (``roofline.predict``) gets floor_ms, predicted_ms, bound, kernels,
    gflop, mbytes and measured_over_predicted; with its baseline, floor_ratio and predicted_ratio (the
    ratio goals compare against: the best the roofline allows, and what it predicts)."""
    by = {r["config"]: r for r in rows}
    for r in rows:
        p = roofline.predict(r)
        if p is not None:
            r.update(p)
            if r.get("median_ms"):
                r["measured_over_predicted"] = r["median_ms"] / p["predicted_ms"]
    for r in rows:
        b = by.get(r.get("baseline"))
        if b is not None and "floor_ms" in r and "floor_ms" in b:
            r["floor_ratio"] = r["floor_ms"] / b["floor_ms"]
            r["predicted_ratio"] = r["predicted_ms"] / b["predicted_ms"]
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

    configs = {
        "dense": step_fn(dense),
        "timm PatchDropout 0.5": step_fn(drop),
        "lotus keep 0.5": step_fn(lotus, keep_idx=idx),
        "lotus keep 0.5 + block MLP 0.5": step_fn(lotus_block, keep_idx=idx),
    }
    rows = rows_from("vit_step", timer.run(configs), "dense", {"batch": batch, "kept": keep, "patches": n})
    by = {r["config"]: r for r in rows}
    lot, drop = by["lotus keep 0.5"], by["timm PatchDropout 0.5"]
    rows.append(
        {
            "section": "vit_step",
            "config": "lotus vs PatchDropout",
            "baseline": "timm PatchDropout 0.5",
            "ratio": lot["median_ms"] / drop["median_ms"],
            "ratio_paired": None,
            "median_ms": None,
            **(
                {
                    "floor_ratio": lot["floor_ms"] / drop["floor_ms"],
                    "predicted_ratio": lot["predicted_ms"] / drop["predicted_ms"],
                }
                if "floor_ms" in lot
                else {}
            ),
        }
    )
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
            mask[torch.randperm(nb, device=device)[: round(d * nb)]] = True  # exactly d of the blocks
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
        return nn.Sequential(
            SemiStructuredLinear.from_linear(fc1, strict=strict, transposable=transposable),
            nn.GELU(),
            SemiStructuredLinear.from_linear(fc2, strict=strict, transposable=transposable),
        )

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
    # a speed-up: floor_ratio here is the best speed-up the roofline allows (dense floor / 2:4 floor)
    fastest = min(
        (r for r in rows if "floor_ms" in r and r["config"] != "dense"), key=lambda r: r["floor_ms"], default=None
    )
    dense = next(r for r in rows if r["config"] == "dense")
    rows.append(
        {
            "section": "semi24",
            "config": "2:4 MLP speed-up",
            "baseline": "dense",
            "ratio": 1 / best["ratio"],
            "ratio_paired": None,
            "median_ms": None,
            "best": best["config"],
            **(
                {
                    "floor_ratio": dense["floor_ms"] / fastest["floor_ms"],
                    "predicted_ratio": dense["predicted_ms"] / fastest["predicted_ms"],
                }
                if fastest
                else {}
            ),
        }
    )
    return rows


@contextlib.contextmanager
def _attention_path(path: str | None):
    """Force the attention output's path ("sdpa" / "fused", ops.attention.DEFAULT_PATH) for the block."""
    from lotus_kernels.ops.attention import ENV_PATH

    old = os.environ.get(ENV_PATH)
    if path is not None:
        os.environ[ENV_PATH] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_PATH, None)
        else:
            os.environ[ENV_PATH] = old


def bench_attention(device, timer, smoke) -> list[dict]:
    from lotus_kernels.ops.attention import DEFAULT_PATH

    B, H, N, D = (2, 2, 50, 32) if smoke else (64, 12, 197, 64)
    dtype = torch.bfloat16
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
    backend = (
        "triton"
        if lotus_kernels.backends().get("triton") and device.type == "cuda"
        else ("cpu" if device.type == "cpu" else "reference")
    )
    path = os.environ.get("LOTUS_KERNELS_ATTENTION_PATH") or DEFAULT_PATH.get(device.type, "fused")

    def sdpa_ctx():
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
        return contextlib.nullcontext()

    def sdpa():
        with sdpa_ctx():
            F.scaled_dot_product_attention(q, k, v)

    def ours(scores, force=None):
        def fn():
            with lotus_kernels.use_backend(backend), _attention_path(force):
                attention(q, k, v, return_scores="cls" if scores else None)

        return fn

    # the goal row ("fwd + cls scores") takes the default path; both paths are timed beside it, so that one
    # run tells which one DEFAULT_PATH should name
    with torch.no_grad():
        times = timer.run(
            {
                "SDPA flash fwd": sdpa,
                "lotus fwd": ours(False),
                "fwd + cls scores": ours(True),
                "fwd + cls scores, fused kernel": ours(True, "fused"),
                "fwd + cls scores, sdpa + cls-row kernel": ours(True, "sdpa"),
            }
        )
    extra = {"shape": f"{B}x{H}x{N}x{D}", "backend": backend, "path": path}
    rows = rows_from("attention", times, "SDPA flash fwd", extra)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    go = torch.randn_like(q)

    def sdpa_fb():
        with sdpa_ctx():
            torch.autograd.grad(F.scaled_dot_product_attention(qg, kg, vg), (qg, kg, vg), go)

    def ours_fb():
        with lotus_kernels.use_backend(backend):
            torch.autograd.grad(attention(qg, kg, vg), (qg, kg, vg), go)

    times = timer.run({"SDPA flash fwd+bwd": sdpa_fb, "lotus fwd+bwd": ours_fb})
    rows += rows_from("attention", times, "SDPA flash fwd+bwd", extra)
    return rows


SECTIONS = {"attention": bench_attention, "block": bench_block, "semi24": bench_semi24, "vit_step": bench_vit_step}


# ---------------------------------------------------------------- goals
# The attention goal is about the op with DEFAULT_PATH set to the faster path, which this run measures:
# it takes the best of these rows.
ATTENTION_GOAL_ROWS = ("fwd + cls scores", "fwd + cls scores, fused kernel", "fwd + cls scores, sdpa + cls-row kernel")


def goal_rows(rows: list[dict]) -> list[dict]:
    """One row per goal: measured value, target, met or not (None when the section did not run), and the
    roofline's floor and prediction for it; a target the floor makes unreachable is moved to the floor +
    10% (``target_original`` keeps the old one, ``note`` says why)."""
    out = []
    for section, goals in GOALS.items():
        sec = [r for r in rows if r.get("section") == section]
        for label, (kind, target) in goals.items():
            if section == "block":
                d = float(label.split("=")[1])
                cands = [
                    r
                    for r in sec
                    if r.get("pass") == "fwd+bwd" and r.get("density") == d and r["config"].startswith("lotus")
                ]
                for shape in sorted({r["shape"] for r in cands}):
                    for r in (r for r in cands if r["shape"] == shape):
                        out.append(_goal(section, f"{label} {shape} {r['config']}", kind, target, r))
                continue
            names = ATTENTION_GOAL_ROWS if (section, label) == ("attention", "fwd + cls scores") else (label,)
            cands = [r for r in sec if r["config"] in names]
            r = min(cands, key=lambda r: r["ratio"], default=None)
            if r is not None and len(cands) > 1:  # the floor: the best path's
                r = {
                    **r,
                    "floor_ratio": min((c.get("floor_ratio", math.inf) for c in cands), default=None),
                    "goal_row": r["config"],
                }
            out.append(_goal(section, label, kind, target, r))
    return out


def _goal(section, label, kind, target, row):
    value = None if row is None else row["ratio"]
    floor = None if row is None else row.get("floor_ratio")
    floor = None if floor is None or not math.isfinite(floor) else floor
    original, note = target, None
    if floor is not None and kind == "<=" and target < floor:
        target = round(1.1 * floor, 3)
        why = "activations read and written whole whatever the density" if section == "block" else "see roofline.py"
        note = (
            f"unreachable: the roofline floor is {floor:.3f}x ({row.get('bound', '?')}-bound: {why}); "
            "goal set at floor + 10%"
        )
    elif floor is not None and kind == ">=" and target > floor:
        target = round(floor / 1.1, 3)
        note = f"unreachable: the roofline allows at most {floor:.3f}x; goal set 10% under it"
    met = None if value is None else (value <= target if kind == "<=" else value >= target)
    return {
        "section": section,
        "goal": label,
        "kind": kind,
        "target": target,
        "value": value,
        "met": met,
        "target_original": original,
        "floor": floor,
        "predicted": None if row is None else row.get("predicted_ratio"),
        "note": note,
        **({"row": row["goal_row"]} if row is not None and "goal_row" in row else {}),
    }


def prediction_table(rows: list[dict]) -> str:
    """Markdown: every row's measured time beside its roofline prediction (H200 model, roofline.py)."""
    lines = [
        "| section | config | detail | measured ms | predicted ms | floor ms | bound | measured / predicted |"
        " ratio | predicted ratio | floor ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda x, f=".3f": "" if x is None else format(x, f)  # noqa: E731
    for r in rows:
        detail = ", ".join(f"{k}={r[k]}" for k in ("shape", "density", "pass", "path", "best") if k in r)
        lines.append(
            f"| {r['section']} | {r['config']} | {detail} | {fmt(r.get('median_ms'))} | "
            f"{fmt(r.get('predicted_ms'))} | {fmt(r.get('floor_ms'))} | {r.get('bound', '')} | "
            f"{fmt(r.get('measured_over_predicted'), '.2f')} | {fmt(r.get('ratio'))} | "
            f"{fmt(r.get('predicted_ratio'))} | {fmt(r.get('floor_ratio'))} |"
        )
    return "\n".join(lines)


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
    print(prediction_table(rows))
    for r in goal_rows(rows):
        print(r)
    print(status, _backend.backends())


if __name__ == "__main__":
    main()

"""Shared benchmark helpers: interleaved timing, summary statistics, environment record, result files.

Timing is interleaved (every round runs every config once, in a fresh random order) because the
machines these run on are shared and noisy: a slow spell then hits all configs alike instead of
whichever config happened to be running, so ratios between configs stay meaningful.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lotus_kernels import machine

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def interleaved(
    configs: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    progress: bool = True,
    sync: Callable[[], None] | None = None,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Seconds per call of each config: ``warmup`` untimed calls each, then ``repeats`` rounds in which
    every config runs once, in an order shuffled afresh (seeded) every round.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before the clock starts and before it stops, so
    asynchronous device work is charged to the call that queued it."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in configs.values():
            fn()
    sync()
    rng = random.Random(seed)
    names = list(configs)
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds = range(repeats)
    if progress:
        from tqdm import tqdm

        rounds = tqdm(rounds, desc="rounds", unit="round", leave=False)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection landing inside one config's call would be charged to it
    try:
        for _ in rounds:
            rng.shuffle(names)
            for name in names:
                gc.collect()
                sync()
                t0 = time.perf_counter()
                configs[name]()
                sync()
                times[name].append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def add_run_args(p) -> None:
    """The flags every benchmark shares (applied by ``prepare``)."""
    # One thread by default: on the shared 2-vCPU machines these run on, every parallel region of a
    # 2-thread step waits for whichever thread the hypervisor descheduled, and train-step times
    # scattered by 2-5x between rounds; 1 thread kept the IQR within a few percent.
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--quick", action="store_true", help="short smoke run; writes results/<name>_quick.*")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="keep glibc's default of returning big blocks to the OS (see tune_malloc)",
    )
    p.add_argument(
        "--note", default="", help="a line about the run written into the results, e.g. 'loaded machine, indicative'"
    )


def prepare(args):
    """Apply the shared flags: malloc tuning, threads, device, seed. Returns (device, sync, meta)."""
    malloc_tuned = False if args.no_malloc_tuning else tune_malloc()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    torch.manual_seed(0)
    meta = env_meta(args, device)
    meta["malloc_tuned"] = malloc_tuned
    meta["note"] = getattr(args, "note", "")
    return device, sync, meta


def verdict(label: str, row: dict) -> str:
    """One line saying whether ``row``'s ratio to its baseline meets ``row['target']``."""
    met = "met" if row["ratio"] <= row["target"] else "missed"
    return (
        f"{label}: ratio {row['ratio']:.3f} (paired {row['ratio_paired']:.3f}) vs target {row['target']:.2f} -> {met}"
    )


def tune_malloc() -> bool:
    """Stop glibc from handing big freed blocks back to the OS (returns False where it cannot).

    By default every tensor over ~128 KiB is mmap'ed on allocation and munmap'ed on free, so each
    train step page-faults its activations in afresh; on the VMs these run on that can cost more than
    the arithmetic (a 4.8 MB out-of-place add measured 0.7-3.3 ms untuned vs 0.35-1.3 ms tuned), and
    it would be timed as if it were the model's. Takes effect for allocations made after the call."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    return all(
        libc.mallopt(param, value) == 1
        for param, value in [(M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20)]
    )


def summarize(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Per config: median, p25, p75, min (seconds); ``ratio``, its median over ``baseline``'s median;
    ``ratio_paired``, the median over rounds of its time / ``baseline``'s time in the same round
    (``interleaved`` lists are in round order), which cancels noise that lasts a round."""
    base = np.asarray(times[baseline])
    out = {}
    for name, ts in times.items():
        ts = np.asarray(ts)
        p25, med, p75 = (float(v) for v in np.percentile(ts, [25, 50, 75]))
        out[name] = {
            "median_s": med,
            "p25_s": p25,
            "p75_s": p75,
            "min_s": float(ts.min()),
            "ratio": med / float(np.median(base)),
            "ratio_paired": float(np.median(ts / base)),
            "n": len(ts),
        }
    return out


def env_meta(args, device: torch.device) -> dict:
    """What the numbers depend on besides the code (``lotus_kernels.machine.describe``: versions,
    threads, CPU model and ISA flags, MKL / oneDNN, our kernels' ISA and paths, the GPU), the date and
    the arguments. A result from one machine is not a result for another: read these first."""
    return {
        **machine.describe(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "args": vars(args),
    }


def markdown_table(rows: list[dict], table_columns: list[tuple[str, str, str]]) -> str:
    """``table_columns``: (header, row key, format spec), e.g. ("median ms", "median_ms", ".1f")."""
    lines = [
        "| " + " | ".join(h for h, _, _ in table_columns) + " |",
        "|" + "|".join("---" for _ in table_columns) + "|",
    ]
    for row in rows:
        cells = []
        for _, key, fmt in table_columns:
            v = row.get(key)
            cells.append("" if v is None else format(v, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    # Write beside the target, then rename: a crash or a reader never sees a half-written file.
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_results(
    name: str,
    meta: dict,
    rows: list[dict],
    table_columns: list[tuple[str, str, str]],
    plot_fn: Callable[[list[dict]], object],
    title: str = "",
    notes: list[str] = (),
) -> str:
    """Write ``results/{name}.json`` (meta + rows), ``{name}.md`` (table + notes) and ``{name}.png``
    (the matplotlib Figure ``plot_fn(rows)`` returns). Returns the markdown text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    base = RESULTS_DIR / name
    _atomic_write(
        base.with_suffix(".json"),
        lambda p: p.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n"),
    )

    cache = f" with {meta['cpu_cache']} cache" if meta.get("cpu_cache") else ""
    env = (
        f"torch {meta.get('torch')}, {meta.get('threads')} threads, {meta.get('cpu_model')}{cache} "
        f"({', '.join(meta.get('cpu_flags', [])) or 'no flags read'}), torch CPU capability "
        f"{meta.get('torch_cpu_capability')}, MKL {meta.get('mkl', '?')}, oneDNN {meta.get('onednn', '?')}, "
        f"lotus CPU ISA {meta.get('lotus_cpu_isa', '-')}, "
        f"device {meta.get('gpu', meta.get('device'))}, malloc tuned: {meta.get('malloc_tuned', False)}, "
        f"{meta.get('date')}"
    )
    if meta.get("note"):
        env += f"\n\n**{meta['note']}**"
    md = (
        "\n\n".join(
            part
            for part in [
                f"# {title or name}",
                env,
                markdown_table(rows, table_columns),
                "\n".join(f"- {n}" for n in notes),
            ]
            if part
        )
        + "\n"
    )
    _atomic_write(base.with_suffix(".md"), lambda p: p.write_text(md))

    fig = plot_fn(rows)
    _atomic_write(base.with_suffix(".png"), lambda p: fig.savefig(p, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return md

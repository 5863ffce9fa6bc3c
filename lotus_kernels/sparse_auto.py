"""``layout="auto"`` for ``sparsify_``: a layer is made block-sparse only where that measures faster.

The rule (SparseProp's: use the sparse kernel only where it beats dense on the machine at hand):
for each targeted layer's (out, in) shape, dtype, device and thread count, time a training step of
the layer -- forward + backward (input and weight gradient) on ``tokens`` rows -- dense and
block-sparse at ``sparsity`` for every block size that divides the shape. The layer becomes a
``BlockSparseLinear`` at the fastest block size if ``dense_time / sparse_time >= min_speedup``,
and stays a dense ``nn.Linear`` otherwise.

Measurements are cached per machine in a small JSON file (like torch's BSR Triton meta tables):
``$LOTUS_KERNELS_AUTO_CACHE`` if set, else ``$XDG_CACHE_HOME/lotus_kernels/sparse_auto.json``
(``~/.cache/...``). A key names the device (CPU model + kernel ISA, or the GPU's name), dtype,
threads, shape, rows, sparsity and layout, so a cache copied to another machine is never reused
for it. ``measure=`` injects another timer (tests use a fake one: no test depends on timing).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .ops.block_sparse_linear import BLOCK_SIZES

log = logging.getLogger("lotus_kernels.sparsify")
ENV_CACHE = "LOTUS_KERNELS_AUTO_CACHE"


@dataclasses.dataclass(frozen=True)
class Case:
    """What one measurement depends on. ``layout`` "dense" or "block<bs>"."""

    layout: str
    out_features: int
    in_features: int
    tokens: int
    sparsity: float
    dtype: str
    device: str  # where to measure: "cpu", "cuda:0"
    machine: str  # what it is: CPU model + kernel ISA, or the GPU's name
    threads: int

    def key(self) -> str:
        return (
            f"{self.machine}|{self.dtype}|threads={self.threads}|{self.out_features}x{self.in_features}|"
            f"rows={self.tokens}|sparsity={self.sparsity:.4g}|{self.layout}"
        )


@dataclasses.dataclass
class Choice:
    """What ``layout="auto"`` chose for one layer, and why."""

    name: str
    shape: tuple[int, int]
    layout: str  # "dense" or "block"
    block_size: int | None
    dense_ms: float
    sparse_ms: dict[int, float]  # block size -> ms (only the sizes that divide the shape)
    reason: str

    @property
    def speedup(self) -> float | None:
        best = min(self.sparse_ms.values(), default=None)
        return None if not best else self.dense_ms / best


class Report(list):
    """The list of ``Choice`` of one ``sparsify_(layout="auto")`` call; ``str()`` is a table."""

    def __str__(self) -> str:
        lines = [f"{'layer':40s} {'shape':>11s} {'choice':>9s} {'dense ms':>9s} {'best sparse':>12s}  why"]
        for c in self:
            best = min(c.sparse_ms.items(), key=lambda kv: kv[1], default=None)
            sparse = f"{best[1]:.3f}@{best[0]}" if best else "-"
            choice = c.layout if c.block_size is None else f"block{c.block_size}"
            lines.append(
                f"{c.name:40s} {c.shape[0]:>5d}x{c.shape[1]:<5d} {choice:>9s} {c.dense_ms:9.3f} "
                f"{sparse:>12s}  {c.reason}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------- measuring
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    from .isa import cpu_isa
    from .machine import cpu_model

    return f"cpu:{cpu_model()}:{cpu_isa()}"


def time_layer(case: Case, *, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of one forward + backward (input and weight gradients) of a random layer for
    ``case`` on ``case.tokens`` rows."""
    with torch.enable_grad():  # sparsify_ runs under no_grad
        return _time_layer(case, repeats, warmup)


def _time_layer(case: Case, repeats: int, warmup: int) -> float:
    from .nn import BlockSparseLinear

    device, dtype = torch.device(case.device), getattr(torch, case.dtype)
    lin = nn.Linear(case.in_features, case.out_features, device=device, dtype=dtype)
    if case.layout != "dense":
        bs = int(case.layout.removeprefix("block"))
        nb = (case.out_features // bs) * (case.in_features // bs)
        keep = torch.zeros(nb, dtype=torch.bool)
        keep[torch.randperm(nb)[: max(1, round((1 - case.sparsity) * nb))]] = True
        lin = BlockSparseLinear.from_linear(lin, keep.view(case.out_features // bs, -1).to(device), block_size=bs)
    x = torch.randn(case.tokens, case.in_features, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(case.tokens, case.out_features, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        lin(x).backward(g)
        x.grad = None
        lin.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------- the cache
def cache_path() -> Path:
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lotus_kernels" / "sparse_auto.json"


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or an unreadable one: measure again


def _save(path: Path, table: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=0, sort_keys=True))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new table
    except OSError as e:  # a read-only home: the choice still stands, only the cache is lost
        log.warning("sparsify_(layout='auto'): cannot write the measurement cache %s (%s)", path, e)


class Timings:
    """Cached timer: ``seconds(case)`` reads the table or measures (and remembers)."""

    def __init__(self, measure: Callable[[Case], float] | None = None, path: Path | None = None):
        self.measure = measure or time_layer
        self.path = path or cache_path()
        self.table = _load(self.path)
        self.dirty = False

    def seconds(self, case: Case) -> float:
        key = case.key()
        if key not in self.table:
            t = float(self.measure(case))
            if not t > 0:
                raise ValueError(f"measure: expected a positive time in seconds for {key}, got {t!r}")
            self.table[key] = t
            self.dirty = True
        return self.table[key]

    def flush(self) -> None:
        if self.dirty:
            _save(self.path, self.table)
            self.dirty = False


# ---------------------------------------------------------------- deciding
def choose(
    layers: dict[str, nn.Linear],
    *,
    sparsity: float,
    tokens: int,
    min_speedup: float,
    block_sizes=BLOCK_SIZES,
    measure=None,
) -> Report:
    """One ``Choice`` per layer (see the module docstring)."""
    timings = Timings(measure)
    threads = torch.get_num_threads()
    report = Report()
    try:
        for name, layer in layers.items():
            w = layer.weight
            out_f, in_f = w.shape
            base = dict(
                out_features=out_f,
                in_features=in_f,
                tokens=tokens,
                sparsity=round(float(sparsity), 4),
                dtype=str(w.dtype).removeprefix("torch."),
                device=str(w.device),
                machine=device_name(w.device),
                threads=threads,
            )
            dense = timings.seconds(Case(layout="dense", **base))
            sparse = {
                bs: timings.seconds(Case(layout=f"block{bs}", **base))
                for bs in block_sizes
                if out_f % bs == 0 and in_f % bs == 0
            }
            ms = {bs: 1e3 * t for bs, t in sparse.items()}
            if not sparse:
                c = Choice(
                    name,
                    (out_f, in_f),
                    "dense",
                    None,
                    1e3 * dense,
                    ms,
                    f"no block size in {tuple(block_sizes)} divides the shape",
                )
            else:
                bs = min(sparse, key=sparse.get)
                speedup = dense / sparse[bs]
                if speedup >= min_speedup:
                    c = Choice(
                        name,
                        (out_f, in_f),
                        "block",
                        bs,
                        1e3 * dense,
                        ms,
                        f"block {bs} is {speedup:.2f}x dense (>= min_speedup {min_speedup:g})",
                    )
                else:
                    c = Choice(
                        name,
                        (out_f, in_f),
                        "dense",
                        None,
                        1e3 * dense,
                        ms,
                        f"best sparse (block {bs}) is {speedup:.2f}x dense (< min_speedup {min_speedup:g})",
                    )
            log.info("sparsify_(layout='auto') %s %s: %s", name, c.shape, c.reason)
            report.append(c)
    finally:
        timings.flush()
    return report

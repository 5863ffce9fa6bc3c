"""Launch configurations of the Triton kernels and the one launch policy every kernel of this package
with tunable tiles goes through (``launch``), choosing in this order (as PyTorch's BSR Triton kernels
do, ``torch/sparse/_triton_ops_meta.py``):

1. the committed table below, keyed by (kernel, GPU, dtype, shape bucket): measured winners;
2. on a GPU, for a problem large enough to be worth it, ``triton.autotune`` over the kernel's small
   config list, keyed on the same shape bucket (each bucket is tuned once per process: the first call
   benchmarks every config, which syncs; later calls reuse the winner);
3. otherwise the kernel's fixed default, and under ``TRITON_INTERPRET=1`` its interpreter tiles (every
   trial there would be a full interpreted run).

``LOTUS_KERNELS_TRITON_AUTOTUNE=0`` turns step 2 off (default config instead), ``=1`` forces it on for
every size. ``tuned_table()`` returns the autotuner's winners as table entries; ``make gpu-check``
saves them in its JSON, and ``python3 benchmarks/gpu_check.py --apply-configs <that JSON>`` writes
them into the table below.

Table legend: TABLE[(kernel, gpu, dtype, bucket)] = {meta-parameter: value, ..., "num_warps": w,
"num_stages": s}; ``gpu`` is ``gpu_key()`` ("NVIDIA H100 80GB HBM3" -> "sm90-132sm": compute
capability and SM count, so an H100 SXM entry also serves an H200); ``dtype`` as in
``str(torch.float16)[6:]``; ``bucket`` a tuple of powers of two from ``bucket()`` (the block-sparse
kernels' also hold a stored-block bucket, ``nnz_bucket()``, so a d = 0.1 layer is tuned apart from a
d = 0.5 one of the same shape).
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from lotus_kernels._backend import triton_interpreted as _interpreted  # absolute: a copy of this file must load alone

ENV_AUTOTUNE = "LOTUS_KERNELS_TRITON_AUTOTUNE"

# BEGIN GENERATED DATA (winners of `make gpu-check`'s autotuning; the legend is in the docstring)
TABLE: dict[tuple, dict] = {}
# END GENERATED DATA


@functools.cache
def gpu_key(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    sms = torch.cuda.get_device_properties(index).multi_processor_count
    return f"sm{major}{minor}-{sms}sm"


@functools.cache
def num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def bucket(*sizes: int, lo: int = 16, hi: int = 1 << 20) -> tuple[int, ...]:
    """Each size rounded up to a power of two in [lo, hi]: one tuning per bucket, not per shape."""
    return tuple(max(lo, min(hi, triton.next_power_of_2(max(int(s), 1)))) for s in sizes)


def nnz_bucket(stored_blocks: int, slots: int) -> int:
    """Mean stored blocks per slot (block row or column), rounded up to a power of two: the loop length
    of a block-sparse program, i.e. the density bucket of the table / autotune keys (ViT-B fc1 at
    bs = 32: d = 0.5 / 0.3 / 0.1 -> 16 / 8 / 4 blocks per block row)."""
    return triton.next_power_of_2(max(1, -(-int(stored_blocks) // max(int(slots), 1))))


def table_entry(kernel: str, device: torch.device, dtype: torch.dtype, key: tuple) -> dict | None:
    if device.type != "cuda":
        return None
    return TABLE.get((kernel, gpu_key(device.index or 0), str(dtype)[6:], key))


def use_autotune(work: int, threshold: int) -> bool:
    """Autotune on a GPU when the problem's ``work`` (e.g. output elements times reduction length)
    reaches ``threshold``, unless LOTUS_KERNELS_TRITON_AUTOTUNE says otherwise."""
    if _interpreted():
        return False
    flag = os.environ.get(ENV_AUTOTUNE)
    if flag is not None:
        return flag == "1"
    return work >= threshold


def split_config(cfg: dict) -> tuple[dict, dict]:
    """({meta-parameters}, {num_warps, num_stages}) of a table entry."""
    launch = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    return {k: v for k, v in cfg.items() if k not in launch}, launch


def launch(
    name: str,
    kernel,
    grid,
    args: tuple,
    const: dict,
    *,
    device: torch.device,
    dtype: torch.dtype,
    bucket: tuple,
    fallback: dict,
    work: int = 0,
    threshold: int = 0,
    configs: list | None = None,
    key: list[str] | None = None,
    tuner: str | None = None,
) -> None:
    """Launch ``kernel[grid(meta)](*args, **const, **meta)`` with the config of, in order: the committed
    TABLE entry for (name, GPU, dtype, bucket); ``triton.autotune`` over ``configs`` (keyed on the
    kernel arguments ``key``) when ``use_autotune(work, threshold)``; else ``fallback`` (the GPU default,
    or the interpreter's tiles). ``grid`` maps the meta-parameters to the launch grid. ``tuner`` names
    the autotuner when one kernel has several config lists (default: ``name``)."""
    entry = table_entry(name, device, dtype, bucket)
    if entry is None and configs and use_autotune(work, threshold):
        tuner = tuner or name
        autotuned(tuner, kernel, configs, key or [])[grid](*args, **const)
        record(name, device, dtype, bucket, tuner)
        return
    meta, opts = split_config(entry if entry is not None else fallback)
    kernel[grid(meta)](*args, **const, **meta, **opts)


_TUNERS: dict[str, object] = {}
_WINNERS: dict[tuple, dict] = {}  # table key -> the config the autotuner picked for it


def autotuned(name: str, kernel, configs: list, key: list[str]):
    """``triton.autotune(configs, key)(kernel)``, made once per kernel and remembered by ``name`` so
    that ``tuned_configs`` can report its choices."""
    if name not in _TUNERS:
        _TUNERS[name] = triton.autotune(configs=configs, key=key)(kernel)
    return _TUNERS[name]


def record(kernel: str, device: torch.device, dtype: torch.dtype, key: tuple, tuner: str | None = None) -> None:
    """Remember the config the autotuner (``tuner``, default ``kernel``) just used for this table key
    (call right after the launch)."""
    best = getattr(_TUNERS.get(tuner or kernel), "best_config", None)
    if best is None or device.type != "cuda":
        return
    _WINNERS[(kernel, gpu_key(device.index or 0), str(dtype)[6:], key)] = {
        **best.kwargs,
        "num_warps": best.num_warps,
        "num_stages": best.num_stages,
    }


def tuned_table() -> dict[tuple, dict]:
    """The autotuner's winners of this process, in the table's format."""
    return dict(_WINNERS)


def tuned_configs() -> dict[str, dict[str, str]]:
    """{kernel: {autotune key: chosen config}} of every autotuning done in this process."""
    out = {}
    for name, tuner in _TUNERS.items():
        cache = getattr(tuner, "cache", {})
        out[name] = {str(k): str(v) for k, v in cache.items()}
    return out


def table_source(table: dict[tuple, dict]) -> str:
    """Python source of ``TABLE = {...}``, one entry per line, sorted."""
    lines = ["TABLE: dict[tuple, dict] = {"]
    for key in sorted(table, key=repr):
        lines.append(f"    {key!r}: {table[key]!r},")
    lines.append("}")
    return "\n".join(lines)


def write_table(table: dict[tuple, dict], path: str | None = None) -> None:
    """Merge ``table`` into the committed TABLE of this file (between the GENERATED DATA markers)."""
    path = path or __file__
    with open(path) as f:
        text = f.read()
    begin = text.index("# BEGIN GENERATED DATA")
    begin = text.index("\n", begin) + 1
    end = text.index("# END GENERATED DATA")
    merged = {**TABLE, **table}
    with open(path, "w") as f:
        f.write(text[:begin] + table_source(merged) + "\n" + text[end:])

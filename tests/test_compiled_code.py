"""Every Triton kernel compiled for the GPUs we target (sm_90 = H100 / H200, sm_80 = A100) without a GPU:
``tools/compiled_code.py --lean --check`` in a subprocess (Triton must not be in interpreter mode there).
It fails when a kernel variant stops compiling, when a config a launcher picks without the autotuner
needs more shared memory than a block has, or when a bf16 / fp16 tensor-core kernel variant on sm_90
stops using ``wgmma`` or starts spilling. Its results are cached per variant beside Triton's cache, so
only kernels whose source changed are recompiled (cold: a few minutes on 2 cores; warm: seconds).

Not under tests/triton/ on purpose: ``make gpu-check`` runs that folder on the GPU host, whose few minutes
are for measuring, and this needs no GPU. The committed table (benchmarks/results/gpu/compiled_sm90.md)
comes from the full run: ``python tools/compiled_code.py --cuda``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "compiled_code.py"
TABLE = ROOT / "benchmarks" / "results" / "gpu" / "compiled_sm90.json"

pytest.importorskip("triton")


def tool():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import compiled_code
    finally:
        sys.path.pop(0)
    return compiled_code


def test_every_gpu_kernel_compiles_and_the_hot_path_uses_wgmma_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    done = subprocess.run(
        [sys.executable, str(TOOL), "--check", "--lean", "--jobs", jobs],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "FAIL" not in done.stdout and ": ok" in done.stdout.splitlines()[-1]


def test_the_check_fails_on_a_slow_or_spilling_hot_path_and_an_oversized_default():
    ct = tool()
    good = dict(
        arch="sm_90",
        kernel="_bsr_product_kernel",
        dtype="bf16",
        config="BS=32",
        num_warps=4,
        num_stages=3,
        origin="default",
        hot=True,
        error=None,
        mma="wgmma",
        stack_bytes=0,
        spill_stores=0,
        spill_loads=0,
        smem_total=40000,
    )
    assert ct.problems([good]) == []
    assert "without wgmma" in ct.problems([{**good, "mma": "mma.sync"}])[0]
    assert "spills" in ct.problems([{**good, "spill_stores": 2, "stack_bytes": 8}])[0]
    assert "shared memory" in ct.problems([{**good, "smem_total": 300000}])[0]
    assert ct.problems([{**good, "smem_total": 300000, "origin": "autotune"}]) == []  # the tuner skips it
    assert ct.problems([{**good, "mma": "none", "hot": False}]) == []
    assert ct.problems([{**good, "arch": "sm_80", "mma": "mma.sync"}]) == []  # no wgmma before Hopper
    assert "does not compile" in ct.problems([{**good, "error": "CompilationError: ..."}])[0]


def test_h200_occupancy():
    occ = tool().occupancy
    assert occ(64, 0, 4) == dict(blocks_per_sm=8, occupancy=0.5, occupancy_limit="registers")  # 8 x 4 x 32 x 64 = 64K
    assert occ(32, 0, 4)["blocks_per_sm"] == 16 and occ(32, 0, 4)["occupancy"] == 1.0
    assert occ(40, 100_000, 4) == dict(blocks_per_sm=2, occupancy=0.125, occupancy_limit="shared memory")
    assert occ(255, 0, 8)["blocks_per_sm"] == 1  # 256 registers per thread (allocation unit) x 256 threads


def test_committed_table_lists_every_variant_of_the_current_configs():
    # The table is regenerated when a config list, a default or a kernel's constexprs change
    # (`python tools/compiled_code.py --cuda`): the set of (arch, kernel, dtype, config, warps, stages)
    # it lists must be the one the tool enumerates now.
    ct = tool()
    rows = json.loads(TABLE.read_text())["triton"]
    listed = {(r["arch"], r["kernel"], r["dtype"], r["config"], r["num_warps"], r["num_stages"]) for r in rows}
    now = {
        (f"sm_{v.arch}", v.kernel.rsplit(".", 1)[1], v.dtype, v.label(), v.num_warps, v.num_stages)
        for v in ct.all_variants()
    }
    assert listed == now, f"stale table: {len(now - listed)} variants missing, {len(listed - now)} gone"

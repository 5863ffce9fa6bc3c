"""``make gpu-check`` without a GPU: one line, exit 0; and its reporting path (environment, benchmark
rows, goals, JSON / markdown / PNG / log, the summary printed last) in a dry run on tiny CPU sizes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: gpu-check would run for real")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0
    assert done.stdout.strip().count("\n") == 0 and "gpu-check: skipped, no CUDA GPU" in done.stdout


def test_dry_run_writes_every_result_file_and_prints_the_summary_last(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--sections", "attention", "semi24"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md",
                                                          "gpu_check.png"]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {r["section"] for r in report["rows"]} == {"attention", "semi24"}
    assert {g["section"] for g in report["goals"] if g["value"] is not None} == {"attention", "semi24"}
    assert all(g["value"] is None for g in report["goals"] if g["section"] in ("block", "vit_step"))
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("results: ") and any(line.startswith("gpu-check summary") for line in out[-12:])


def test_tuned_configs_round_trip_into_the_committed_table(tmp_path):
    # gpu_check.json's tuned_table -> the TABLE literal between the GENERATED DATA markers -> lookups.
    import importlib.util

    from lotus_kernels.triton import _configs
    copy = tmp_path / "_configs_copy.py"
    copy.write_text(Path(_configs.__file__).read_text())
    key = ("bsr_fwd", "sm90-132sm", "bfloat16", (32, 16384, 1024, 4096))
    _configs.write_table({key: {"BLOCK_M": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}}, str(copy))
    spec = importlib.util.spec_from_file_location("_configs_copy", copy)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.TABLE[key] == {"BLOCK_M": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    assert mod.split_config(mod.TABLE[key]) == ({"BLOCK_M": 128, "GROUP_M": 8}, {"num_warps": 8, "num_stages": 3})
    assert "# END GENERATED DATA" in copy.read_text()

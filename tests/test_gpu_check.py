"""``make gpu-check`` (tools/gpu_check.py) without a GPU: one line, exit 0; and its code paths in a dry
run on tiny CPU sizes: the result files (the lent machine returns at most 8, no sub-folders), the
summary printed last, the test passes and their deadline, the tuned-config table round trip. The
build + tests + benchmarks run end to end (Python 3.12, torch 2.11, as on the lent GPU host) is
`make gpu-check-dry-run` in CI."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.py"


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    return gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: gpu-check would run for real")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0
    assert done.stdout.strip().count("\n") == 0 and "gpu-check: skipped, no CUDA GPU" in done.stdout


def test_dry_run_writes_its_result_files_only_and_prints_the_summary_last(gpu_check, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        gpu_check.main(
            [
                "--dry-run",
                "--skip-build",
                "--skip-tests",
                "--out",
                str(out),
                "--sections",
                "attention",
                "semi24",
                "cpu_threads",
            ]
        )
        == 0
    )
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(set(gpu_check.RESULT_FILES) - {"pytest.log"}) and len(gpu_check.RESULT_FILES) <= 8
    assert all(p.is_file() for p in out.iterdir())
    report = json.loads((out / "gpu_check.json").read_text())
    assert {r["section"] for r in report["rows"]} == {"attention", "semi24", "cpu_threads"}
    assert {g["section"] for g in report["goals"] if g["value"] is not None} == {"attention", "semi24"}
    assert all(g["value"] is None for g in report["goals"] if g["section"] in ("block", "vit_step"))
    threads = sorted({r["threads"] for r in report["rows"] if r["section"] == "cpu_threads"})
    assert threads == [t for t in (1, 4, 8, 16) if t <= (os.cpu_count() or 1)]
    assert "tuned_table.py" in written and "TABLE" in (out / "tuned_table.py").read_text()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("results: ") and any(line.startswith("gpu-check summary") for line in lines[-12:])


def test_unknown_section_is_refused_naming_the_choices(gpu_check, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--dry-run", "--sections", "vit_step", "nonsense"])
    assert e.value.code == 2
    assert "--sections: unknown nonsense; expected some of vit_step, block, attention" in capsys.readouterr().err


def test_test_passes_report_failures_and_stop_at_the_deadline(gpu_check, tmp_path, monkeypatch):
    (tmp_path / "test_a.py").write_text(
        "import pytest\n\n@pytest.mark.cuda\ndef test_ok():\n    pass\n\n"
        "@pytest.mark.cuda\ndef test_bad():\n    assert 1 == 2\n\n"
        "def test_cpu_only():\n    pass\n"
    )
    (tmp_path / "test_b.py").write_text(
        "import time\n\nimport pytest\n\n@pytest.mark.cuda\ndef test_slow():\n    time.sleep(600)\n"
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: x\n")
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    monkeypatch.setattr(gpu_check, "MIN_PASS_SECONDS", 2)
    log = []
    monkeypatch.setattr(gpu_check, "TEST_PASSES", (("a", ["test_a.py"]),))
    result = gpu_check.run_tests(lambda *p: log.append(p), time.monotonic() + 120, tmp_path)
    assert not result["ok"] and result["counts"] == {"failed": 1, "passed": 1, "deselected": 1}
    assert any("test_bad" in f for f in result["failed"])
    assert "===== pass a" in (tmp_path / "pytest.log").read_text()
    # a pass still running at the deadline is killed, and the passes after it are skipped
    monkeypatch.setattr(gpu_check, "TEST_PASSES", (("b", ["test_b.py"]), ("c", ["test_a.py"])))
    t0 = time.monotonic()
    result = gpu_check.run_tests(lambda *p: log.append(p), time.monotonic() + 8, tmp_path)
    assert time.monotonic() - t0 < 30
    assert not result["ok"] and result["passes"]["b"].startswith("exit timeout")
    assert result["passes"]["c"] == "skipped: out of time"


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

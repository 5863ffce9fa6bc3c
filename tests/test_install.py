"""After `make install` (which `make test` / `make bench` run) the README's commands work with the
venv's python from any directory, with no PYTHONPATH: the `lotus` script, `python -m lotus` and
`python benchmarks/bench_<name>.py`. Skipped where the package is not installed into this
interpreter (a worktree sharing another checkout's venv)."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _clean_env():
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _installed_here() -> bool:
    try:
        importlib.metadata.distribution("lotus-kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    r = subprocess.run(
        [sys.executable, "-c", "import lotus_kernels; print(lotus_kernels.__file__)"],
        cwd="/",
        env=_clean_env(),
        capture_output=True,
        text=True,
    )
    return r.returncode == 0 and Path(r.stdout.strip()).resolve().is_relative_to(REPO)


pytestmark = pytest.mark.skipif(
    not _installed_here(), reason="lotus-kernels is not installed from this tree into this interpreter (make install)"
)


def test_lotus_script_and_module(tmp_path):
    script = Path(sys.executable).parent / "lotus"
    for cmd in ([str(script), "--help"], [sys.executable, "-m", "lotus", "run", "--help"]):
        r = subprocess.run(cmd, cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "--data" in r.stdout or "evaluate" in r.stdout


def test_benchmark_scripts_import_the_package(tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_gather.py"), "--help"],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "No module named" not in r.stderr

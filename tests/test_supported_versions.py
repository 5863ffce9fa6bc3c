"""The supported range (lotus_kernels/_version.py) as a user meets it: pip keeps the torch that is
installed, and a torch / triton outside the range, or extensions built against another torch, get one
clear line naming the versions instead of an undefined symbol. CI runs this file on both ends of the
range (`make test`, `make test-oldest`)."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import lotus_kernels
from lotus_kernels import _backend, _version

ROOT = Path(__file__).resolve().parents[1]


def test_this_environment_is_inside_the_declared_range():
    assert _version.problem("torch", torch.__version__, _version.TORCH) is None
    assert _version.PYTHON[0] <= sys.version_info[:2] <= _version.PYTHON[1]
    triton = pytest.importorskip("triton")
    assert _version.problem("triton", triton.__version__, _version.TRITON) is None


def test_pyproject_declares_the_same_ranges():
    text = (ROOT / "pyproject.toml").read_text()
    (lo_maj, lo_min), (hi_maj, hi_min) = _version.TORCH
    assert f'"torch>={lo_maj}.{lo_min},<{hi_maj}.{hi_min + 1}"' in text
    (lo_maj, lo_min), (hi_maj, hi_min) = _version.TRITON
    assert f'"triton>={lo_maj}.{lo_min},<{hi_maj}.{hi_min + 1}"' in text
    assert f'requires-python = ">={_version.PYTHON[0][0]}.{_version.PYTHON[0][1]}"' in text
    for minor in range(_version.PYTHON[0][1], _version.PYTHON[1][1] + 1):
        assert f"Programming Language :: Python :: 3.{minor}" in text
    assert "torch==" not in text  # a pin would make pip replace the user's torch


@pytest.mark.parametrize(
    "version, ok",
    [
        ("2.11.0+cu130", True),
        ("2.14.1", True),
        ("2.12.0a0+git1234", True),
        ("2.10.0", False),
        ("2.15.0", False),
        ("1.13.1", False),
    ],
)
def test_torch_range(version, ok):
    why = _version.problem("torch", version, _version.TORCH)
    assert (why is None) == ok
    if not ok:
        assert why.startswith(f"lotus-kernels supports torch 2.11 to 2.14 (tested in CI), found torch {version};")
        assert _version.ENV_ALLOW in why


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )


def test_import_refuses_an_unsupported_torch_in_one_line():
    code = "import torch; torch.__version__ = '2.10.1'\nimport lotus_kernels"
    done = _python(code)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        "ImportError: lotus-kernels supports torch 2.11 to 2.14 (tested in CI), found torch 2.10.1; "
        f"install a supported torch, or set {_version.ENV_ALLOW}=1 to try anyway"
    )
    assert _python(code, **{_version.ENV_ALLOW: "1"}).returncode == 0


def test_build_refuses_an_unsupported_torch_in_one_line():
    code = (
        "import runpy, sys, torch; torch.__version__ = '2.15.0'; sys.argv = ['setup.py', '--version']\n"
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    done = _python(code)
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("lotus-kernels supports torch 2.11 to 2.14 (tested in CI), found torch 2.15.0;")
    )


def test_extensions_built_for_another_torch_say_so_instead_of_an_undefined_symbol(monkeypatch):
    fake = types.ModuleType("lotus_kernels._build_info")
    fake.TORCH_VERSION, fake.TORCH_CUDA = "2.11.0+cu130", "13.0"
    monkeypatch.setitem(sys.modules, "lotus_kernels._build_info", fake)
    monkeypatch.setattr(lotus_kernels, "_build_info", fake, raising=False)
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    why = _backend._build_mismatch()
    assert (
        why.startswith(
            "the compiled extensions were built against torch 2.11.0+cu130 (CUDA 13.0), this is torch 2.14.1+cu130"
        )
        and "rebuild them" in why
    )
    fake.TORCH_VERSION, fake.TORCH_CUDA = "2.14.1+cu130", torch.version.cuda
    assert _backend._build_mismatch() is None


def test_the_build_records_the_torch_it_compiled_against():
    info = pytest.importorskip("lotus_kernels._build_info", reason="extensions not built by this setup.py yet")
    assert info.TORCH_VERSION.split("+")[0] == torch.__version__.split("+")[0]
    assert _backend._build_mismatch() is None


def test_triton_outside_the_range_disables_the_triton_backend_with_the_reason(monkeypatch):
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", "3.5.1")
    monkeypatch.delenv(_version.ENV_ALLOW, raising=False)
    assert _backend._triton_problem() == (
        "lotus-kernels supports triton 3.6 to 3.8 (tested in CI), found triton 3.5.1; install a supported triton, "
        f"or set {_version.ENV_ALLOW}=1 to try anyway"
    )


def test_pip_install_keeps_the_installed_torch(tmp_path):
    # Resolve `pip install --no-build-isolation .[lotus]` against this environment (either end of the
    # range, as CI runs it) without installing: only lotus-kernels itself may be new; torch,
    # torchvision and triton stay as they are. --no-index: nothing may need downloading either.
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--disable-pip-version-check",
            "--report",
            str(report),
            f"{ROOT}[lotus]",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "LOTUS_BUILD_EXT": "0"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(item["metadata"]["name"] for item in json.loads(report.read_text())["install"])
    assert names == ["lotus-kernels"], names

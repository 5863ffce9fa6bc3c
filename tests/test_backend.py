import importlib
import os
import shutil

import pytest
import torch

import lotus_kernels
from lotus_kernels import _backend


def test_cpu_extension_is_built():
    # make test builds it; a test run without it would silently test only the reference.
    assert lotus_kernels.backends()["cpu"], lotus_kernels.backend_errors().get("cpu")


@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("LOTUS_BUILD_CUDA") == "0",
                    reason="no nvcc: the CUDA extension is not built")
def test_cuda_extension_is_built_and_loads():
    # Loading registers the CUDA kernels with the dispatcher even with no GPU to run them.
    importlib.import_module("lotus_kernels._cuda")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lotus_kernels_C::gather_tokens", "CUDA")


def test_backends_reports_every_backend():
    assert set(lotus_kernels.backends()) == set(_backend.BACKENDS)
    assert lotus_kernels.backends()["reference"]


def test_default_backend_on_cpu_is_cpp():
    assert _backend.select(torch.device("cpu")) == "cpu"


def test_forcing_an_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LOTUS_KERNELS_BACKEND", "fortran")
    with pytest.raises(ValueError, match="unknown backend 'fortran'"):
        lotus_kernels.ops.gather_tokens(torch.randn(1, 3, 2), torch.zeros(1, 1, dtype=torch.long))


def test_forcing_an_unavailable_backend_says_so(monkeypatch):
    monkeypatch.setenv("LOTUS_KERNELS_BACKEND", "cuda")
    if lotus_kernels.backends()["cuda"]:
        match = "runs on cuda tensors"
    else:
        match = "'cuda' was requested but is not available"
    with pytest.raises(RuntimeError, match=match):
        lotus_kernels.ops.gather_tokens(torch.randn(1, 3, 2), torch.zeros(1, 1, dtype=torch.long))


def test_env_variable_forces_reference(monkeypatch):
    monkeypatch.setenv("LOTUS_KERNELS_BACKEND", "reference")
    assert _backend.select(torch.device("cpu")) == "reference"


def test_use_backend_restores_previous_choice():
    with lotus_kernels.use_backend("reference"):
        assert _backend.select(torch.device("cpu")) == "reference"
    assert _backend.select(torch.device("cpu")) == "cpu"


def test_poisoned_outputs_are_nan():
    # The guard behind every kernel comparison: unwritten output elements must not pass.
    out = _backend.new_output((3, 4), torch.empty(0))
    assert torch.isnan(out).all()

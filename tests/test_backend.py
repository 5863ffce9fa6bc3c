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


@pytest.mark.skipif(
    shutil.which("nvcc") is None or os.environ.get("LOTUS_BUILD_CUDA") == "0",
    reason="no nvcc: the CUDA extension is not built",
)
def test_cuda_extension_is_built_and_loads():
    # Loading registers the CUDA kernels with the dispatcher even with no GPU to run them.
    importlib.import_module("lotus_kernels._cuda")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lotus_kernels_C::gather_tokens", "CUDA")


def test_backends_reports_every_backend():
    assert set(lotus_kernels.backends()) == set(_backend.BACKENDS)
    assert lotus_kernels.backends()["reference"]


def test_default_backend_on_cpu_is_cpp():
    assert _backend.select(torch.device("cpu"), "token_gather") == "cpu"


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
    assert _backend.select(torch.device("cpu"), "token_gather") == "reference"


def test_use_backend_restores_previous_choice():
    with lotus_kernels.use_backend("reference"):
        assert _backend.select(torch.device("cpu"), "token_gather") == "reference"
    assert _backend.select(torch.device("cpu"), "token_gather") == "cpu"


def test_poisoned_outputs_are_nan():
    # The guard behind every kernel comparison: unwritten output elements must not pass.
    out = _backend.new_output((3, 4), torch.empty(0))
    assert torch.isnan(out).all()


def test_import_works_without_the_extensions_and_says_so():
    # A user whose build failed still gets the reference backend, and a clear error if they ask
    # for the missing one. Run in a fresh interpreter with the extensions made unimportable.
    import subprocess
    import sys

    code = """
import sys
sys.modules["lotus_kernels._C"] = None
sys.modules["lotus_kernels._cuda"] = None
import torch, lotus_kernels as lk
assert lk.backends()["cpu"] is False and lk.backends()["reference"] is True
assert "lotus_kernels._C" in lk.backend_errors()["cpu"]
out = lk.ops.gather_tokens(torch.randn(2, 5, 3), torch.tensor([[1, 4], [0, 0]]))
assert out.shape == (2, 2, 3)
try:
    with lk.use_backend("cpu"):
        lk.ops.gather_tokens(torch.randn(2, 5, 3), torch.tensor([[1, 4], [0, 0]]))
except RuntimeError as e:
    assert "backend 'cpu' was requested but is not available" in str(e), e
else:
    raise AssertionError("forcing a missing backend must fail")
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_forcing_a_backend_an_op_has_no_kernel_for_names_the_op():
    with (
        lotus_kernels.use_backend("cuda"),
        pytest.raises(NotImplementedError, match="attention: the 'cuda' backend has no kernel"),
    ):
        lotus_kernels.ops.attention(*[torch.randn(1, 1, 3, 4)] * 3)
    # the default skips it instead: CPU tensors still get the C++ kernel
    assert _backend.select(torch.device("cpu"), "attention") == "cpu"
    with (
        lotus_kernels.use_backend("triton"),
        pytest.raises(NotImplementedError, match="masked_weight_grad: the 'triton'"),
    ):
        _backend.select(torch.device("cpu"), "masked_weight_grad")


def test_gpu_default_prefers_triton_then_cuda(monkeypatch):
    # Triton first on CUDA tensors until `make gpu-check` measures otherwise; the CUDA C++ kernels
    # when Triton is missing, the reference when neither is there.
    from lotus_kernels import _backend

    dev = torch.device("cuda", 0)
    for ok, want in (
        ({"triton": True, "cuda": True}, "triton"),
        ({"triton": False, "cuda": True}, "cuda"),
        ({"triton": False, "cuda": False}, "reference"),
    ):
        monkeypatch.setattr(_backend, "backends", lambda ok=ok: {"reference": True, "cpu": True, **ok})
        assert _backend.select(dev, "block_sparse_linear") == want
    # an op without a GPU kernel runs the reference on CUDA tensors
    assert _backend.select(dev, "masked_weight_grad") == "reference"

"""The per-op capability table (lotus_kernels/_capabilities.py) against what is built, and select's
use of it: every backend an op lists has its kernels, and forcing one it does not list is an error
naming the op, for every op."""

import importlib
import sys

import pytest
import torch

import lotus_kernels
from lotus_kernels import _backend
from lotus_kernels._capabilities import CAPABILITIES, Capability, capability

DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


@pytest.mark.parametrize("op", sorted(CAPABILITIES))
def test_every_listed_backend_has_the_ops_kernels(op):
    cap = CAPABILITIES[op]
    assert cap.backends[0] == "reference" and set(cap.backends) <= set(_backend.BACKENDS)
    assert cap.kernels, f"{op}: no kernel entry points listed"
    for backend in cap.backends:
        if backend in DISPATCH_KEY:
            if not lotus_kernels.backends()["cpu"]:
                pytest.skip("lotus_kernels._C is not built")
            for k in cap.kernels:
                name = f"lotus_kernels_C::{k}"
                # the CUDA implementations live in _cuda, which registers them where it is built (and
                # loaded: lotus_kernels imports it even with no GPU visible, as here in CI)
                if backend == "cuda" and "lotus_kernels._cuda" not in sys.modules:
                    continue
                assert torch._C._dispatch_has_kernel_for_dispatch_key(name, DISPATCH_KEY[backend]), (op, backend, k)
        if backend == "triton":
            mod = importlib.import_module(f"lotus_kernels.triton.{cap.module}")
            for k in cap.kernels:
                assert callable(getattr(mod, k, None)), f"{op}: lotus_kernels.triton.{cap.module}.{k} is missing"


@pytest.mark.parametrize("op", sorted(CAPABILITIES))
def test_a_backend_the_table_leaves_out_has_no_kernel_either(op):
    # The table must not under-claim: a CUDA C++ kernel registered for an op whose row leaves out
    # "cuda" would be dead code (or the row is stale).
    cap = CAPABILITIES[op]
    if not lotus_kernels.backends()["cpu"]:
        pytest.skip("lotus_kernels._C is not built")
    for backend, key in DISPATCH_KEY.items():
        if backend not in cap.backends:
            for k in cap.kernels:
                assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"lotus_kernels_C::{k}", key), (op, k)


@pytest.mark.parametrize("op", sorted(CAPABILITIES))
@pytest.mark.parametrize("forced", ["cpu", "cuda", "triton"])
def test_forcing_a_backend_the_op_lacks_names_the_op(op, forced):
    if forced in CAPABILITIES[op].backends:
        return
    with lotus_kernels.use_backend(forced), pytest.raises(NotImplementedError, match=f"{op}: the '{forced}' backend"):
        _backend.select(torch.device("cpu"), op)


def test_masked_weight_grad_forced_onto_a_backend_without_its_kernel_raises_not_falls_back():
    w = torch.randn(4, 3, requires_grad=True)
    mask = torch.rand(4, 3) < 0.5
    y = lotus_kernels.ops.masked_linear(torch.randn(2, 3), w, mask)
    with lotus_kernels.use_backend("triton"), pytest.raises(NotImplementedError, match="masked_weight_grad"):
        y.sum().backward()


def test_unknown_op_and_inconsistent_rows_are_clear_errors():
    with pytest.raises(ValueError, match="op: unknown op 'nope'"):
        capability("nope")
    with pytest.raises(ValueError, match=r"fused_bias: \['cuda'\] are not among backends"):
        Capability(("reference", "cpu"), fused_bias=("cuda",))


def test_capabilities_is_plain_data():
    caps = lotus_kernels.capabilities()
    assert caps["attention"]["backends"] == ("reference", "cpu", "triton")
    assert caps["block_sparse_linear"]["mixed_input"] == ("cpu",)
    assert "bfloat16" in caps["token_gather"]["dtypes"]

import os

# Before anything imports triton: interpret Triton kernels on the CPU when no GPU is here, and
# poison kernel outputs so an element a kernel forgets to write fails the comparison.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["LOTUS_KERNELS_POISON"] = "1"
os.environ.pop("LOTUS_KERNELS_BACKEND", None)

import pytest  # noqa: E402

import lotus_kernels  # noqa: E402


def kernel_backends():
    """(backend, device) pairs to test against the reference: every kernel backend that runs here."""
    ok = lotus_kernels.backends()
    pairs = []
    if ok["cpu"]:
        pairs.append(("cpu", "cpu"))
    if ok["triton"] and not torch.cuda.is_available():
        pairs.append(("triton", "cpu"))
    if torch.cuda.is_available():
        pairs += [(b, "cuda") for b in ("cuda", "triton") if ok[b]]
    return pairs


BACKENDS = kernel_backends()


def backends_for(op: str):
    """The (backend, device) pairs of BACKENDS that ``op`` has kernels for (lotus_kernels/_capabilities.py)."""
    from lotus_kernels._capabilities import capability

    return [(b, d) for b, d in BACKENDS if b in capability(op).backends]


BACKEND_IDS = [f"{b}-{d}" for b, d in BACKENDS]


def tolerance(dtype):
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
    }[dtype]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_compiled_matches_eager(step, args, wrt, *, rtol=1e-5, atol=1e-5):
    """``torch.compile(step, fullgraph=True)(*args)`` (a scalar) and its gradients w.r.t. ``wrt``
    equal eager's; returns the compiled gradients for further checks."""
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(*args)
    got_grads = torch.autograd.grad(got, wrt)
    want = step(*args)
    want_grads = torch.autograd.grad(want, wrt)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)
    return got_grads


@pytest.hookimpl(tryfirst=True)  # before `-m cuda` deselects by marker
def pytest_collection_modifyitems(config, items):
    """With a GPU present, every test that runs on it carries the ``cuda`` marker, so that
    ``pytest -m cuda`` (``make gpu-check``) runs exactly the GPU tests: those parametrized with a
    CUDA backend / device, the Triton kernel tests (on CUDA tensors there), ``test_cuda_*`` and the
    ones marked."""
    if not torch.cuda.is_available():
        return
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_gpu = (
            "cuda" in item.keywords
            or item.nodeid.startswith("tests/triton/")
            or getattr(item, "originalname", item.name).startswith("test_cuda")
            or (
                callspec is not None
                and any(
                    v == "cuda" or (isinstance(v, torch.device) and v.type == "cuda") for v in callspec.params.values()
                )
            )
        )
        if on_gpu:
            item.add_marker(pytest.mark.cuda)

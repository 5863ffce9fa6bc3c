import pytest
import torch

import lotus_kernels
from lotus_kernels.ops import gather_tokens, scatter_tokens
from lotus_kernels.ops.token_gather import gather_tokens_reference, scatter_tokens_reference

from ..conftest import BACKEND_IDS, BACKENDS, tolerance

# (B, N, C, K): ViT-S/B rows, odd widths, K = 1 and K = N, more indices than tokens, a lone token.
SHAPES = [(2, 197, 385, 1), (2, 197, 385, 197), (3, 50, 64, 25), (1, 1, 1, 1), (2, 17, 33, 40), (4, 65, 384, 33)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_idx(B, N, K, device, unique):
    if unique and K <= N:
        return torch.rand(B, N, device=device).argsort(1)[:, :K].sort(1).values
    return torch.randint(0, N, (B, K), device=device)  # duplicates: backward must accumulate them


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("unique", [True, False])
def test_gather_forward_backward_matches_reference(backend, device, dtype, shape, unique):
    B, N, C, K = shape
    x = torch.randn(B, N, C, device=device, dtype=dtype, requires_grad=True)
    idx = make_idx(B, N, K, device, unique)
    g = torch.randn(B, K, C, device=device, dtype=dtype)
    with lotus_kernels.use_backend(backend):
        out = gather_tokens(x, idx)
        (dx,) = torch.autograd.grad(out, x, g)
    x_ref = x.detach().float().requires_grad_()
    out_ref = gather_tokens_reference(x_ref, idx)
    (dx_ref,) = torch.autograd.grad(out_ref, x_ref, g.float())
    assert out.dtype == dtype and out.shape == (B, K, C)
    torch.testing.assert_close(out.float(), out_ref, rtol=0, atol=0)  # a copy is exact
    torch.testing.assert_close(dx.float(), dx_ref, **tolerance(dtype))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_scatter_forward_backward_matches_reference(backend, device, dtype, shape):
    B, N, C, K = shape
    src = torch.randn(B, K, C, device=device, dtype=dtype, requires_grad=True)
    idx = make_idx(B, N, K, device, unique=False)
    g = torch.randn(B, N, C, device=device, dtype=dtype)
    with lotus_kernels.use_backend(backend):
        out = scatter_tokens(src, idx, N)
        (dsrc,) = torch.autograd.grad(out, src, g)
    src_ref = src.detach().float().requires_grad_()
    out_ref = scatter_tokens_reference(src_ref, idx, N)
    (dsrc_ref,) = torch.autograd.grad(out_ref, src_ref, g.float())
    torch.testing.assert_close(out.float(), out_ref, **tolerance(dtype))
    torch.testing.assert_close(dsrc.float(), dsrc_ref, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_gradcheck_float64(backend, device):
    x = torch.randn(2, 7, 5, device=device, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 3, 3, 6], [1, 1, 2, 5]], device=device)
    with lotus_kernels.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: gather_tokens(t, idx), (x,))
        assert torch.autograd.gradgradcheck(lambda t: gather_tokens(t, idx), (x,))
        src = torch.randn(2, 4, 5, device=device, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: scatter_tokens(t, idx, 7), (src,))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_non_contiguous_inputs_are_handled(backend, device):
    x = torch.randn(2, 9, 12, device=device).transpose(1, 2)  # [2, 12, 9], strided
    idx = torch.tensor([[0, 11, 5], [2, 2, 7]], device=device).t().contiguous().t()  # [2,3] non-contiguous
    assert not x.is_contiguous() and not idx.is_contiguous()
    with lotus_kernels.use_backend(backend):
        out = gather_tokens(x, idx)
    torch.testing.assert_close(out, gather_tokens_reference(x, idx), rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_empty_channels_and_float64(backend, device):
    x = torch.randn(2, 5, 3, device=device, dtype=torch.float64)
    idx = torch.tensor([[4, 0], [1, 1]], device=device)
    with lotus_kernels.use_backend(backend):
        out = gather_tokens(x, idx)
    torch.testing.assert_close(out, gather_tokens_reference(x, idx), rtol=0, atol=0)


I = torch.long
BAD_GATHER = [
    (
        lambda: gather_tokens(torch.randn(2, 5, 3), torch.tensor([[0, 5]] * 2)),
        IndexError,
        "idx: index 5 is out of range; expected values in \\[0, 5\\)",
    ),
    (
        lambda: gather_tokens(torch.randn(2, 5, 3), torch.tensor([[0, -1]] * 2)),
        IndexError,
        "idx: index -1 is out of range",
    ),
    (
        lambda: gather_tokens(torch.randn(2, 5, 3), torch.tensor([[0.0, 1.0]] * 2)),
        TypeError,
        "idx: expected an int64 index tensor, got float32",
    ),
    (
        lambda: gather_tokens(torch.randn(2, 5, 3), torch.tensor([[0, 1]] * 2, dtype=torch.int32)),
        TypeError,
        "idx: expected an int64",
    ),
    (
        lambda: gather_tokens(torch.randn(5, 3), torch.zeros(2, 1, dtype=I)),
        ValueError,
        "x: expected a 3-D tensor, got 2-D",
    ),
    (
        lambda: gather_tokens(torch.randn(2, 5, 3), torch.zeros(2, dtype=I)),
        ValueError,
        "idx: expected a 2-D tensor, got 1-D",
    ),
    (
        lambda: gather_tokens(torch.randn(2, 5, 3), torch.zeros(3, 1, dtype=I)),
        ValueError,
        "idx: batch size 3 does not match x's batch size 2",
    ),
    (
        lambda: gather_tokens(torch.randn(2, 5, 3), torch.zeros(2, 0, dtype=I)),
        ValueError,
        "idx: expected at least one index per row \\(K >= 1\\), got K = 0",
    ),
    (
        lambda: gather_tokens(torch.randint(0, 3, (2, 5, 3)), torch.zeros(2, 1, dtype=I)),
        TypeError,
        "x: expected dtype float32",
    ),
    (lambda: gather_tokens([[1.0]], torch.zeros(2, 1, dtype=I)), TypeError, "x: expected a torch.Tensor, got list"),
    (
        lambda: gather_tokens(torch.randn(2, 5, 3), torch.zeros(2, 1, dtype=I, device="meta")),
        ValueError,
        "idx: expected a tensor on cpu",
    ),
    (
        lambda: scatter_tokens(torch.randn(2, 3, 4), torch.zeros(2, 2, dtype=I), 5),
        ValueError,
        "idx: expected shape \\[B, 3\\]",
    ),
    (
        lambda: scatter_tokens(torch.randn(2, 1, 4), torch.zeros(2, 1, dtype=I), 0),
        ValueError,
        "n: expected a positive int",
    ),
    (
        lambda: scatter_tokens(torch.randn(2, 1, 4), torch.full((2, 1), 9), 5),
        IndexError,
        "idx: index 9 is out of range",
    ),
]


@pytest.mark.parametrize("backend,device", [("reference", "cpu"), *BACKENDS], ids=["reference-cpu", *BACKEND_IDS])
@pytest.mark.parametrize("call,exc,match", BAD_GATHER)
def test_bad_input_is_a_clear_error(backend, device, call, exc, match):
    with lotus_kernels.use_backend(backend if device == "cpu" else "reference"):
        with pytest.raises(exc, match=match):
            call()


def test_empty_batch_is_refused_clearly():
    with pytest.raises(ValueError, match="idx: batch size 1 does not match x's batch size 0"):
        gather_tokens(torch.randn(0, 5, 3), torch.zeros(1, 1, dtype=I))
    out = gather_tokens(torch.randn(0, 5, 3), torch.zeros(0, 2, dtype=I))
    assert out.shape == (0, 2, 3)

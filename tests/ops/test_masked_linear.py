import pytest
import torch

import lotus_kernels
from lotus_kernels.ops.masked_linear import masked_linear, masked_linear_reference

from ..conftest import backends_for, tolerance

# (x shape, out_features): ViT-S MLP fc1 / fc2 (M = 197 tokens, 384 -> 1536 and back) scaled down
# by 8, odd sizes, a 3-D x, a single element.
SHAPES = [((197, 48), 192), ((197, 192), 48), ((7, 33), 65), ((2, 13, 33), 17), ((1, 1), 1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The op's kernel is masked_weight_grad (the forward is F.linear); on CUDA tensors it runs the reference.
WITH_REFERENCE = [("reference", "cpu"), *backends_for("masked_weight_grad")]
if torch.cuda.is_available():
    WITH_REFERENCE.append(("reference", "cuda"))
WITH_REFERENCE_IDS = [f"{b}-{d}" for b, d in WITH_REFERENCE]


def make_layer(out_features, in_features, density, device, dtype=torch.float32):
    """(weight zero where pruned, mask, bias): the invariant MaskedLinear keeps."""
    mask = torch.rand(out_features, in_features, device=device) < density
    weight = (torch.randn(out_features, in_features, device=device) * mask).to(dtype)
    return weight, mask, torch.randn(out_features, device=device).to(dtype)


@pytest.mark.parametrize("backend,device", WITH_REFERENCE, ids=WITH_REFERENCE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [1.0, 0.5, 0.0])
def test_forward_backward_matches_reference(backend, device, dtype, shape, density):
    x_shape, out_features = shape
    w, mask, b = make_layer(out_features, x_shape[-1], density, device, dtype)
    x = torch.randn(x_shape, device=device, dtype=dtype)
    g = torch.randn(*x_shape[:-1], out_features, device=device, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with lotus_kernels.use_backend(backend):
        y = masked_linear(leaves[0], leaves[1], mask, leaves[2])
        dx, dw, db = torch.autograd.grad(y, leaves, g)
    ref = [t.float().requires_grad_() for t in (x, w, b)]
    y_ref = masked_linear_reference(ref[0], ref[1], mask, ref[2])
    grads_ref = torch.autograd.grad(y_ref, ref, g.float())
    assert y.dtype == dtype and y.shape == (*x_shape[:-1], out_features)
    for got, want in zip((y, dx, dw, db), (y_ref, *grads_ref)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, **tolerance(dtype))
    assert not dw[~mask].any(), "pruned weights must get exactly zero gradient"


@pytest.mark.parametrize("backend,device", WITH_REFERENCE, ids=WITH_REFERENCE_IDS)
def test_gradcheck_float64(backend, device):
    w, mask, b = make_layer(5, 7, 0.5, device, torch.float64)
    x = torch.randn(3, 4, 7, device=device, dtype=torch.float64, requires_grad=True)
    w.requires_grad_(), b.requires_grad_()

    # w * mask keeps the invariant under gradcheck's perturbations of pruned entries; whether the
    # op's own gradient is zero there is checked exactly in the test above.
    def f(x, w, b):
        return masked_linear(x, w * mask, mask, b)

    with lotus_kernels.use_backend(backend):
        assert torch.autograd.gradcheck(f, (x, w, b))
        assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("backend,device", WITH_REFERENCE, ids=WITH_REFERENCE_IDS)
def test_weight_grad_overwrites_poisoned_output(backend, device):
    # Empty batch: the GEMM has no terms, so the (NaN-poisoned) gradient must be written as zeros.
    w, mask, b = make_layer(6, 4, 0.5, device)
    w.requires_grad_()
    x = torch.randn(0, 4, device=device)
    with lotus_kernels.use_backend(backend):
        (dw,) = torch.autograd.grad(masked_linear(x, w, mask, b).sum(), w)
    assert torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("backend,device", WITH_REFERENCE, ids=WITH_REFERENCE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_pruned_grad_is_zero_even_when_not_finite(backend, device, dtype):
    # An inf input makes whole columns of dy^T x inf / NaN; pruned entries must still be 0 (0 * inf
    # would be NaN and move a pruned weight off zero).
    w, mask, b = make_layer(8, 5, 0.5, device, dtype)
    w.requires_grad_()
    x = torch.randn(3, 5, device=device, dtype=dtype)
    x[1, 2] = float("inf")
    with lotus_kernels.use_backend(backend):
        (dw,) = torch.autograd.grad(masked_linear(x, w, mask, b).sum(), w)
    assert not dw[~mask].any() and torch.isinf(dw[mask.logical_and(torch.arange(5) == 2)]).all()


@pytest.mark.parametrize("backend,device", WITH_REFERENCE, ids=WITH_REFERENCE_IDS)
def test_non_contiguous_x_and_no_bias(backend, device):
    w, mask, _ = make_layer(6, 9, 0.5, device)
    x = torch.randn(9, 2, 5, device=device).permute(1, 2, 0).requires_grad_()  # [2, 5, 9], strided
    assert not x.is_contiguous()
    w.requires_grad_()
    with lotus_kernels.use_backend(backend):
        y = masked_linear(x, w, mask)
        dx, dw = torch.autograd.grad(y.square().sum(), (x, w))
    x_ref, w_ref = x.detach().requires_grad_(), w.detach().requires_grad_()
    y_ref = masked_linear_reference(x_ref, w_ref, mask)
    want = torch.autograd.grad(y_ref.square().sum(), (x_ref, w_ref))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close((dx, dw), want)


def test_opcheck_registrations():
    w, mask, b = make_layer(5, 7, 0.5, "cpu")
    x = torch.randn(2, 3, 7, requires_grad=True)
    torch.library.opcheck(torch.ops.lotus_kernels.masked_linear.default, (x, w.requires_grad_(), mask, b))
    torch.library.opcheck(torch.ops.lotus_kernels.masked_weight_grad.default, (torch.randn(2, 3, 5), x, mask))


F32, BOOL = torch.float32, torch.bool
W, M, X = torch.zeros(4, 3), torch.ones(4, 3, dtype=BOOL), torch.randn(2, 3)
BAD = [
    (lambda: masked_linear(X, torch.zeros(3), M), ValueError, "weight: expected a 2-D tensor, got 1-D"),
    (lambda: masked_linear(X, W.long(), M), TypeError, "weight: expected dtype float32"),
    (lambda: masked_linear(X, W, M.float()), TypeError, "mask: expected a bool tensor \\(True = keep\\), got float32"),
    (
        lambda: masked_linear(X, W, M.t()),
        ValueError,
        "mask: expected shape \\(4, 3\\) to match weight \\[out_features, in_features\\], got \\(3, 4\\)",
    ),
    (lambda: masked_linear(X, W, [[True]]), TypeError, "mask: expected a torch.Tensor, got list"),
    (
        lambda: masked_linear(torch.randn(2, 4), W, M),
        ValueError,
        "x: expected shape \\[..., 3\\] \\(last dim = weight's in_features\\), got \\(2, 4\\)",
    ),
    (lambda: masked_linear(torch.tensor(1.0), W, M), ValueError, "x: expected shape \\[..., 3\\]"),
    (lambda: masked_linear(X.long(), W, M), TypeError, "x: expected dtype float32"),
    (lambda: masked_linear([[1.0] * 3], W, M), TypeError, "x: expected a torch.Tensor, got list"),
    (
        lambda: masked_linear(X, W, M, torch.zeros(3)),
        ValueError,
        "bias: expected shape \\(4,\\) \\(weight's out_features\\), got \\(3,\\)",
    ),
    (lambda: masked_linear(X, W, M, torch.zeros(1, 4)), ValueError, "bias: expected a 1-D tensor, got 2-D"),
    (
        lambda: masked_linear(X.double(), W, M),
        TypeError,
        "weight: expected dtype torch.float64 \\(like x\\), got torch.float32",
    ),
    (
        lambda: masked_linear(X, W, M, torch.zeros(4, dtype=torch.float64)),
        TypeError,
        "bias: expected dtype torch.float32 \\(like x\\)",
    ),
    (
        lambda: masked_linear(X, W, M.to("meta")),
        ValueError,
        "mask: expected a tensor on cpu \\(like x\\), got one on meta",
    ),
]


@pytest.mark.parametrize("backend,device", WITH_REFERENCE, ids=WITH_REFERENCE_IDS)
@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_input_is_a_clear_error(backend, device, call, exc, match):
    with lotus_kernels.use_backend(backend if device == "cpu" else "reference"):
        with pytest.raises(exc, match=match):
            call()

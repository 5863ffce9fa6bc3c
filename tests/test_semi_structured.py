import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lotus_kernels.nn import SemiStructuredFallbackWarning, SemiStructuredLinear, semi_structured_mask
from lotus_kernels.ops import semi_structured_linear
from lotus_kernels.ops.semi_structured_linear import kernel_unsupported

CUDA_24 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
needs_cuda_24 = pytest.mark.skipif(not CUDA_24, reason="2:4 kernels need a CUDA GPU with sm80+")


def quiet(layer, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SemiStructuredFallbackWarning)
        return layer(x)


# ---------------------------------------------------------------- the mask
@pytest.mark.parametrize("shape", [(3, 8), (5, 64), (1, 4)])
def test_mask_keeps_exactly_two_of_every_four_by_magnitude(shape):
    w = torch.randn(*shape)
    mask = semi_structured_mask(w)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    groups = mask.reshape(shape[0], -1, 4)
    assert (groups.sum(-1) == 2).all()
    a = w.abs().reshape(shape[0], -1, 4)
    kept_min = a.masked_fill(~groups, float("inf")).amin(-1)
    dropped_max = a.masked_fill(groups, -1).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_mask_picks_the_known_entries_and_breaks_ties_to_the_earlier():
    w = torch.tensor([[0.1, -5.0, 3.0, 0.2, 1.0, 1.0, 1.0, 1.0]])
    assert semi_structured_mask(w).tolist() == [[False, True, True, False, True, True, False, False]]


def test_mask_rejects_in_features_not_multiple_of_4():
    with pytest.raises(ValueError, match=r"weight: in_features=6 must be a multiple of 4"):
        semi_structured_mask(torch.randn(2, 6))


# ---------------------------------------------------------------- module on the fallback path
def make(in_f=16, out_f=8, bias=True, dtype=torch.float32, device="cpu"):
    lin = nn.Linear(in_f, out_f, bias=bias).to(device, dtype)
    return lin, SemiStructuredLinear.from_linear(lin)


@pytest.mark.parametrize("bias", [True, False])
def test_cpu_falls_back_with_a_warning_and_matches_masked_reference(bias):
    lin, layer = make(bias=bias)
    x = torch.randn(2, 5, 16, requires_grad=True)
    with pytest.warns(
        SemiStructuredFallbackWarning, match=r"need CUDA.*falling back to a dense matmul with the 2:4-masked"
    ):
        y = layer(x)
    with warnings.catch_warnings():  # once per layer
        warnings.simplefilter("error", SemiStructuredFallbackWarning)
        layer(x)
    mask = semi_structured_mask(lin.weight)
    w_ref = lin.weight.detach().clone().requires_grad_()
    b_ref = lin.bias.detach().clone().requires_grad_() if bias else None
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, w_ref * mask, b_ref)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad)
    assert (layer.weight.grad[~layer.mask] == 0).all()
    if bias:
        torch.testing.assert_close(layer.bias.grad, b_ref.grad)


def test_strict_raises_instead_of_falling_back():
    layer = SemiStructuredLinear(16, 8, strict=True)
    with pytest.raises(RuntimeError, match=r"strict=True.*need a CUDA tensor"):
        layer(torch.randn(2, 16))


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_optimizer_step_keeps_pruned_weights_zero(opt):
    _, layer = make(in_f=32, out_f=16)
    optim = (
        torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        if opt == "sgd"
        else torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.01)
    )
    for _ in range(3):
        optim.zero_grad()
        quiet(layer, torch.randn(4, 32)).pow(2).sum().backward()
        optim.step()
    assert (layer.weight[~layer.mask] == 0).all()
    assert (layer.weight[layer.mask] != 0).all()


def test_to_linear_is_exact_and_leaves_the_original_alone():
    lin, layer = make(in_f=32, out_f=12)
    before = lin.weight.detach().clone()
    dense = layer.to_linear()
    assert type(dense) is nn.Linear
    assert torch.equal(dense.weight, before * semi_structured_mask(before))
    assert torch.equal(dense.bias, lin.bias)
    assert torch.equal(lin.weight, before)
    x = torch.randn(3, 32)
    assert torch.equal(dense(x), quiet(layer, x))


def test_given_mask_is_used_and_validated():
    lin = nn.Linear(8, 2)
    mask = torch.tensor([[True, False, False, True, False, False, False, True]] * 2)  # fewer than 2 is fine
    layer = SemiStructuredLinear.from_linear(lin, mask)
    assert torch.equal(layer.mask, mask)
    assert torch.equal(layer.weight, lin.weight.detach() * mask)
    with pytest.raises(ValueError, match=r"mask: expected a 2:4 pattern.*row 1, columns 4..7 keep 3"):
        bad = mask.clone()
        bad[1, 4:6] = True
        SemiStructuredLinear.from_linear(lin, bad)
    with pytest.raises(ValueError, match=r"mask: expected shape \(2, 8\)"):
        SemiStructuredLinear.from_linear(lin, mask[:, :4])
    with pytest.raises(TypeError, match=r"mask: expected a bool tensor"):
        SemiStructuredLinear.from_linear(lin, mask.float())


def test_bad_in_features_is_a_clear_error():
    with pytest.raises(ValueError, match=r"linear: in_features=10 must be a multiple of 4"):
        SemiStructuredLinear.from_linear(nn.Linear(10, 4))
    with pytest.raises(ValueError, match=r"in_features=6 must be a multiple of 4"):
        SemiStructuredLinear(6, 4)
    with pytest.raises(TypeError, match=r"linear: expected an nn.Linear"):
        SemiStructuredLinear.from_linear(nn.Conv2d(4, 4, 1))


def test_state_dict_round_trip():
    _, layer = make(in_f=32, out_f=8)
    fresh = SemiStructuredLinear(32, 8)
    assert not torch.equal(fresh.mask, layer.mask)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.mask, layer.mask) and torch.equal(fresh.weight, layer.weight)
    x = torch.randn(4, 32)
    assert torch.equal(quiet(fresh, x), quiet(layer, x))


def test_state_dict_with_a_non_2to4_mask_is_refused():
    layer = SemiStructuredLinear(8, 2)
    sd = layer.state_dict()
    sd["mask"] = torch.ones(2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"mask: expected a 2:4 pattern"):
        SemiStructuredLinear(8, 2).load_state_dict(sd)


def test_kernel_requirements_are_named():
    cls = torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    bf16 = torch.bfloat16
    assert kernel_unsupported("cuda", bf16, 64, 128, capability=(9, 0), backend_cls=cls) is None
    exc, msg = kernel_unsupported("cpu", bf16, 64, 128)
    assert exc is RuntimeError and "CUDA" in msg
    exc, msg = kernel_unsupported("cuda", bf16, 64, 128, capability=(7, 5), backend_cls=cls)
    assert exc is RuntimeError and "8.0+" in msg and "7.5" in msg
    exc, msg = kernel_unsupported("cuda", torch.float32, 64, 128, capability=(9, 0), backend_cls=cls)
    assert exc is TypeError and "float16 or bfloat16" in msg and "float32" in msg
    exc, msg = kernel_unsupported("cuda", bf16, 100, 128, capability=(9, 0), backend_cls=cls)
    assert exc is ValueError and "out_features=100 must be a positive multiple of 16" in msg
    exc, msg = kernel_unsupported(
        "cuda", bf16, 64, 36, capability=(9, 0), backend_cls=torch.sparse.SparseSemiStructuredTensorCUTLASS
    )
    assert exc is ValueError and "in_features=36 must be a positive multiple of 64" in msg


def test_op_refuses_what_the_kernels_cannot_run():
    w = torch.randn(16, 16)
    mask = semi_structured_mask(w)
    with pytest.raises(RuntimeError, match=r"semi_structured_linear: weight: the 2:4 kernels need a CUDA tensor"):
        semi_structured_linear(torch.randn(2, 16), w * mask, mask)
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 16\]"):
        semi_structured_linear(torch.randn(2, 8), w * mask, mask)


# ---------------------------------------------------------------- GPU: the real 2:4 kernels
@needs_cuda_24
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", [(7,), (2, 197)])
def test_cuda_kernel_path_matches_masked_reference(dtype, lead):
    lin, layer = make(in_f=128, out_f=64, dtype=dtype, device="cuda")
    assert layer.kernel_unsupported_reason() is None
    x = torch.randn(*lead, 128, device="cuda", dtype=dtype, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SemiStructuredFallbackWarning)
        y = layer(x)
    w_ref = lin.weight.detach().float().requires_grad_()
    x_ref = x.detach().float().requires_grad_()
    y_ref = F.linear(x_ref, w_ref * layer.mask, lin.bias.detach().float())
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.float())
    torch.testing.assert_close(x.grad.float(), x_ref.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(layer.weight.grad.float(), w_ref.grad * layer.mask, rtol=2e-2, atol=5e-2)
    assert (layer.weight.grad[~layer.mask] == 0).all()


@needs_cuda_24
def test_cuda_optimizer_step_keeps_zeros_on_kernel_path():
    _, layer = make(in_f=128, out_f=64, dtype=torch.bfloat16, device="cuda")
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        layer(torch.randn(16, 128, device="cuda", dtype=torch.bfloat16)).float().pow(2).sum().backward()
        opt.step()
    assert (layer.weight[~layer.mask] == 0).all()


@needs_cuda_24
def test_cuda_fp32_falls_back_with_a_warning():
    _, layer = make(in_f=128, out_f=64, dtype=torch.float32, device="cuda")
    with pytest.warns(SemiStructuredFallbackWarning, match="float16 or bfloat16"):
        layer(torch.randn(4, 128, device="cuda"))


@pytest.mark.slow  # ~15 s of compilation on the CPU
def test_torch_compile_matches_eager_on_the_fallback_path():
    torch._dynamo.reset()
    _, layer = make(in_f=32, out_f=16)
    x = torch.randn(4, 32, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SemiStructuredFallbackWarning)
        got = torch.compile(layer)(x)
        (gx,) = torch.autograd.grad(got.square().sum(), x)
        want = layer(x)
        (wx,) = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, wx)


# ---------------------------------------------------------------- transposable masks, GEMM dtype, compression cache
def test_transposable_mask_is_2_4_both_ways_and_best_per_tile():
    from itertools import product

    from lotus_kernels.ops.semi_structured_linear import is_transposable

    w = torch.randn(8, 12)
    mask = semi_structured_mask(w, transposable=True)
    assert mask.dtype == torch.bool and is_transposable(mask)
    assert (mask.reshape(8, 3, 4).sum(-1) == 2).all() and (mask.t().reshape(12, 2, 4).sum(-1) == 2).all()
    # brute force on one tile: no 2-per-row-and-column pattern keeps more magnitude
    tile = w[:4, 4:8].abs()
    best = max(
        sum(tile[i, j] for i in range(4) for j in range(4) if p[i][j])
        for p in product([r for r in product((0, 1), repeat=4) if sum(r) == 2], repeat=4)
        if all(sum(c) == 2 for c in zip(*p))
    )
    torch.testing.assert_close(tile[mask[:4, 4:8]].sum(), torch.as_tensor(best))
    assert not is_transposable(semi_structured_mask(torch.arange(64.0).reshape(8, 8)))  # row-wise only
    with pytest.raises(ValueError, match="out_features=6 must be a multiple of 4 for a transposable"):
        semi_structured_mask(torch.randn(6, 8), transposable=True)


def test_gemm_dtype_follows_autocast():
    from lotus_kernels.ops.semi_structured_linear import gemm_dtype

    w = torch.randn(8, 8)
    assert gemm_dtype(w) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm_dtype(w) == torch.bfloat16 and gemm_dtype(w.double()) == torch.float64
    # the 2:4 decision on that dtype: an fp32 weight under bf16 autocast qualifies on sm80+
    cls = torch.sparse.SparseSemiStructuredTensorCUTLASS
    assert kernel_unsupported("cuda", torch.bfloat16, 64, 128, capability=(9, 0), backend_cls=cls) is None


@pytest.mark.parametrize("transposable", [False, True])
def test_kernel_path_compresses_once_per_optimizer_step(monkeypatch, transposable):
    # The kernel path run on the CPU: the 2:4 requirement waived and the compressor replaced by a
    # counting identity (F.linear on the masked dense weight), so the caching and the gradients of
    # the kernel path's autograd function can be checked here.
    import lotus_kernels.nn.semi_structured_linear as mod

    monkeypatch.setattr(mod, "kernel_unsupported", lambda *a, **k: None)
    calls = []
    lin = nn.Linear(16, 8)
    layer = SemiStructuredLinear.from_linear(lin, transposable=transposable)
    monkeypatch.setattr(layer, "_compress", lambda w: calls.append(tuple(w.shape)) or w.clone())
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(3, 5, 16, requires_grad=True)
    for step in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            y.float().square().sum().backward()
            layer(x.detach())  # a second forward in the same step: no new compression
        assert y.dtype == torch.bfloat16
        want = [(8, 16), (16, 8)] if transposable else [(8, 16)]
        assert sorted(calls) == sorted(want * (step + 1))
        w_ref = (layer.weight.detach() * layer.mask).requires_grad_()
        x_ref = x.detach().requires_grad_()
        y_ref = F.linear(x_ref.bfloat16().float(), w_ref.bfloat16().float(), layer.bias.detach().bfloat16().float())
        y_ref.square().sum().backward()
        torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=3e-2, atol=3e-2)
        assert layer.weight.grad.dtype == torch.float32 and not layer.weight.grad[~layer.mask].any()
        torch.testing.assert_close(layer.weight.grad, w_ref.grad * layer.mask, rtol=3e-2, atol=1.5e-1)  # bf16 GEMM
        opt.step()
        opt.zero_grad()
        x.grad = None


@needs_cuda_24
@pytest.mark.cuda
@pytest.mark.parametrize("transposable", [False, True])
def test_cuda_fp32_model_under_bf16_autocast_takes_the_sparse_path(transposable):
    lin = nn.Linear(256, 128).cuda()
    layer = SemiStructuredLinear.from_linear(lin, transposable=transposable)
    x = torch.randn(4, 77, 256, device="cuda", requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SemiStructuredFallbackWarning)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert layer.kernel_unsupported_reason() is None
            y = layer(x)
    assert y.dtype == torch.bfloat16 and layer._compressed is not None
    assert (layer._compressed[2] is not None) == transposable  # W^T compressed only for a transposable mask
    w_ref = (layer.weight.detach() * layer.mask).requires_grad_()
    x_ref = x.detach().requires_grad_()
    y_ref = F.linear(x_ref, w_ref, layer.bias.detach())
    g = torch.randn_like(y_ref)
    y.float().backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(y.float(), y_ref, rtol=3e-2, atol=6e-2)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=3e-2, atol=6e-2)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad * layer.mask, rtol=3e-2, atol=3e-1)
    assert layer.weight.grad.dtype == torch.float32 and not layer.weight.grad[~layer.mask].any()

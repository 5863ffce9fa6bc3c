"""Kernels on a GPU at the sizes real training uses (ViT-B/16, batch 16), which the Triton interpreter
cannot afford: every backend against the plain-PyTorch reference in fp32 / bf16 / fp16, the autotuned
configs and the split-M weight gradient included. Run by ``make gpu-check`` (marker ``cuda``)."""

import pytest
import torch
import torch.nn.functional as F

import lotus_kernels
from lotus_kernels.ops import attention, block_sparse_linear, gather_tokens, patch_embed_gather, scatter_tokens
from lotus_kernels.ops.attention import attention_reference
from lotus_kernels.ops.block_sparse_linear import bsr_from_dense
from lotus_kernels.ops.patch_embed_gather import patch_embed_gather_reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPU_BACKENDS = [b for b in ("triton", "cuda") if lotus_kernels.backends().get(b)] if torch.cuda.is_available() else []
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=1e-1),
    torch.float16: dict(rtol=5e-3, atol=2e-2),
}
M = 16 * 197  # tokens of a ViT-B/16 batch of 16


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_f,in_f,bs,density", [(3072, 768, 32, 0.5), (768, 3072, 32, 0.1), (3072, 768, 64, 0.3)])
def test_block_sparse_linear_vit_b(backend, dtype, out_f, in_f, bs, density):
    torch.manual_seed(0)
    dev = "cuda"
    w = torch.randn(out_f, in_f, device=dev) / in_f**0.5
    mask = torch.rand(out_f // bs, in_f // bs, device=dev) < density
    fmt = bsr_from_dense(w, mask, bs)
    values = fmt[0].to(dtype).requires_grad_()
    x = torch.randn(M, in_f, device=dev, dtype=dtype, requires_grad=True)
    bias = torch.randn(out_f, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(M, out_f, device=dev, dtype=dtype)
    with lotus_kernels.use_backend(backend):
        y = block_sparse_linear(x, values, *fmt[1:], bias)
        got = (y, *torch.autograd.grad(y, (x, values, bias), g))
    ref_in = [t.detach().double().requires_grad_() for t in (x, values, bias)]
    with lotus_kernels.use_backend("reference"):
        y_ref = block_sparse_linear(ref_in[0], ref_in[1], *fmt[1:], ref_in[2])
    want = (y_ref, *torch.autograd.grad(y_ref, ref_in, g.double()))
    limit = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for name, a, b in zip(("y", "dx", "dvalues", "dbias"), got, want):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert rel_err(a, b) < limit, f"{name}: relative error {rel_err(a, b):.2e}"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_block_sparse_weight_gradient_is_deterministic_at_low_density(backend):
    # density 0.05: few stored blocks, so the weight gradient is split over M (two passes)
    torch.manual_seed(1)
    w = torch.randn(768, 3072, device="cuda")
    fmt = bsr_from_dense(w, torch.rand(24, 96, device="cuda") < 0.05, 32)
    x = torch.randn(M, 3072, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(M, 768, device="cuda", dtype=torch.bfloat16)
    values = fmt[0].bfloat16().requires_grad_()

    def dvalues():
        with lotus_kernels.use_backend(backend):
            return torch.autograd.grad(block_sparse_linear(x, values, *fmt[1:]), values, g)[0]

    first = dvalues()
    assert all(torch.equal(first, dvalues()) for _ in range(3))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_patch_embed_and_token_gather_vit_b(backend, dtype):
    torch.manual_seed(2)
    B, n, K, D = 16, 196, 98, 768
    images = torch.randn(B, 3, 224, 224, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(D, 3, 16, 16, device="cuda") / 28).to(dtype).requires_grad_()
    b, pos = (torch.randn(*s, device="cuda", dtype=dtype, requires_grad=True) for s in ((D,), (1, n, D)))
    idx = torch.rand(B, n, device="cuda").argsort(1)[:, :K].sort(1).values
    g = torch.randn(B, K, D, device="cuda", dtype=dtype)
    with lotus_kernels.use_backend(backend):
        out = patch_embed_gather(images, idx, w, b, pos)
        got = (out, *torch.autograd.grad(out, (images, w, b, pos), g))
        x = torch.randn(B, 197, D, device="cuda", dtype=dtype)
        kept = gather_tokens(x, idx + 1)
        back = scatter_tokens(kept, idx + 1, 197)
    ref_in = [t.detach().double().requires_grad_() for t in (images, w, b, pos)]
    ref = patch_embed_gather_reference(ref_in[0], idx, *ref_in[1:])
    want = (ref, *torch.autograd.grad(ref, ref_in, g.double()))
    limit = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for name, a, e in zip(("out", "dimages", "dweight", "dbias", "dpos"), got, want):
        assert rel_err(a, e) < limit, f"{name}: relative error {rel_err(a, e):.2e}"
    assert torch.equal(kept, torch.gather(x, 1, (idx + 1)[..., None].expand(-1, -1, D)))
    assert torch.equal(back, torch.zeros_like(x).scatter_(1, (idx + 1)[..., None].expand(-1, -1, D), kept))


@pytest.mark.parametrize("path", ["sdpa", "fused"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [197, 1025])
def test_attention_vit_b_against_sdpa(dtype, n, path, monkeypatch):
    # both ways of computing out + cls scores: SDPA + the cls-row kernel, and our fused kernel
    if not lotus_kernels.backends().get("triton"):
        pytest.skip("triton is not available")
    monkeypatch.setenv("LOTUS_KERNELS_ATTENTION_PATH", path)
    torch.manual_seed(3)
    B, H, D = 8 if n == 197 else 2, 12, 64
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(B, H, n, D, device="cuda", dtype=dtype)
    with lotus_kernels.use_backend("triton"):
        out, cls = attention(q, k, v, return_scores="cls")
        grads = torch.autograd.grad(out, (q, k, v), g)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref, ref_cls = attention_reference(*ref_in, return_scores="cls")
    ref_grads = torch.autograd.grad(ref, ref_in, g.float())
    limit = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for name, a, e in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert rel_err(a, e) < limit, f"{name}: relative error {rel_err(a, e):.2e}"
    torch.testing.assert_close(cls, ref_cls, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_varlen_sdpa_path_on_packed_sequences(dtype, monkeypatch):
    # torch's varlen flash attention for out (empty and lone sequences included) + the packed cls-row kernel
    if not lotus_kernels.backends().get("triton"):
        pytest.skip("triton is not available")
    from lotus_kernels.ops.attention import attention_reference_varlen

    monkeypatch.setenv("LOTUS_KERNELS_ATTENTION_PATH", "sdpa")
    torch.manual_seed(5)
    lens = [197, 0, 98, 1, 150, 0, 197]
    cu = torch.tensor([0, *lens], device="cuda").cumsum(0)
    q, k, v = (torch.randn(int(cu[-1]), 12, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    with lotus_kernels.use_backend("triton"):
        out, sc = attention(q, k, v, cu_seqlens=cu.int(), max_seqlen=197, return_scores="cls")
        grads = torch.autograd.grad(out, (q, k, v), g)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref, ref_sc = attention_reference_varlen(*ref_in, cu, return_scores="cls")
    ref_grads = torch.autograd.grad(ref, ref_in, g.float())
    limit = {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for name, a, e in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert rel_err(a, e) < limit, f"{name}: relative error {rel_err(a, e):.2e}"
    torch.testing.assert_close(sc, ref_sc, rtol=1e-3, atol=1e-5)


def test_whole_step_has_no_sync_with_default_backends_on_a_vit_b_sized_batch():
    # The block-sparse ViT train step of test_no_host_sync at a size that autotunes: after the
    # first (tuning) step, no synchronising CUDA call at all.
    timm = pytest.importorskip("timm")
    from lotus_kernels import patch_vit, sparsify_

    torch.manual_seed(4)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=16, embed_dim=384, depth=2, num_heads=6, num_classes=10
    )
    patch_vit(model)
    sparsify_(model, sparsity=0.5, layout="block", block_size=32, include=["*.mlp.*"])
    model.cuda().train()
    opt_params = [p for p in model.parameters() if p.requires_grad]
    images = torch.randn(32, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 10, (32,), device="cuda")

    def step(seed):
        idx = torch.rand(32, 196, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        idx = idx.topk(98, dim=1).indices.sort(dim=1).values
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images, keep_idx=idx), labels)
        loss.backward()
        with torch.no_grad():
            for p in opt_params:
                p.add_(p.grad, alpha=-1e-3)
                p.grad = None

    step(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(1)
        step(2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()

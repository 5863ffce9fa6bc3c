import pytest
import torch

import lotus_kernels
from lotus_kernels.ops import im2col_gather, patch_embed_gather
from lotus_kernels.ops.patch_embed_gather import (
    col2im_scatter_reference,
    im2col_gather_reference,
    patch_embed_gather_reference,
)

from ..conftest import BACKEND_IDS, BACKENDS

# (B, Cin, H, W, D, (ph, pw)): CIFAR patch 4, ViT patch 16 on a small grid, a rectangular patch,
# odd widths D, a single patch, a single channel.
GEOMS = [
    (2, 3, 32, 32, 33, (4, 4)),
    (2, 3, 48, 64, 64, (16, 16)),
    (3, 2, 12, 16, 17, (2, 4)),
    (1, 3, 16, 16, 8, (16, 16)),
    (2, 1, 8, 8, 5, (2, 2)),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def inputs(geom, dtype, device, keep, with_bias=True, with_pos=True, dup=False):
    B, C, H, W, D, (ph, pw) = geom
    n = (H // ph) * (W // pw)
    k = max(1, round(keep * n))
    if dup:
        idx = torch.randint(0, n, (B, k), device=device)
    else:
        idx = torch.rand(B, n, device=device).argsort(1)[:, :k].sort(1).values
    t = lambda *s: torch.randn(*s, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
    return (t(B, C, H, W), idx, t(D, C, ph, pw), t(D) if with_bias else None, t(1, n, D) if with_pos else None)


def grads(out, tensors, g):
    live = [t for t in tensors if t is not None]
    return torch.autograd.grad(out, live, g)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("keep,dup", [(0.5, False), (1.0, False), (0.01, False), (0.7, True)])
def test_forward_backward_matches_reference(backend, device, dtype, geom, keep, dup):
    images, idx, w, b, pos = inputs(geom, dtype, device, keep, dup=dup)
    with lotus_kernels.use_backend(backend):
        out = patch_embed_gather(images, idx, w, b, pos)
    g = torch.randn_like(out)
    got = grads(out, (images, w, b, pos), g)
    ref_in = [t.detach().double().requires_grad_() for t in (images, w, b, pos)]
    ref = patch_embed_gather_reference(ref_in[0], idx, *ref_in[1:])
    want = grads(ref, ref_in, g.double())
    # Dot products of length Cin*ph*pw (and B*K for dweight): error grows with their length.
    length = max(geom[1] * geom[5][0] * geom[5][1], idx.numel())
    tol = dict(rtol=1e-4, atol=1e-5 * length**0.5)
    if dtype == torch.bfloat16:
        tol = dict(rtol=5e-2, atol=2e-2 * length**0.5)
    if dtype == torch.float16:
        tol = dict(rtol=1e-2, atol=3e-3 * length**0.5)
    torch.testing.assert_close(out.double(), ref, **tol)
    for name, a, e in zip(("images", "weight", "bias", "pos_embed"), got, want):
        torch.testing.assert_close(a.double(), e, **tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("with_bias,with_pos", [(False, False), (True, False), (False, True)])
def test_optional_bias_and_pos(backend, device, with_bias, with_pos):
    images, idx, w, b, pos = inputs(GEOMS[0], torch.float32, device, 0.5, with_bias, with_pos)
    with lotus_kernels.use_backend(backend):
        out = patch_embed_gather(images, idx, w, b, pos)
    torch.testing.assert_close(out, patch_embed_gather_reference(images, idx, w, b, pos), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("geom", GEOMS)
def test_im2col_gather_is_exact_and_its_adjoint_matches(backend, device, geom):
    images, idx, *_ = inputs(geom, torch.float32, device, 0.6, dup=True)
    ph, pw = geom[5]
    with lotus_kernels.use_backend(backend):
        cols = im2col_gather(images, idx, (ph, pw))
        g = torch.randn_like(cols)
        (d_img,) = torch.autograd.grad(cols, images, g)
    torch.testing.assert_close(cols, im2col_gather_reference(images.detach(), idx, ph, pw), rtol=0, atol=0)
    want = col2im_scatter_reference(g, idx, ph, pw, geom[2], geom[3])
    torch.testing.assert_close(d_img, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_gradcheck_float64(backend, device):
    images, idx, w, b, pos = inputs((2, 2, 8, 8, 3, (4, 4)), torch.float64, device, 0.75, dup=True)
    with lotus_kernels.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: patch_embed_gather(a[0], idx, *a[1:]), (images, w, b, pos))
        assert torch.autograd.gradcheck(lambda x: im2col_gather(x, idx, 4), (images,))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_non_contiguous_inputs(backend, device):
    images, idx, w, b, pos = inputs(GEOMS[0], torch.float32, device, 0.5)
    images_nc = images.detach().permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # channels-last-ish strides
    w_nc = w.detach().transpose(2, 3).contiguous().transpose(2, 3)
    assert not images_nc.is_contiguous() and not w_nc.is_contiguous()
    with lotus_kernels.use_backend(backend):
        out = patch_embed_gather(images_nc, idx, w_nc, b, pos)
    torch.testing.assert_close(out, patch_embed_gather_reference(images, idx, w, b, pos), rtol=1e-4, atol=1e-4)


L = torch.long
IMG, W = torch.randn(2, 3, 32, 32), torch.randn(8, 3, 4, 4)
IDX = torch.zeros(2, 5, dtype=L)
BAD = [
    ((IMG, torch.full((2, 5), 64), W), IndexError, "idx: index 64 is out of range; expected values in \\[0, 64\\)"),
    ((IMG, IDX.float(), W), TypeError, "idx: expected an int64 index tensor"),
    ((IMG[0], IDX, W), ValueError, "images: expected a 4-D tensor, got 3-D"),
    ((IMG, IDX, W[:, :2]), ValueError, "images: expected 2 channels to match weight"),
    ((torch.randn(2, 3, 30, 32), IDX, W), ValueError, "images: expected height and width divisible by the patch size"),
    ((IMG, IDX, W, torch.randn(7)), ValueError, "bias: expected shape \\(8,\\)"),
    ((IMG, IDX, W, None, torch.randn(1, 65, 8)), ValueError, "pos_embed: expected shape \\(64, 8\\) or \\(1, 64, 8\\)"),
    ((IMG, IDX, W.double()), TypeError, "weight: expected dtype torch.float32 \\(like images\\)"),
    ((IMG, IDX[:1], W), ValueError, "idx: batch size 1 does not match images's batch size 2"),
    ((IMG, IDX[:, :0], W), ValueError, "K >= 1"),
    ((torch.randn(0, 3, 32, 32), IDX[:0], W), ValueError, "images: expected a non-empty batch"),
    ((IMG, IDX, torch.randn(8, 3, 4)), ValueError, "weight: expected a 4-D tensor"),
]


@pytest.mark.parametrize("args,exc,match", BAD)
def test_bad_input_is_a_clear_error(args, exc, match):
    for backend in ("reference", "cpu"):
        with lotus_kernels.use_backend(backend), pytest.raises(exc, match=match):
            patch_embed_gather(*args)


@pytest.mark.parametrize("by_token", [False, True], ids=["scatter", "by-token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_positional_table_gradient_both_ways(by_token, dtype):
    # The pos-embed gradient sums all B*K rows per token (duplicates within and across images):
    # by token (torch's sort-based index_put_, the GPU path) or by one B = 1 scatter (the CPU path).
    from lotus_kernels.ops.patch_embed_gather import table_grad

    rows = torch.randn(50, 24).to(dtype)
    idx = torch.randint(0, 9, (50,))
    idx[:3] = 8
    got = table_grad(rows, idx, 12, by_token=by_token)
    want = torch.zeros(12, 24, dtype=torch.float64).index_add_(0, idx, rows.double())
    assert got.dtype == dtype and not got[9:].any()
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_follows_autocast_like_conv2d():
    images, idx, w, b, pos = inputs(GEOMS[0], torch.float32, "cpu", 0.5)
    # The whole op runs in the autocast dtype (GEMM, bias, pos rows), as F.linear with a bias does.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = patch_embed_gather(images, idx, w, b, pos)
    assert out.dtype == torch.bfloat16
    want = patch_embed_gather_reference(
        *(t.detach().bfloat16().double() for t in (images,)),
        idx,
        *(t.detach().bfloat16().double() for t in (w, b, pos)),
    )
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=5e-2)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (images, w, b, pos))

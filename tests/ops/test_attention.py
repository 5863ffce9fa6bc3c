import importlib

import pytest
import torch

import lotus_kernels
from lotus_kernels.ops import attention
from lotus_kernels.ops.attention import (
    apply_sink,
    apply_sink_varlen,
    attention_probs_reference,
    attention_reference,
    attention_reference_varlen,
)

from ..conftest import BACKENDS

attention_ops = importlib.import_module("lotus_kernels.ops.attention")  # the module (``attention`` is the op)

# The full matrix runs on the reference and the C++ kernels; the Triton forward (interpreted on CPU:
# slow) gets its own, smaller set of cases below. There is no CUDA C++ attention kernel yet.
KERNELS = [(b, d) for b, d in BACKENDS if b not in ("triton", "cuda")]
IMPLS = [("reference", "cpu"), *KERNELS]
IMPL_IDS = [f"{b}-{d}" for b, d in IMPLS]

# (N, D): ViT-S/16 tokens, a short sequence crossing a key block, a lone token, an odd head dim.
SHAPES = [(197, 64), (50, 32), (1, 32), (70, 40), (33, 128)]  # head dims 32 / 64 / 128 and odd ones
B, H = 2, 3
TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


@pytest.fixture(autouse=True)
def _fused_path(monkeypatch):
    """The tests of this module test each backend's own (fused) kernels: pin that path (on CUDA the default
    takes the output from SDPA). The SDPA-path tests at the end set it back."""
    monkeypatch.setenv(attention_ops.ENV_PATH, "fused")


def make_mask(kind, n, device):
    if kind is None:
        return None
    m = torch.zeros(B, n, dtype=torch.bool, device=device)
    if kind == "lengths":  # images of different lengths: 1 keeps every token, 0 keeps ~2/3
        m[0, (2 * n + 2) // 3 :] = True
    else:  # "empty": image 1 fully padded, image 0 with a hole in the middle
        m[1] = True
        m[0, n // 3 : n // 2] = True
    return m


def qkv(n, d, dtype, device, grad=True):
    return [torch.randn(B, H, n, d, device=device, dtype=dtype, requires_grad=grad) for _ in range(3)]


@pytest.mark.parametrize("backend,device", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-D{d}" for n, d in SHAPES])
@pytest.mark.parametrize("mask", [None, "lengths", "empty"])
def test_forward_backward_matches_sdpa(backend, device, dtype, shape, mask):
    n, d = shape
    q, k, v = qkv(n, d, dtype, device)
    m = make_mask(mask, n, device)
    g = torch.randn(B, H, n, d, device=device, dtype=dtype)
    with lotus_kernels.use_backend(backend):
        out = attention(q, k, v, key_padding_mask=m)
        grads = torch.autograd.grad(out, (q, k, v), g)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*ref_in, key_padding_mask=m)
    ref_grads = torch.autograd.grad(ref, ref_in, g.float())
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in grads)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want, **TOL[dtype])
    if mask == "empty":  # a fully padded image: zero output and zero gradients, not NaN
        assert out[1].abs().max() == 0 and all(t[1].abs().max() == 0 for t in grads)


@pytest.mark.parametrize("backend,device", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("mode", ["cls", "received"])
@pytest.mark.parametrize("sink", ["mean", None])
@pytest.mark.parametrize("mask", [None, "lengths", "empty"])
@pytest.mark.parametrize("shape", [(197, 64), (1, 32), (70, 40)], ids=["N197", "N1", "N70-D40"])
def test_scores_match_explicit_softmax(backend, device, mode, sink, mask, shape):
    n, d = shape
    q, k, v = qkv(n, d, torch.float32, device, grad=False)
    m = make_mask(mask, n, device)
    with lotus_kernels.use_backend(backend):
        out, sc = attention(q, k, v, key_padding_mask=m, return_scores=mode, sink=sink)
        plain = attention(q, k, v, key_padding_mask=m)
    p = attention_probs_reference(q, k, m)
    want = p[:, :, 0].mean(1) if mode == "cls" else None
    if mode == "received":
        valid = torch.ones(B, n, device=device) if m is None else (~m).float()
        want = (p * valid[:, None, :, None]).sum(2).mean(1) / valid.sum(1).clamp_min(1)[:, None]
    if sink == "mean":
        want = apply_sink(want, m)
    assert sc.dtype == torch.float32 and sc.shape == (B, n) and not sc.requires_grad
    torch.testing.assert_close(sc, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(out, plain)  # the sink rule and the scores never touch out
    if m is not None:
        assert (sc[m] == 0).all()  # padded keys score 0
    if sink is None:  # before the sink fix each image's scores are a distribution (or all 0 if empty)
        total = sc.sum(1)
        expect = torch.ones(B, device=device) if m is None else (~m.all(1)).float()
        torch.testing.assert_close(total, expect, rtol=1e-5, atol=1e-5)


def test_sink_rule():
    sc = torch.tensor([[0.5, 0.2, 0.3, 0.0], [0.1, 0.3, 0.6, 0.0]])
    mask = torch.tensor([[False, False, False, True], [True, False, False, True]])
    out = apply_sink(sc, mask)
    torch.testing.assert_close(out, torch.tensor([[0.25, 0.2, 0.3, 0.0], [0.0, 0.3, 0.6, 0.0]]))
    torch.testing.assert_close(apply_sink(torch.tensor([[0.7]])), torch.tensor([[0.0]]))  # N = 1: no other keys


@pytest.mark.parametrize("backend,device", IMPLS, ids=IMPL_IDS)
def test_gradcheck_float64_and_scores_dtype(backend, device):
    q, k, v = (torch.randn(2, 2, 5, 3, device=device, dtype=torch.float64, requires_grad=True) for _ in range(3))
    m = torch.tensor([[False, False, False, True, True], [True] * 5], device=device)
    with lotus_kernels.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, scale=0.7), (q, k, v))
        assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, key_padding_mask=m), (q, k, v))
        _, sc = attention(q, k, v, return_scores="received")
    assert sc.dtype == torch.float64


@pytest.mark.parametrize("backend,device", KERNELS, ids=[f"{b}-{d}" for b, d in KERNELS])
def test_half_and_non_contiguous_inputs(backend, device):
    x = torch.randn(B, 33, 3, H, 16, device=device)  # timm's qkv layout, permuted: strided views
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    with lotus_kernels.use_backend(backend):
        out = attention(q, k, v)
        out_h = attention(q.half(), k.half(), v.half())
    torch.testing.assert_close(out, attention_reference(q, k, v), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out_h.float(), out, rtol=3e-3, atol=3e-3)


def test_compile_sees_one_op():
    q, k, v = qkv(9, 8, torch.float32, "cpu", grad=False)
    f = torch.compile(lambda a, b, c: attention(a, b, c, return_scores="cls"), fullgraph=True, backend="eager")
    out, sc = f(q, k, v)
    want_out, want_sc = attention_reference(q, k, v, return_scores="cls")
    torch.testing.assert_close(out, want_out, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(sc, want_sc, rtol=1e-5, atol=1e-6)


T = lambda *s, **kw: torch.randn(*s, **kw)  # noqa: E731
BAD = [
    (lambda: attention(T(2, 3, 5, 4), T(2, 3, 6, 4), T(2, 3, 5, 4)), ValueError, "k: expected shape \\(2, 3, 5, 4\\)"),
    (lambda: attention(T(2, 3, 5, 4), T(2, 3, 5, 4), T(2, 3, 5, 8)), ValueError, "v: expected shape"),
    (
        lambda: attention(T(3, 5, 4), T(3, 5, 4), T(3, 5, 4)),
        ValueError,
        "q: expected a 4-D tensor \\[B, H, N, D\\], got 3-D",
    ),
    (lambda: attention(T(1, 1, 2, 2).long(), T(1, 1, 2, 2), T(1, 1, 2, 2)), TypeError, "q: expected dtype float32"),
    (
        lambda: attention(T(1, 1, 2, 2), T(1, 1, 2, 2).double(), T(1, 1, 2, 2)),
        TypeError,
        "k: expected dtype torch.float32 \\(like q\\)",
    ),
    (
        lambda: attention(
            T(1, 1, 2, 2), T(1, 1, 2, 2), T(1, 1, 2, 2), key_padding_mask=torch.zeros(1, 3, dtype=torch.bool)
        ),
        ValueError,
        "key_padding_mask: expected shape \\(1, 2\\)",
    ),
    (
        lambda: attention(T(1, 1, 2, 2), T(1, 1, 2, 2), T(1, 1, 2, 2), key_padding_mask=torch.zeros(1, 2)),
        TypeError,
        "key_padding_mask: expected a bool tensor",
    ),
    (
        lambda: attention(T(1, 1, 2, 2), T(1, 1, 2, 2), T(1, 1, 2, 2), return_scores="max"),
        ValueError,
        "return_scores: expected None, 'cls' or 'received', got 'max'",
    ),
    (
        lambda: attention(T(1, 1, 2, 2), T(1, 1, 2, 2), T(1, 1, 2, 2), sink="drop"),
        ValueError,
        "sink: expected 'mean' or None",
    ),
    (
        lambda: attention(T(1, 1, 2, 2), T(1, 1, 2, 2), T(1, 1, 2, 2, device="meta")),
        ValueError,
        "v: expected a tensor on cpu",
    ),
    (
        lambda: attention(T(1, 1, 2, 2), T(1, 1, 2, 2), T(1, 1, 2, 2), scale=float("nan")),
        ValueError,
        "scale: expected a finite float",
    ),
    (lambda: attention(T(1, 1, 0, 2), T(1, 1, 0, 2), T(1, 1, 0, 2)), ValueError, "q: expected N >= 1 tokens"),
    (lambda: attention([[1.0]], T(1, 1, 2, 2), T(1, 1, 2, 2)), TypeError, "q: expected a torch.Tensor, got list"),
]


@pytest.mark.parametrize("backend,device", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_input_is_a_clear_error(backend, device, call, exc, match):
    with lotus_kernels.use_backend(backend):
        with pytest.raises(exc, match=match):
            call()


TRITON = [(b, d) for b, d in BACKENDS if b == "triton"]
# The interpreter costs ~1 s per call at N = 197: a handful of cases that cover the kernel's paths
# (multi-block keys, odd D, bf16, a lone token, padding incl. a fully padded image).
TRITON_CASES = [
    ((197, 64), torch.float32, "empty"),
    ((50, 32), torch.bfloat16, "lengths"),
    ((33, 128), torch.float32, "lengths"),
    ((1, 32), torch.float32, None),
    ((70, 40), torch.float32, "lengths"),
    ((70, 40), torch.bfloat16, "empty"),
    ((9, 3), torch.float64, "lengths"),
    ((50, 32), torch.float16, "lengths"),
]


@pytest.mark.parametrize("backend,device", TRITON, ids=[f"{b}-{d}" for b, d in TRITON])
@pytest.mark.parametrize(
    "shape,dtype,mask", TRITON_CASES, ids=[f"N{s[0]}-D{s[1]}-{str(t)[6:]}-{m}" for s, t, m in TRITON_CASES]
)
def test_triton_forward_scores_and_backward(backend, device, shape, dtype, mask):
    n, d = shape
    q, k, v = qkv(n, d, dtype, device)
    m = make_mask(mask, n, device)
    g = torch.randn(B, H, n, d, device=device, dtype=dtype)
    with lotus_kernels.use_backend(backend):
        out, cls = attention(q, k, v, key_padding_mask=m, return_scores="cls")
        grads = torch.autograd.grad(out, (q, k, v), g)
        _, rec = attention(q.detach(), k.detach(), v.detach(), key_padding_mask=m, return_scores="received", sink=None)
    tol = TOL.get(dtype, dict(rtol=1e-10, atol=1e-10))
    ref_in = [
        t.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_() for t in (q, k, v)
    ]
    ref, ref_cls = attention_reference(*ref_in, key_padding_mask=m, return_scores="cls")
    _, ref_rec = attention_reference(*ref_in, key_padding_mask=m, return_scores="received", sink=None)
    ref_grads = torch.autograd.grad(ref, ref_in, g.to(ref.dtype))
    torch.testing.assert_close(out.to(ref.dtype), ref, **tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.to(ref.dtype), want, **tol)
    score_tol = dict(rtol=1e-5, atol=1e-6) if dtype != torch.float64 else tol
    torch.testing.assert_close(cls, ref_cls.to(cls.dtype), **score_tol)
    torch.testing.assert_close(rec, ref_rec.to(rec.dtype), **score_tol)


# ---------------------------------------------------------------- packed varlen (cu_seqlens)
# Sequence lengths incl. ViT-S's 197, a lone token and empty sequences (which own no tokens).
VARLEN = [(197, 50, 1, 0), (0, 3), (1,), (70, 0, 5, 130)]


def packed(lens, h, d, dtype, device, grad=True):
    cu = torch.tensor([0, *lens], device=device).cumsum(0)
    t = int(cu[-1])
    return [torch.randn(t, h, d, device=device, dtype=dtype, requires_grad=grad) for _ in range(3)], cu


@pytest.mark.parametrize("backend,device", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens", VARLEN, ids=["-".join(map(str, x)) for x in VARLEN])
@pytest.mark.parametrize("d", [64, 40])
def test_varlen_forward_backward_matches_per_sequence_sdpa(backend, device, dtype, lens, d):
    (q, k, v), cu = packed(lens, H, d, dtype, device)
    g = torch.randn_like(q)
    with lotus_kernels.use_backend(backend):
        out = attention(q, k, v, cu_seqlens=cu)
        grads = torch.autograd.grad(out, (q, k, v), g)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attention_reference_varlen(*ref_in, cu)
    ref_grads = torch.autograd.grad(ref, ref_in, g.float(), allow_unused=True)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(
            got.float(), want if want is not None else torch.zeros_like(got.float()), **TOL[dtype]
        )


@pytest.mark.parametrize("backend,device", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("mode", ["cls", "received"])
@pytest.mark.parametrize("sink", ["mean", None])
@pytest.mark.parametrize("lens", VARLEN, ids=["-".join(map(str, x)) for x in VARLEN])
def test_varlen_scores_match_per_sequence_softmax(backend, device, mode, sink, lens):
    (q, k, v), cu = packed(lens, H, 32, torch.float32, device, grad=False)
    with lotus_kernels.use_backend(backend):
        out, sc = attention(q, k, v, cu_seqlens=cu.int(), return_scores=mode, sink=sink)  # int32 offsets too
    want_out, want = attention_reference_varlen(q, k, v, cu, return_scores=mode, sink=sink)
    assert sc.shape == (q.shape[0],) and sc.dtype == torch.float32
    torch.testing.assert_close(sc, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, want_out, rtol=2e-5, atol=2e-5)
    if sink is None:  # each non-empty sequence's scores are a distribution
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if e > s:
                torch.testing.assert_close(sc[s:e].sum(), torch.tensor(1.0), rtol=1e-5, atol=1e-5)


def test_varlen_equals_padded_batch_with_mask():
    """The same ragged batch, packed or padded with key_padding_mask: same per-token output, and the
    padded batch's scores on the real tokens."""
    lens = (9, 4, 6)
    (q, k, v), cu = packed(lens, H, 16, torch.float32, "cpu", grad=False)
    n = max(lens)
    pad = (
        lambda x: torch.stack(
            [
                torch.cat([x[s:e], x.new_zeros(n - (e - s), *x.shape[1:])])  # noqa: E731
                for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())
            ]
        ).transpose(1, 2)
    )
    mask = torch.arange(n)[None, :] >= torch.tensor(lens)[:, None]
    out, sc = attention(q, k, v, cu_seqlens=cu, return_scores="received")
    out_p, sc_p = attention(pad(q), pad(k), pad(v), key_padding_mask=mask, return_scores="received")
    torch.testing.assert_close(out, out_p.transpose(1, 2)[~mask], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sc, sc_p[~mask], rtol=1e-5, atol=1e-6)


def test_varlen_sink_rule():
    sc = torch.tensor([0.5, 0.2, 0.3, 0.9, 0.4, 0.6])
    cu = torch.tensor([0, 3, 3, 4, 6])  # lengths 3, 0, 1, 2
    torch.testing.assert_close(apply_sink_varlen(sc, cu), torch.tensor([0.25, 0.2, 0.3, 0.0, 0.6, 0.6]))


@pytest.mark.parametrize("backend,device", IMPLS, ids=IMPL_IDS)
def test_varlen_gradcheck_float64(backend, device):
    (q, k, v), cu = packed((3, 0, 1, 4), 2, 3, torch.float64, device)
    with lotus_kernels.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, cu_seqlens=cu, scale=0.8), (q, k, v))


@pytest.mark.parametrize("backend,device", IMPLS, ids=IMPL_IDS)
def test_varlen_all_empty(backend, device):
    q = torch.randn(0, 2, 4, device=device, requires_grad=True)
    with lotus_kernels.use_backend(backend):
        out, sc = attention(q, q, q, cu_seqlens=torch.tensor([0, 0, 0], device=device), return_scores="cls")
        out.sum().backward()
    assert out.shape == (0, 2, 4) and sc.shape == (0,) and q.grad.shape == (0, 2, 4)


CU = lambda *v: torch.tensor(v)  # noqa: E731
P = lambda t=5: T(t, 2, 4)  # noqa: E731
BAD_VARLEN = [
    (lambda: attention(P(), P(), P(), cu_seqlens=CU(0, 2, 5)[None]), ValueError, "cu_seqlens: expected a 1-D tensor"),
    (
        lambda: attention(P(), P(), P(), cu_seqlens=CU(1, 2, 5)),
        ValueError,
        "cu_seqlens: expected to start at 0, got cu_seqlens\\[0\\] = 1",
    ),
    (
        lambda: attention(P(), P(), P(), cu_seqlens=CU(0, 3, 2, 5)),
        ValueError,
        "cu_seqlens: expected non-decreasing offsets, got cu_seqlens\\[1\\] = 3 > cu_seqlens\\[2\\] = 2",
    ),
    (lambda: attention(P(), P(), P(), cu_seqlens=CU(0, 2, 4)), ValueError, "cu_seqlens: expected to end at T = 5"),
    (
        lambda: attention(P(), P(), P(), cu_seqlens=CU(0, 2, 5).float()),
        TypeError,
        "cu_seqlens: expected dtype int64 or int32, got float32",
    ),
    (
        lambda: attention(P(), P(), P(), cu_seqlens=CU(0, 5).to("meta")),
        ValueError,
        "cu_seqlens: expected a tensor on cpu",
    ),
    (lambda: attention(P(), P(), P(), cu_seqlens=CU().long()), ValueError, "cu_seqlens: expected B \\+ 1 >= 1 offsets"),
    (lambda: attention(P(), P(), P(), cu_seqlens=[0, 5]), TypeError, "cu_seqlens: expected a torch.Tensor"),
    (
        lambda: attention(P(), P(), P(), cu_seqlens=CU(0, 5), key_padding_mask=torch.zeros(1, 5, dtype=torch.bool)),
        ValueError,
        "key_padding_mask: cannot be combined with cu_seqlens",
    ),
    (
        lambda: attention(P(), P(), P(), cu_seqlens=CU(0, 2, 5), max_seqlen=2),
        ValueError,
        "max_seqlen: expected an int >= the longest sequence \\(3\\)",
    ),
    (
        lambda: attention(T(1, 1, 2, 2), T(1, 1, 2, 2), T(1, 1, 2, 2), max_seqlen=2),
        ValueError,
        "max_seqlen: only meaningful together with cu_seqlens",
    ),
    (
        lambda: attention(T(1, 2, 5, 4), T(1, 2, 5, 4), T(1, 2, 5, 4), cu_seqlens=CU(0, 5)),
        ValueError,
        "q: expected a 3-D tensor \\[T, H, D\\] \\(packed",
    ),
    (lambda: attention(P(), P(6), P(), cu_seqlens=CU(0, 5)), ValueError, "k: expected shape \\(5, 2, 4\\)"),
]


@pytest.mark.parametrize("call,exc,match", BAD_VARLEN)
def test_bad_varlen_input_is_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# Triton (interpreted): a few varlen cases and float64 gradchecks of the Triton backward.
TRITON_VARLEN = [((70, 1, 0, 9), torch.float32, 40), ((50, 3), torch.bfloat16, 32), ((5, 0, 2), torch.float64, 3)]


@pytest.mark.parametrize("backend,device", TRITON, ids=[f"{b}-{d}" for b, d in TRITON])
@pytest.mark.parametrize(
    "lens,dtype,d", TRITON_VARLEN, ids=[f"{'-'.join(map(str, x))}-{str(t)[6:]}" for x, t, _ in TRITON_VARLEN]
)
def test_triton_varlen_forward_scores_and_backward(backend, device, lens, dtype, d):
    (q, k, v), cu = packed(lens, H, d, dtype, device)
    g = torch.randn_like(q)
    with lotus_kernels.use_backend(backend):
        out, cls = attention(q, k, v, cu_seqlens=cu, return_scores="cls")
        grads = torch.autograd.grad(out, (q, k, v), g)
        _, rec = attention(q.detach(), k.detach(), v.detach(), cu_seqlens=cu, return_scores="received", sink=None)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = TOL.get(dtype, dict(rtol=1e-10, atol=1e-10))
    ref_in = [t.detach().to(acc).requires_grad_() for t in (q, k, v)]
    ref, ref_cls = attention_reference_varlen(*ref_in, cu, return_scores="cls")
    _, ref_rec = attention_reference_varlen(*ref_in, cu, return_scores="received", sink=None)
    ref_grads = torch.autograd.grad(ref, ref_in, g.to(acc))
    torch.testing.assert_close(out.to(acc), ref, **tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.to(acc), want, **tol)
    score_tol = dict(rtol=1e-5, atol=1e-6) if dtype != torch.float64 else tol
    torch.testing.assert_close(cls, ref_cls.to(cls.dtype), **score_tol)
    torch.testing.assert_close(rec, ref_rec.to(rec.dtype), **score_tol)


@pytest.mark.parametrize("backend,device", TRITON, ids=[f"{b}-{d}" for b, d in TRITON])
def test_triton_backward_gradcheck_float64(backend, device):
    # tiny: the interpreter pays per launch, and gradcheck launches the backward once per output element
    q, k, v = (torch.randn(1, 1, 4, 2, device=device, dtype=torch.float64, requires_grad=True) for _ in range(3))
    m = torch.tensor([[False, True, False, False]], device=device)
    (pq, pk, pv), cu = packed((2, 0, 1), 1, 2, torch.float64, device)
    with lotus_kernels.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, key_padding_mask=m), (q, k, v))
        assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, cu_seqlens=cu), (pq, pk, pv))


@pytest.mark.parametrize("backend,device", KERNELS, ids=[f"{b}-{d}" for b, d in KERNELS])
@pytest.mark.parametrize("mode,dtype", [("cls", torch.float32), ("received", torch.float32), ("cls", torch.bfloat16)])
def test_long_sequences_take_the_blocked_path(backend, device, mode, dtype):
    """Above 2048 keys the C++ forward switches from whole rows to online-softmax key blocks: padded
    (with a hole and trailing padding) and packed (next to short and empty sequences)."""
    n = 2100
    q, k, v = (torch.randn(2, 1, n, 16, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    m = torch.zeros(2, n, dtype=torch.bool, device=device)
    m[0, 300:700] = True
    m[1, 1500:] = True
    g = torch.randn_like(q)
    (pq, pk, pv), cu = packed((n, 5, 0, 130), 1, 16, dtype, device)
    with lotus_kernels.use_backend(backend):
        out, sc = attention(q, k, v, key_padding_mask=m, return_scores=mode)
        grads = torch.autograd.grad(out, (q, k, v), g)
        pout, psc = attention(pq, pk, pv, cu_seqlens=cu, return_scores=mode)
    f32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref, ref_sc = attention_reference(*f32, key_padding_mask=m, return_scores=mode)
    ref_grads = torch.autograd.grad(ref, f32, g.float())
    pref, pref_sc = attention_reference_varlen(pq.float(), pk.float(), pv.float(), cu, return_scores=mode)
    tol, score_tol = TOL[dtype], dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(out.float(), ref, **tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want, **tol)
    torch.testing.assert_close(sc, ref_sc, **score_tol)
    torch.testing.assert_close(pout.float(), pref.detach(), **tol)
    torch.testing.assert_close(psc, pref_sc, **score_tol)


@pytest.mark.parametrize("backend,device", TRITON, ids=[f"{b}-{d}" for b, d in TRITON])
@pytest.mark.parametrize("varlen", [False, True])
def test_triton_fp64_products_by_hand(backend, device, varlen, monkeypatch):
    # On a GPU the Triton kernels compute fp64 products by broadcasting (Triton's fp64 MMA lowering
    # rejects their register operands); the same path forced under the interpreter, against SDPA.
    from lotus_kernels.triton import attention as triton_attention

    monkeypatch.setattr(triton_attention, "FP64_BY_HAND", True)
    if varlen:
        (q, k, v), cu = packed((9, 0, 20), H, 24, torch.float64, device)
        kw, ref_fn = dict(cu_seqlens=cu), lambda *a: attention_reference_varlen(*a, cu)
    else:
        q, k, v = qkv(20, 24, torch.float64, device)
        m = make_mask("lengths", 20, device)
        kw, ref_fn = dict(key_padding_mask=m), lambda *a: attention_reference(*a, key_padding_mask=m)
    g = torch.randn_like(q)
    with lotus_kernels.use_backend(backend):
        out = attention(q, k, v, **kw)
        grads = torch.autograd.grad(out, (q, k, v), g)
    ref_in = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = ref_fn(*ref_in)
    for got, want in zip((out, *grads), (ref, *torch.autograd.grad(ref, ref_in, g))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- Triton class-token scores: the sink in the kernel
# The score kernel applies the sink rule itself (no PyTorch op after it). Against the reference
# definition (explicit softmax + apply_sink / apply_sink_varlen): every dtype, sink "mean" and None,
# padded keys incl. a padded key 0, a fully padded image and an image whose only key is key 0; packed
# with empty, lone-token and longer sequences, int64 and int32 offsets; CLS_BLOCK = 16 so one program
# walks several key blocks (the sink's sum crosses blocks). Outputs are poisoned (conftest).
def cls_mask(kind, n):
    m = torch.zeros(B, n, dtype=torch.bool)
    if kind == "empty":  # image 1 fully padded, image 0 with a hole
        m[1] = True
        m[0, 5:11] = True
    elif kind == "key0":  # image 0: key 0 and a tail padded; image 1: key 0 its only key
        m[0, 0] = True
        m[0, 2 * n // 3 :] = True
        m[1, 1:] = True
    return None if kind is None else m


@pytest.mark.parametrize("backend,device", TRITON, ids=[f"{b}-{d}" for b, d in TRITON])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", [None, "empty", "key0"])
def test_triton_cls_scores_fold_the_sink(backend, device, dtype, mask, monkeypatch):
    from lotus_kernels.triton import attention as triton_attention

    monkeypatch.setattr(triton_attention, "CLS_BLOCK", 16)
    n = 37
    q, k, v = qkv(n, 16, dtype, device)
    m = cls_mask(mask, n)
    m = None if m is None else m.to(device)
    ref_in = [t.detach().float() for t in (q, k, v)]
    for sink in ("mean", None):
        with lotus_kernels.use_backend(backend):
            out, sc = attention(q, k, v, key_padding_mask=m, return_scores="cls", sink=sink)
        want_out, want = attention_reference(*ref_in, key_padding_mask=m, return_scores="cls", sink=sink)
        assert sc.dtype == torch.float32 and sc.shape == (B, n) and not sc.requires_grad and out.requires_grad
        torch.testing.assert_close(sc, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.float(), want_out, **TOL[dtype])
        if m is not None:
            assert (sc[m] == 0).all()
    if mask == "key0":  # the lone key 0 scores 1 raw, 0 after the sink rule (no other key to average)
        assert sc[1, 0] == 1 and (sc[1, 1:] == 0).all()


TRITON_CLS_VARLEN = [(0, 37, 1, 0, 20), (1,), (40, 0)]


@pytest.mark.parametrize("backend,device", TRITON, ids=[f"{b}-{d}" for b, d in TRITON])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lens", TRITON_CLS_VARLEN, ids=["-".join(map(str, x)) for x in TRITON_CLS_VARLEN])
def test_triton_varlen_cls_scores_fold_the_sink(backend, device, dtype, lens, monkeypatch):
    from lotus_kernels.triton import attention as triton_attention

    monkeypatch.setattr(triton_attention, "CLS_BLOCK", 16)
    (q, k, v), cu = packed(lens, H, 16, dtype, device)
    ref_in = [t.detach().float() for t in (q, k, v)]
    for sink, offsets in (("mean", cu), (None, cu), ("mean", cu.int())):
        with lotus_kernels.use_backend(backend):
            out, sc = attention(q, k, v, cu_seqlens=offsets, return_scores="cls", sink=sink)
        want_out, want = attention_reference_varlen(*ref_in, cu, return_scores="cls", sink=sink)
        assert sc.dtype == torch.float32 and sc.shape == (q.shape[0],) and not sc.requires_grad
        torch.testing.assert_close(sc, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.float(), want_out, **TOL[dtype])


@pytest.mark.parametrize("backend,device", TRITON, ids=[f"{b}-{d}" for b, d in TRITON])
def test_triton_received_scores_keep_the_sink_and_int32_offsets_backward(backend, device):
    # "received" applies the sink in PyTorch after the kernel; int32 offsets also reach the Triton
    # backward as they are.
    q, k, v = qkv(20, 16, torch.float32, device, grad=False)
    m = make_mask("lengths", 20, device)
    (pq, pk, pv), cu = packed((7, 0, 12), H, 16, torch.float32, device)
    g = torch.randn_like(pq)
    with lotus_kernels.use_backend(backend):
        _, sc = attention(q, k, v, key_padding_mask=m, return_scores="received")
        out = attention(pq, pk, pv, cu_seqlens=cu.int())
        grads = torch.autograd.grad(out, (pq, pk, pv), g)
    torch.testing.assert_close(
        sc, attention_reference(q, k, v, key_padding_mask=m, return_scores="received")[1], rtol=1e-5, atol=1e-6
    )
    ref_in = [t.detach().requires_grad_() for t in (pq, pk, pv)]
    ref = attention_reference_varlen(*ref_in, cu)
    for got, want in zip(grads, torch.autograd.grad(ref, ref_in, g)):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


LAUNCH_CASES = [
    ("padded", None),
    ("padded", "lengths"),
    ("padded-sink-None", None),
    ("varlen", None),
    ("varlen-int32", None),
    ("varlen-device-checks", None),
]


@pytest.mark.parametrize("backend,device", TRITON, ids=[f"{b}-{d}" for b, d in TRITON])
@pytest.mark.parametrize("case,mask", LAUNCH_CASES, ids=[f"{c}-{m}" for c, m in LAUNCH_CASES])
def test_triton_cls_forward_is_two_kernels_and_no_pytorch_launch(backend, device, case, mask, monkeypatch):
    """The Triton path of attention(return_scores="cls") launches the forward kernel and the score kernel
    and nothing else: no PyTorch op that would be a GPU kernel (sink, casts, copies), only its four
    output allocations. The varlen device-side offset check adds one kernel and the assert."""
    from lotus_kernels import _checks

    from .._launches import launches

    monkeypatch.setenv("LOTUS_KERNELS_POISON", "0")  # the poison fills are test-only launches
    kw = dict(return_scores="cls", sink=None if "None" in case else "mean")
    if case.startswith("padded"):
        q, k, v = qkv(20, 16, torch.bfloat16, device)
        kw["key_padding_mask"] = make_mask(mask, 20, device)
    else:
        (q, k, v), cu = packed((7, 0, 12), H, 16, torch.bfloat16, device)
        kw.update(cu_seqlens=cu.int() if "int32" in case else cu, max_seqlen=12)
    if case == "varlen-device-checks":  # the GPU path of the offset check, forced on the CPU
        monkeypatch.setattr(_checks, "host_reads_are_free", lambda d: False)
    with lotus_kernels.use_backend(backend):
        attention(q, k, v, **kw)  # warm-up (compilation on a GPU)
        with launches() as rec:
            out, sc = attention(q, k, v, **kw)
    checks = ["_cu_seqlens_ok_kernel"] if case == "varlen-device-checks" else []
    assert rec.triton == [*checks, "_attention_fwd_kernel", "_cls_scores_kernel"]
    assert rec.kernels == (["aten._assert_async"] if checks else [])
    assert len(rec.allocations) == 4 + len(checks)  # out, lse, scores, s0 (+ the check's flag); views are free
    assert out.requires_grad and not sc.requires_grad


# ---------------------------------------------------------------- the "sdpa" path: SDPA output + cls-row kernel
# Every kernel backend that has a cls-row kernel here (Triton interpreted on the CPU, the CPU backend's
# PyTorch ops; on a GPU the Triton kernels), every dtype, padded keys incl. key 0 and a fully padded image,
# both sink rules; the key blocks capped at 16 so that N = 37 walks three of them (N = 9: one).
SDPA = [(b, d) for b, d in BACKENDS if b in ("triton", "cpu")]
SDPA_IDS = [f"{b}-{d}" for b, d in SDPA]


@pytest.mark.parametrize("backend,device", SDPA, ids=SDPA_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mask,n", [(None, 37), ("empty", 37), ("key0", 9)])
def test_sdpa_path_matches_reference(backend, device, dtype, mask, n, monkeypatch):
    from lotus_kernels.triton import attention as triton_attention

    monkeypatch.setenv(attention_ops.ENV_PATH, "sdpa")
    monkeypatch.setattr(triton_attention, "CLS_ROW_BLOCK", 16)
    monkeypatch.setattr(triton_attention, "CLS_BLOCK", 16)
    q, k, v = qkv(n, 16, dtype, device)
    m = cls_mask(mask, n)
    m = None if m is None else m.to(device)
    g = torch.randn_like(q)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    for sink in ("mean", None):
        with lotus_kernels.use_backend(backend):
            out, sc = attention(q, k, v, key_padding_mask=m, return_scores="cls", sink=sink)
        want_out, want = attention_reference(*ref_in, key_padding_mask=m, return_scores="cls", sink=sink)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert sc.dtype == acc and sc.shape == (B, n) and not sc.requires_grad and out.requires_grad
        torch.testing.assert_close(sc.double(), want, rtol=1e-5, atol=1e-6 if dtype != torch.float64 else 1e-12)
        torch.testing.assert_close(
            out.double(),
            want_out.detach(),
            **{**TOL.get(dtype, {}), **(dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else {})},
        )
        if m is not None:
            assert (sc[m] == 0).all()
        if mask == "key0":  # the lone key 0 scores 1 raw, 0 after the sink rule (no other key to average)
            assert sc[1, 0] == (0 if sink else 1) and (sc[1, 1:] == 0).all()
    if dtype in (torch.float32, torch.float64):  # the output's backward is SDPA's: against the reference
        got = torch.autograd.grad(out, (q, k, v), g)
        want_g = torch.autograd.grad(want_out, ref_in, g.double())
        for a, e in zip(got, want_g):
            torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5)
            if mask == "empty":  # a fully padded image: zero gradients
                assert (a[1] == 0).all()


def _varlen_stand_in(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None):
    """CPU stand-in for torch.nn.attention.varlen.varlen_attn (flash, CUDA only): the per-sequence reference."""
    assert cu_q.dtype == torch.int32 and cu_q is cu_k and max_q == max_k
    assert max_q >= int(cu_q.diff().max()) if cu_q.numel() > 1 else True
    return attention_reference_varlen(q, k, v, cu_q.long(), scale=scale)


TRITON_SDPA = [(b, d) for b, d in SDPA if b == "triton"]


@pytest.mark.parametrize("backend,device", TRITON_SDPA, ids=[f"{b}-{d}" for b, d in TRITON_SDPA])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lens", [(0, 37, 1, 0, 20), (1,), (9, 0)], ids=["0-37-1-0-20", "1", "9-0"])
def test_sdpa_path_varlen_cls_scores(backend, device, dtype, lens, monkeypatch):
    # The packed layout of the cls-row kernel (offsets read as given: int64 and int32; empty and lone
    # sequences; several key blocks and one), with varlen_attn replaced by the reference off CUDA.
    from lotus_kernels.triton import attention as triton_attention

    monkeypatch.setenv(attention_ops.ENV_PATH, "sdpa")
    monkeypatch.setattr(triton_attention, "CLS_ROW_BLOCK", 16)
    monkeypatch.setattr(triton_attention, "CLS_BLOCK", 16)
    if device == "cpu":
        monkeypatch.setattr(attention_ops, "VARLEN_SDPA", _varlen_stand_in)
        monkeypatch.setattr(attention_ops, "_varlen_sdpa_ok", lambda device_type, dtype: True)
    (q, k, v), cu = packed(lens, H, 16, dtype, device)
    ref_in = [t.detach().float() for t in (q, k, v)]
    for sink, offsets in (("mean", cu), (None, cu), ("mean", cu.int())):
        with lotus_kernels.use_backend(backend):
            out, sc = attention(q, k, v, cu_seqlens=offsets, return_scores="cls", sink=sink)
        want_out, want = attention_reference_varlen(*ref_in, cu, return_scores="cls", sink=sink)
        assert sc.dtype == torch.float32 and sc.shape == (q.shape[0],) and not sc.requires_grad
        torch.testing.assert_close(sc, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.float(), want_out, **TOL[dtype])


@pytest.mark.parametrize("backend,device", TRITON_SDPA, ids=[f"{b}-{d}" for b, d in TRITON_SDPA])
def test_sdpa_path_launches_one_score_kernel_and_received_keeps_the_fused_kernel(backend, device, monkeypatch):
    from .._launches import launches

    monkeypatch.setenv(attention_ops.ENV_PATH, "sdpa")
    monkeypatch.setenv("LOTUS_KERNELS_POISON", "0")
    q, k, v = qkv(20, 16, torch.bfloat16, device)
    with lotus_kernels.use_backend(backend):
        attention(q, k, v, return_scores="cls")  # warm-up (compilation on a GPU)
        with launches() as rec:
            out, sc = attention(q, k, v, return_scores="cls")
        # the output: SDPA's kernels (aten ops); the scores: two Triton kernels
        assert rec.triton == ["_cls_row_kernel", "_cls_scores_kernel"]
        with launches() as rec:
            attention(q, k, v, return_scores="received")
        assert rec.triton == ["_attention_fwd_kernel"]
        with launches() as rec:
            attention(q, k, v)
        assert rec.triton == []


def test_attention_path_setting():
    q = torch.randn(2, 3, 5, 8)
    assert attention_ops._path(q, "cpu", 1, False) == "fused"  # the autouse fixture pins it
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(attention_ops.ENV_PATH)
        assert attention_ops._path(q, "cpu", 1, False) == attention_ops.DEFAULT_PATH["cpu"]
        assert attention_ops.DEFAULT_PATH["cuda"] == "sdpa"
        mp.setenv(attention_ops.ENV_PATH, "sdpa")
        assert attention_ops._path(q, "cpu", 1, False) == "sdpa"
        assert attention_ops._path(q, "cpu", 2, False) == "fused"  # "received" needs every query's lse
        assert attention_ops._path(q, "reference", 1, False) == "fused"
        assert attention_ops._path(q[0], "cpu", 1, True) == "fused"  # no varlen SDPA for CPU tensors
        mp.setenv(attention_ops.ENV_PATH, "flash")
        with pytest.raises(ValueError, match="LOTUS_KERNELS_ATTENTION_PATH: expected one of sdpa, fused"):
            attention(q, q, q)


def test_sdpa_path_compiles_to_one_graph(monkeypatch):
    monkeypatch.setenv(attention_ops.ENV_PATH, "sdpa")
    q, k, v = qkv(9, 8, torch.float32, "cpu", grad=False)
    m = cls_mask("key0", 9)
    f = torch.compile(
        lambda a, b, c: attention(a, b, c, key_padding_mask=m, return_scores="cls"), fullgraph=True, backend="eager"
    )
    out, sc = f(q, k, v)
    want_out, want_sc = attention_reference(q, k, v, key_padding_mask=m, return_scores="cls")
    torch.testing.assert_close(out, want_out, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(sc, want_sc, rtol=1e-5, atol=1e-6)

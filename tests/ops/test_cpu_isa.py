"""Every ISA variant of the CPU kernels against the reference, each forced with LOTUS_KERNELS_CPU_ISA.

A variant this CPU cannot run is a skip whose reason names the missing ISA (pytest -ra prints it),
never a silent pass.
"""

import pytest
import torch

import lotus_kernels as lk
from lotus_kernels import use_backend
from lotus_kernels.isa import CPU_ISAS, ENV_CPU_ISA
from lotus_kernels.ops import block_sparse_linear, bsr_from_dense, bsr_to_dense

pytestmark = pytest.mark.skipif(not lk.backends()["cpu"], reason="the C++ CPU kernels are not built")

SUPPORTED = lk.cpu_isas() if lk.backends()["cpu"] else ()


@pytest.fixture(params=CPU_ISAS)
def isa(request, monkeypatch):
    """Forces one ISA level for the test (skipped, naming the ISA, where this CPU lacks it)."""
    name = request.param
    if name not in SUPPORTED:
        pytest.skip(
            f"this CPU cannot run {name} (its best is {lk.cpu_isa(capped=False)}): "
            f"the {name} kernels are untested on this machine"
        )
    monkeypatch.setenv(ENV_CPU_ISA, name)
    return name


# What each forced level runs: fp32 / bf16 have native variants, fp16 runs the fp32 one on copies.
def expected_path(isa: str, dtype: torch.dtype, block_size: int = 32) -> str:
    if dtype == torch.float64 or isa == "default":
        return "default" + (" (fp32 copies)" if dtype in (torch.bfloat16, torch.float16) else "")
    if dtype == torch.bfloat16 and isa == "avx512_bf16":
        return "avx512_bf16"
    fp32 = "avx512" if isa == "avx512_bf16" else isa
    return fp32 + (" (fp32 copies)" if dtype != torch.float32 else "")


BSR_OPS = ("block_sparse_linear.fwd", "block_sparse_linear.bwd_input", "block_sparse_linear.bwd_weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kernel_path_follows_the_cap(isa, dtype):
    assert lk.cpu_isa() == isa
    for op in BSR_OPS:
        for bs in (16, 32, 64):
            assert lk.cpu_kernel_path(op, dtype, bs) == expected_path(isa, dtype, bs), (op, bs)


def test_cap_above_the_cpu_is_clamped_and_bad_values_are_errors(monkeypatch):
    best = lk.cpu_isa(capped=False)
    monkeypatch.setenv(ENV_CPU_ISA, "avx512_bf16")
    assert lk.cpu_isa() == best
    monkeypatch.setenv(ENV_CPU_ISA, "")
    assert lk.cpu_isa() == best
    monkeypatch.setenv(ENV_CPU_ISA, "avx3")
    with pytest.raises(RuntimeError, match=f"{ENV_CPU_ISA}: expected one of default, avx2, avx512, avx512_bf16"):
        lk.cpu_isa()
    fmt = bsr_from_dense(torch.randn(32, 32), torch.ones(1, 1, dtype=torch.bool), 32)
    with pytest.raises(RuntimeError, match=f"{ENV_CPU_ISA}: expected one of"):
        block_sparse_linear(torch.randn(2, 32), *fmt)
    with pytest.raises(RuntimeError, match="cpu_kernel_path: op: expected one of .*block_sparse_linear.fwd"):
        lk.cpu_kernel_path("no_such_op")


# ---------------------------------------------------------------- block_sparse_linear per ISA
CASES = [  # (M, out, in, bs, density, empty row / column): tiles with partial panels, every block size,
    (37, 160, 96, 32, 0.4, True),  # empty output block rows and input block columns, odd M
    (1, 64, 128, 16, 0.6, False),
    (29, 128, 192, 64, 0.8, True),
    (130, 96, 768, 32, 0.7, False),  # fp32: K cut into two ranges (fwd); bf16: lists longer than a group
    (67, 1536, 64, 32, 0.5, False),  # bwd_input K = 1536: two ranges for bf16 too
    (8, 64, 96, 32, 0.0, False),  # nothing stored
]


def _case(M, out_f, in_f, bs, density, empty, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out_f // bs, in_f // bs, generator=g) < density
    if empty and mask.numel() > 1:
        mask[0] = False
        mask[:, -1] = False
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    x = torch.randn(M, in_f, generator=g)
    dy = torch.randn(M, out_f, generator=g)
    bias = torch.randn(out_f, generator=g)
    return bsr_from_dense(w, mask, bs), mask, x, dy, bias


def _scale(t):
    return float(t.detach().abs().max()) if t.numel() else 0.0


def _run(fmt, x, dy, bias, dtype, backend):
    xs = x.to(dtype).requires_grad_()
    vs = fmt[0].to(dtype).requires_grad_()
    bs = bias.to(dtype).requires_grad_()
    with use_backend(backend):
        y = block_sparse_linear(xs, vs, *fmt[1:], bs)
        y.backward(dy.to(dtype))
    return y.detach(), xs.grad, vs.grad, bs.grad  # dbias: summed while bwd_input packs dy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,out_f,in_f,bs,density,empty", CASES)
def test_block_sparse_linear_matches_the_reference(isa, dtype, M, out_f, in_f, bs, density, empty):
    fmt, mask, x, dy, bias = _case(M, out_f, in_f, bs, density, empty)
    got = _run(fmt, x, dy, bias, dtype, "cpu")
    # Independent ground truth: float64 products of the same (rounded) inputs through a dense weight.
    xd, dyd, bd = x.to(dtype).double(), dy.to(dtype).double(), bias.to(dtype).double()
    w = bsr_to_dense(fmt[0].to(dtype).double(), fmt[1], fmt[2], in_f)
    want_dw = dyd.t() @ xd
    want = (xd @ w.t() + bd, dyd @ w, bsr_from_dense(want_dw, mask, bs)[0], dyd.sum(0))
    # fp32 sums; bf16 / fp16 round each output once (2^-9 / 2^-12 relative).
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    for g, w_, name in zip(got, want, ("y", "dx", "dvalues", "dbias")):
        assert g.dtype == dtype and g.shape == w_.shape, name
        assert not g.isnan().any(), f"{name}: an output element was never written (poisoned NaN left)"
        torch.testing.assert_close(
            g.double(), w_, rtol=rtol, atol=rtol * 0.1 * (1 + _scale(w_)), msg=lambda m: f"{isa} {name}: {m}"
        )
    # and the registered reference op agrees at the dtype's own tolerance
    ref = _run(fmt, x, dy, bias, dtype, "reference")
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r.double(), rtol=2 * rtol, atol=2 * rtol * (1 + _scale(r)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_sparse_linear_two_threads(isa, dtype):
    """Several M chunks per thread (fwd / bwd_input) and block rows split by stored blocks (bwd_weight)."""
    fmt, mask, x, dy, bias = _case(301, 192, 160, 32, 0.5, True, seed=1)
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = _run(fmt, x, dy, bias, dtype, "cpu")
    finally:
        torch.set_num_threads(prev)
    ref = _run(fmt, x, dy, bias, dtype, "reference")
    tol = 1e-5 if dtype == torch.float32 else 2**-6
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r.double(), rtol=tol, atol=tol * (1 + _scale(r)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,out_f,in_f,bs,density,empty", CASES)
def test_fp32_input_under_autocast_per_isa(isa, dtype, M, out_f, in_f, bs, density, empty):
    """A mixed call (x fp32, values bf16 / fp16 under autocast) per ISA level: the avx512_bf16 kernels
    round x while packing it (fwd, bwd_weight) and write dx in fp32; every other path casts inside.
    y, dvalues, dbias equal the cast-then-kernel call bit for bit; dx is fp32, within fp32-sum
    tolerance of float64 truth where the kernel writes it natively, else equal to the cast one."""
    fmt, mask, x, dy, bias = _case(M, out_f, in_f, bs, density, empty)
    dyl = dy.to(dtype)

    def run(cast_first):
        xs = x.clone().requires_grad_()
        vs = fmt[0].to(dtype).requires_grad_()
        b = bias.to(dtype).requires_grad_()
        with use_backend("cpu"), torch.autocast("cpu", dtype=dtype):
            y = block_sparse_linear(xs.to(dtype) if cast_first else xs, vs, *fmt[1:], b)
        y.backward(dyl)
        return y.detach(), xs.grad, vs.grad, b.grad

    got, cast = run(False), run(True)
    assert got[1].dtype == torch.float32 and got[0].dtype == got[2].dtype == got[3].dtype == dtype
    for g, c, name in zip(got, cast, ("y", "dx", "dvalues", "dbias")):
        assert not g.isnan().any(), f"{name}: an output element was never written (poisoned NaN left)"
        if name != "dx":
            assert torch.equal(g, c), f"{isa} {name}: differs from cast-then-kernel"
    native = isa == "avx512_bf16" and dtype == torch.bfloat16
    want_dx = dyl.double() @ bsr_to_dense(fmt[0].to(dtype).double(), fmt[1], fmt[2], in_f)
    if native:  # fp32 sums, not rounded to bf16
        torch.testing.assert_close(
            got[1].double(), want_dx, rtol=1e-5, atol=1e-6 * (1 + _scale(want_dx)), msg=lambda m: f"{isa} dx: {m}"
        )
        if fmt[0].numel():  # the fp32 dx really came from the kernel, not from a bf16 result cast back
            assert not torch.equal(got[1], cast[1])
    else:
        assert torch.equal(got[1], cast[1]), f"{isa} dx: differs from the cast-then-kernel dx"


def test_fp32_input_under_autocast_two_threads(isa):
    """The mixed call's fp32 packers / fp32 dx stores with several M chunks per thread."""
    fmt, mask, x, dy, bias = _case(301, 192, 160, 32, 0.5, True, seed=1)

    def run(backend, cast_first):
        xs = x.clone().requires_grad_()
        vs = fmt[0].bfloat16().requires_grad_()
        b = bias.bfloat16().requires_grad_()
        with use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
            y = block_sparse_linear(xs.bfloat16() if cast_first else xs, vs, *fmt[1:], b)
        y.backward(dy.bfloat16())
        return y.detach(), xs.grad, vs.grad, b.grad

    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got, cast = run("cpu", False), run("cpu", True)
    finally:
        torch.set_num_threads(prev)
    assert got[1].dtype == torch.float32
    for i in (0, 2, 3):
        assert torch.equal(got[i], cast[i])
    ref = run("reference", False)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r.double(), rtol=2**-6, atol=2**-6 * (1 + _scale(r)))


# ---------------------------------------------------------------- attention's softmax / score passes per ISA
@pytest.mark.parametrize(
    "n,mode,dtype", [(37, "cls", torch.float32), (70, "received", torch.float32), (45, "cls", torch.bfloat16)]
)
def test_attention_matches_the_reference(isa, n, mode, dtype):
    """Row max / exp / row sum of each ISA (the blocked path above 2048 keys calls the same three),
    a padding mask with a hole, both score kinds, forward and backward."""
    from lotus_kernels.ops.attention import attention_reference

    assert lk.cpu_kernel_path("attention", dtype) == (
        "default" if isa == "default" else "avx2" if isa == "avx2" else "avx512"
    )
    g = torch.Generator().manual_seed(n)
    b, h, d = 2, 2, 32
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype).requires_grad_() for _ in range(3))
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[0, n // 3 : n // 3 + 5] = True  # a hole: -inf scores inside the row
    mask[-1, -7:] = True
    dout = torch.randn(b, h, n, d, generator=g).to(dtype)
    with use_backend("cpu"):
        out, scores = lk.ops.attention(q, k, v, key_padding_mask=mask, return_scores=mode)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want, want_scores = attention_reference(q64, k64, v64, key_padding_mask=mask, return_scores=mode)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), dout.double())
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.double(), want.detach(), **tol)
    torch.testing.assert_close(scores.double(), want_scores.detach(), **tol)
    for got, w in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), w, **tol)


# ---------------------------------------------------------------- masked weight-gradient pass per ISA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_masked_fill_grad_zeroes_exactly_the_pruned_entries(isa, dtype):
    assert lk.cpu_kernel_path("masked_weight_grad", dtype) == ("avx512" if isa == "avx512_bf16" else isa)
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(67, 131, generator=g).to(dtype)  # odd sizes: vector loop + tail
    grad[3, :5] = float("nan")
    grad[5, :5] = float("inf")
    mask = torch.rand(67, 131, generator=g) > 0.3
    want = torch.where(mask, grad, torch.zeros((), dtype=dtype))
    got = grad.clone()
    lk.backends()
    torch.ops.lotus_kernels_C.masked_fill_grad_(got, mask)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))
    assert not torch.signbit(got[~mask]).any()  # +0.0, not -0.0

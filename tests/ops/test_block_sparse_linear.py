import pytest
import torch

from lotus_kernels import use_backend
from lotus_kernels.ops import block_sparse_linear, bsr_from_dense, bsr_to_dense
from lotus_kernels.ops.block_sparse_linear import bsr_indices
from tests.conftest import backends_for, tolerance

KERNELS = backends_for("block_sparse_linear")
KERNEL_IDS = [f"{b}-{d}" for b, d in KERNELS]


def block_mask(out_f, in_f, bs, density, empty_row=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(out_f // bs, in_f // bs, generator=g) < density
    if density >= 1:
        m[:] = True
    if empty_row:
        m[0] = False
    return m


def make(out_f, in_f, bs, density, dtype=torch.float32, device="cpu", empty_row=False, bias=True):
    w = torch.randn(out_f, in_f, dtype=dtype)
    fmt = bsr_from_dense(w, block_mask(out_f, in_f, bs, density, empty_row), bs)
    fmt = [t.to(device) for t in fmt]
    b = torch.randn(out_f, dtype=dtype, device=device) if bias else None
    return fmt, b


def dense_weight(fmt, in_f):
    values, crow, col = fmt[:3]
    return bsr_to_dense(values, crow, col, in_f)


# ---------------------------------------------------------------- the format helpers
def test_bsr_from_dense_layout_and_round_trip():
    bs = 16
    w = torch.randn(48, 96)
    mask = block_mask(48, 96, bs, 0.5, empty_row=True)
    values, crow, col, ccol, row, perm = bsr_from_dense(w, mask, bs)
    assert values.shape == (int(mask.sum()), bs, bs)
    for r in range(3):
        cols = col[crow[r] : crow[r + 1]]
        assert cols.tolist() == mask[r].nonzero().flatten().tolist()
        for k in range(int(crow[r]), int(crow[r + 1])):
            c = int(col[k])
            assert torch.equal(values[k], w[r * bs : (r + 1) * bs, c * bs : (c + 1) * bs])
    for c in range(6):
        ts = range(int(ccol[c]), int(ccol[c + 1]))
        assert [int(row[t]) for t in ts] == mask[:, c].nonzero().flatten().tolist()
        assert all(int(col[perm[t]]) == c for t in ts)
    want = (w.view(3, bs, 6, bs) * mask[:, None, :, None]).view(48, 96)
    assert torch.equal(bsr_to_dense(values, crow, col, 96), want)


def test_bsr_indices_of_an_empty_mask():
    crow, col, ccol, row, perm = bsr_indices(torch.zeros(2, 3, dtype=torch.bool))
    assert (
        crow.tolist() == [0, 0, 0] and ccol.tolist() == [0, 0, 0, 0] and col.numel() == row.numel() == perm.numel() == 0
    )


# ---------------------------------------------------------------- kernels vs the reference
SHAPES = [  # (M leading dims, out, in, bs, density, empty_row)
    ((5,), 48, 96, 16, 0.5, False),
    ((7,), 64, 32, 32, 1.0, False),
    ((1,), 64, 128, 32, 0.5, True),
    ((2, 13), 96, 64, 32, 0.5, True),
    ((0,), 64, 64, 32, 0.5, False),
    ((3, 0, 4), 32, 64, 16, 1.0, False),
    ((9,), 128, 128, 64, 0.5, False),
    ((11,), 128, 64, 16, 0.1, True),
    ((6,), 64, 96, 32, 0.0, False),  # nnzb == 0
    ((37,), 160, 96, 32, 0.3, False),
]


@pytest.mark.parametrize("backend,device", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("lead,out_f,in_f,bs,density,empty_row", SHAPES)
def test_forward_and_backward_match_reference(backend, device, dtype, lead, out_f, in_f, bs, density, empty_row):
    fmt, bias = make(out_f, in_f, bs, density, dtype, device, empty_row)
    x = torch.randn(*lead, in_f, dtype=dtype, device=device)
    dy = torch.randn(*lead, out_f, dtype=dtype, device=device)

    def run(b):
        xs = x.clone().requires_grad_()
        vs = fmt[0].clone().requires_grad_()
        bb = bias.clone().requires_grad_()
        with use_backend(b):
            y = block_sparse_linear(xs, vs, *fmt[1:], bb)
            y.backward(dy)
        return y, xs.grad, vs.grad, bb.grad

    got, want = run(backend), run("reference")
    tol = tolerance(dtype)
    if dtype == torch.bfloat16:  # both round a K-long fp32 sum once to bf16, the reference per GEMM
        tol = dict(rtol=3e-2, atol=6e-2)
    if dtype == torch.float16:  # the same, with fp16's 3 more mantissa bits
        tol = dict(rtol=5e-3, atol=1e-2)
    for g, w, name in zip(got, want, ("y", "dx", "dvalues", "dbias")):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{name}: {m}")
    # Independent of the reference op: densify and use F.linear directly.
    with torch.no_grad():
        dense = torch.nn.functional.linear(x.double(), dense_weight(fmt, in_f).double(), bias.double())
    torch.testing.assert_close(got[0].double(), dense, rtol=tol["rtol"], atol=tol["atol"] * 4)


@pytest.mark.parametrize("backend,device", KERNELS, ids=KERNEL_IDS)
def test_no_bias_and_noncontiguous_input(backend, device):
    fmt, _ = make(64, 96, 32, 0.5, device=device, bias=False)
    x = torch.randn(96, 10, device=device).t()  # non-contiguous [10, 96]
    with use_backend(backend):
        got = block_sparse_linear(x, *fmt)
    torch.testing.assert_close(got, x @ dense_weight(fmt, 96).t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", KERNELS, ids=KERNEL_IDS)
def test_larger_fp32_case_exercises_every_tile_path(backend, device):
    # M = 197 spans several 6-row panels plus a partial one, and more than one M chunk of bwd_weight.
    fmt, bias = make(192, 128, 32, 0.5, device=device, empty_row=True)
    x = torch.randn(197, 128, device=device, requires_grad=True)
    vs = fmt[0].clone().requires_grad_()
    with use_backend(backend):
        y = block_sparse_linear(x, vs, *fmt[1:], bias)
        y.square().sum().backward()
    w = dense_weight(fmt, 128).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y2 = torch.nn.functional.linear(x2, w, bias)
    y2.square().sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-3)
    want_dv = bsr_from_dense(w.grad, block_mask(192, 128, 32, 0.5, True), 32)[0]
    torch.testing.assert_close(vs.grad, want_dv, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", ["reference"] + [b for b, d in KERNELS if d == "cpu"])
def test_gradcheck_and_gradgradcheck_float64(backend):
    # Block row 0 empty, row 1 with one of two blocks; fast mode keeps it to a few seconds.
    bm = torch.tensor([[False, False], [False, True]])
    fmt = bsr_from_dense(torch.randn(32, 32, dtype=torch.float64), bm, 16)
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    values = fmt[0].clone().requires_grad_()
    bias = torch.randn(32, dtype=torch.float64, requires_grad=True)

    def f(x, values, bias):
        return block_sparse_linear(x, values, *fmt[1:], bias)

    with use_backend(backend):
        assert torch.autograd.gradcheck(f, (x, values, bias), fast_mode=True)
        assert torch.autograd.gradgradcheck(f, (x, values, bias), fast_mode=True)


def test_opcheck():
    fmt, bias = make(32, 64, 16, 0.5)
    x = torch.randn(5, 64, requires_grad=True)
    values = fmt[0].clone().requires_grad_()
    torch.library.opcheck(torch.ops.lotus_kernels.block_sparse_linear.default, (x, values, *fmt[1:], bias))
    dy = torch.randn(5, 32, requires_grad=True)
    torch.library.opcheck(torch.ops.lotus_kernels.block_sparse_linear_bwd_input_bias.default, (dy, values, *fmt[1:]))


@pytest.mark.parametrize("backend,device", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bwd_input_bias_op_matches_its_parts(backend, device, dtype):
    """The fused (dx, dbias) op against the separate bwd_input op and dy.sum(0) in float64 (the CPU
    kernels sum dy while packing it: odd M leaves a partial panel, K = 1536 two ranges in bf16)."""
    fmt, _ = make(1536, 64, 32, 0.5, dtype, device, empty_row=True)
    dy = torch.randn(37, 1536, dtype=dtype, device=device)
    with use_backend(backend):
        dx, db = torch.ops.lotus_kernels.block_sparse_linear_bwd_input_bias(dy, *fmt)
        dx_alone = torch.ops.lotus_kernels.block_sparse_linear_bwd_input(dy, *fmt)
    assert dx.dtype == db.dtype == dtype and db.shape == (1536,)
    torch.testing.assert_close(dx, dx_alone, rtol=0, atol=0)  # the same kernel and summation order
    want = dy.double().sum(0)
    rtol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(db.double(), want, rtol=rtol, atol=rtol * (1 + float(want.abs().max())))


# ---------------------------------------------------------------- mixed dtypes: fp32 x under autocast
def _mixed_run(backend, x, fmt, bias, dy, dtype, device_type, cast_first):
    """Under autocast to ``dtype``: x fp32 passed as it is (the mixed call) or cast first (the
    cast-then-kernel path an fp32 x took before)."""
    xs = x.clone().requires_grad_()
    vs = fmt[0].clone().requires_grad_()
    bb = None if bias is None else bias.clone().requires_grad_()
    with use_backend(backend), torch.autocast(device_type, dtype=dtype):
        y = block_sparse_linear(xs.to(dtype) if cast_first else xs, vs, *fmt[1:], bb)
    y.backward(dy)
    return y, xs.grad, vs.grad, None if bb is None else bb.grad


@pytest.mark.parametrize("backend,device", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize(
    "lead,out_f,in_f,bs,density", [((37,), 160, 96, 32, 0.5), ((2, 7), 64, 128, 16, 0.6), ((5,), 64, 64, 32, 0.0)]
)
def test_fp32_input_under_autocast(backend, device, dtype, with_bias, lead, out_f, in_f, bs, density):
    """x fp32 under autocast stays fp32 (no cast node): y / dvalues / dbias in the autocast dtype, dx
    fp32; y, dvalues and dbias equal the cast-then-kernel call's bit for bit (x is rounded exactly as
    Tensor.to rounds it); dx is at least as close to float64 truth (the CPU bf16 kernels write it
    from their fp32 sums, one rounding fewer); all of it agrees with the reference backend."""
    fmt, bias = make(out_f, in_f, bs, density, torch.float32, device, bias=with_bias)
    fmt = [fmt[0].to(dtype)] + list(fmt[1:])
    bias = None if bias is None else bias.to(dtype)
    x = torch.randn(*lead, in_f, device=device)
    dy = torch.randn(*lead, out_f, device=device).to(dtype)
    dt = "cuda" if device == "cuda" else "cpu"
    got = _mixed_run(backend, x, fmt, bias, dy, dtype, dt, cast_first=False)
    cast = _mixed_run(backend, x, fmt, bias, dy, dtype, dt, cast_first=True)
    y, dx, dv, db = got
    assert y.dtype == dv.dtype == dtype and dx.dtype == torch.float32 and dx.shape == x.shape
    assert (db is None) == (bias is None) and (db is None or db.dtype == dtype)
    nodes = {type(n[0]).__name__ for n in y.grad_fn.next_functions if n[0] is not None}
    assert not any("ToCopy" in n for n in nodes), nodes  # x reaches the op without a cast node
    for g, c, name in zip(got, cast, ("y", "dx", "dvalues", "dbias")):
        if name != "dx" and g is not None:
            assert torch.equal(g, c), f"{name}: differs from cast-then-kernel"
    w = dense_weight([fmt[0].double()] + list(fmt[1:]), in_f)
    want_dx = dy.double() @ w
    err, err_cast = (float((d.double() - want_dx).abs().max()) if d.numel() else 0.0 for d in (dx, cast[1]))
    assert err <= err_cast, (err, err_cast)
    torch.testing.assert_close(dx.double(), want_dx, rtol=2**-7, atol=2**-7 * (1 + float(want_dx.abs().max())))
    ref = _mixed_run("reference", x, fmt, bias, dy, dtype, dt, cast_first=False)
    tol = dict(rtol=3e-2, atol=6e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=1e-2)
    for g, r, name in zip(got, ref, ("y", "dx", "dvalues", "dbias")):
        if g is not None:
            assert g.dtype == r.dtype, name
            torch.testing.assert_close(g, r, **tol, msg=lambda m: f"{name}: {m}")


def test_mixed_dtypes_outside_autocast_are_still_an_error():
    fmt, bias = make(32, 64, 16, 0.5)
    with pytest.raises(TypeError, match="values: expected dtype torch.float32 \\(like x\\)"):
        block_sparse_linear(torch.randn(4, 64), fmt[0].bfloat16(), *fmt[1:], bias.bfloat16())


@pytest.mark.parametrize("backend", ["reference"] + [b for b, d in KERNELS if d == "cpu"])
def test_mixed_call_double_backward(backend):
    """Second-order gradients through a mixed call (fp32 x, bf16 values): the backward ops take mixed
    dtypes too (dx fp32, dvalues bf16) and agree with the reference backend."""
    fmt, bias = make(64, 64, 16, 0.6)
    values = fmt[0].bfloat16().requires_grad_()
    b = bias.bfloat16().requires_grad_()
    x = torch.randn(9, 64, requires_grad=True)

    def run(be):
        with use_backend(be), torch.autocast("cpu", dtype=torch.bfloat16):
            y = block_sparse_linear(x, values, *fmt[1:], b)
        gx, gv = torch.autograd.grad(y.float().square().sum(), (x, values), create_graph=True)
        assert gx.dtype == torch.float32 and gv.dtype == torch.bfloat16
        return torch.autograd.grad(gx.square().sum() + gv.float().square().sum(), (x, values, b))

    for g, r in zip(run(backend), run("reference")):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g.float(), r.float(), rtol=5e-2, atol=5e-2 * (1 + float(r.float().abs().max())))


# ---------------------------------------------------------------- bad input
def _fmt():
    return make(32, 64, 16, 0.5)


def _bad(mutate):
    fmt, bias = _fmt()
    args = dict(
        x=torch.randn(4, 64), values=fmt[0], crow=fmt[1], col=fmt[2], ccol=fmt[3], row=fmt[4], perm=fmt[5], bias=bias
    )
    mutate(args)
    return lambda: block_sparse_linear(**args)


def _set(**kv):
    return lambda a: a.update({k: (v(a) if callable(v) else v) for k, v in kv.items()})


BAD = [
    (_set(x=torch.randn(4, 63)), ValueError, r"x: expected shape \[..., 64\]"),
    (_set(x=lambda a: a["x"].double()), TypeError, "values: expected dtype torch.float64 \\(like x\\)"),
    (_set(x=lambda a: a["x"].long()), TypeError, "x: expected dtype"),
    (_set(bias=torch.randn(31)), ValueError, r"bias: expected shape \(32,\)"),
    (_set(values=lambda a: a["values"][:, :, :8]), ValueError, r"values: expected shape \[nnzb, bs, bs\]"),
    (_set(values=lambda a: a["values"][:1]), ValueError, "col: expected 1 entries"),
    (_set(crow=lambda a: a["crow"].int()), TypeError, "crow: expected an int64 index tensor, got int32"),
    (_set(col=lambda a: a["col"].flip(0)), ValueError, "col: expected strictly increasing block columns"),
    (_set(col=lambda a: a["col"] + 10), IndexError, "col: index .* is out of range"),
    (_set(crow=lambda a: a["crow"] + 1), ValueError, "crow: expected non-decreasing pointers from 0"),
    (_set(ccol=lambda a: torch.cat([a["ccol"], a["ccol"][-1:]])), ValueError, r"x: expected shape \[..., 80\]"),
    (_set(perm=lambda a: a["perm"].flip(0)), ValueError, "perm / ccol / row: the BSC view does not describe"),
    (_set(row=lambda a: torch.zeros_like(a["row"])), ValueError, "row: expected strictly increasing block rows"),
]


@pytest.mark.parametrize("mutate,exc,match", BAD)
def test_bad_input_is_a_clear_error(mutate, exc, match):
    with pytest.raises(exc, match=match):
        _bad(mutate)()


def test_block_size_must_divide_the_weight():
    with pytest.raises(ValueError, match=r"block_size: 32 does not divide weight's shape \(48, 64\)"):
        bsr_from_dense(torch.randn(48, 64), torch.ones(1, 2, dtype=torch.bool), 32)
    with pytest.raises(ValueError, match="block_size: expected one of 16, 32, 64, got 8"):
        bsr_from_dense(torch.randn(48, 64), torch.ones(6, 8, dtype=torch.bool), 8)
    with pytest.raises(ValueError, match=r"block_mask: expected shape \(3, 4\)"):
        bsr_from_dense(torch.randn(48, 64), torch.ones(4, 3, dtype=torch.bool), 16)


def test_pattern_check_is_redone_after_an_in_place_change():
    fmt, bias = make(32, 64, 16, 0.5)
    x = torch.randn(4, 64)
    block_sparse_linear(x, *fmt, bias)  # checked and remembered
    block_sparse_linear(x, *fmt, bias)
    fmt[2].add_(10)  # col out of range now
    with pytest.raises(IndexError, match="col: index .* is out of range"):
        block_sparse_linear(x, *fmt, bias)

"""``block_sparse_linear``: a linear layer whose weight stores only some bs x bs blocks.

block_sparse_linear(x [..., in], values, crow, col, ccol, row, perm, bias [out]?) -> [..., out]
    y = x @ W.T + bias,  W [out, in] zero outside the stored blocks

Storage (all contiguous, index tensors int64 on the values' device), bs in {16, 32, 64} dividing
both out and in; R = out // bs block rows, Cb = in // bs block columns, nnzb stored blocks:
    values [nnzb, bs, bs]  values[k, i, j] = W[row_k * bs + i, col_k * bs + j]
    crow   [R + 1]         BSR row pointers: blocks crow[r]..crow[r+1]-1 are block row r, sorted by column
    col    [nnzb]          block column of each stored block
    ccol   [Cb + 1]        BSC pointers: for block column c, entries ccol[c]..ccol[c+1]-1 of
    row    [nnzb]          ... ``row`` (block row, ascending) and
    perm   [nnzb]          ... ``perm`` (index into ``values`` of that block)
A block row / column may be empty; nnzb may be 0. ``bsr_from_dense`` builds all six from a dense
weight and a block mask, ``bsr_to_dense`` reverses it.

Backward: dx = dy @ W over the stored blocks (BSC walk), dvalues only for the stored blocks (SDD),
dbias = sum of dy (with dx in one op: the CPU kernels sum dy while packing it). The products are
ops of their own whose backwards are each other, so the op has gradients of any order.

Mixed dtypes (autocast with an fp32 activation, e.g. a LayerNorm output under CPU bf16 autocast): x
stays fp32 while values / bias run in bf16 or fp16; the output and dvalues take values' dtype, dx
is fp32 like x. Every backend computes exactly x.to(values.dtype) through the kernel (the same
result as a cast before the op), without an autograd cast node: the CPU avx512_bf16 kernels round x
to bf16 while packing it and write dx in fp32 straight from their fp32 sums (one rounding fewer
than a bf16 dx cast back, so dx is *more* accurate: within the fp32 sums' error of the float64 dx,
not bf16's); every other path casts inside the op (x.to(values.dtype), dx computed in dy's dtype
then .to(float32)).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .. import _backend, _checks, _fx
from .._capabilities import capability

BLOCK_SIZES = (16, 32, 64)
# Which backends take mixed inputs / fuse the bias gradient: lotus_kernels/_capabilities.py.
_CAPS = capability("block_sparse_linear")
_MODULE = "block_sparse_linear"


# ---------------------------------------------------------------- format helpers
def check_block_size(block_size, out_features: int, in_features: int, where: str = "weight") -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size: expected one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size!r}")
    if out_features % block_size or in_features % block_size:
        raise ValueError(
            f"block_size: {block_size} does not divide {where}'s shape ({out_features}, {in_features}) "
            "(out_features and in_features must both be multiples of it; there is no padding)"
        )


def bsr_indices(block_mask: torch.Tensor):
    """(crow, col, ccol, row, perm) of a bool block mask [R, Cb] (True = stored)."""
    R, Cb = block_mask.shape
    dev = block_mask.device
    rr, cc = block_mask.nonzero(as_tuple=True)  # row-major: sorted by row, then column
    crow = torch.zeros(R + 1, dtype=torch.int64, device=dev)
    crow[1:] = torch.cumsum(block_mask.sum(1), 0)
    ccol = torch.zeros(Cb + 1, dtype=torch.int64, device=dev)
    ccol[1:] = torch.cumsum(block_mask.sum(0), 0)
    # Stable sort by column keeps rows ascending inside each column.
    perm = torch.sort(cc, stable=True).indices
    return crow, cc.contiguous(), ccol, rr[perm].contiguous(), perm.contiguous()


def bsr_from_dense(weight: torch.Tensor, block_mask: torch.Tensor, block_size: int):
    """(values, crow, col, ccol, row, perm) storing the blocks of ``weight`` [out, in] where the bool
    ``block_mask`` [out // bs, in // bs] is True (copied; entries outside them are dropped)."""
    _checks.tensor("weight", weight, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    out_f, in_f = weight.shape
    check_block_size(block_size, out_f, in_f)
    bs = block_size
    _checks.tensor("block_mask", block_mask, ndim=2)
    if block_mask.dtype != torch.bool:
        raise TypeError(
            f"block_mask: expected a bool tensor (True = keep), got {str(block_mask.dtype).replace('torch.', '')}"
        )
    if tuple(block_mask.shape) != (out_f // bs, in_f // bs):
        raise ValueError(
            f"block_mask: expected shape {(out_f // bs, in_f // bs)} (weight shape / block_size), "
            f"got {tuple(block_mask.shape)}"
        )
    block_mask = block_mask.to(weight.device)
    crow, col, ccol, row, perm = bsr_indices(block_mask)
    blocks = weight.detach().reshape(out_f // bs, bs, in_f // bs, bs).transpose(1, 2)
    values = blocks[block_mask].contiguous()  # row-major over (R, Cb): the BSR order
    return values, crow, col, ccol, row, perm


def block_rows(crow: torch.Tensor) -> torch.Tensor:
    """Block row of every stored block (BSR order)."""
    return torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())


def bsr_to_dense(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense weight [R * bs, in_features] (differentiable in ``values``)."""
    bs = values.shape[-1]
    R, Cb = crow.numel() - 1, in_features // bs
    blocks = values.new_zeros(R, Cb, bs, bs)
    blocks = blocks.index_put((block_rows(crow), col), values)
    return blocks.transpose(1, 2).reshape(R * bs, Cb * bs)


# ---------------------------------------------------------------- references (ground truth)
def block_sparse_linear_reference(x, values, crow, col, ccol, bias=None):
    """Densify, then ``F.linear``."""
    w = bsr_to_dense(values, crow, col, (ccol.numel() - 1) * values.shape[-1])
    return F.linear(x, w, bias)


def _bwd_input_reference(dy, values, crow, col, ccol):
    return dy @ bsr_to_dense(values, crow, col, (ccol.numel() - 1) * values.shape[-1])


def _bwd_weight_reference(dy, x, crow, col, block_size):
    bs = block_size
    g = dy.t() @ x  # [out, in]
    blocks = g.reshape(g.shape[0] // bs, bs, g.shape[1] // bs, bs).transpose(1, 2)
    return blocks[block_rows(crow), col].contiguous()


# ---------------------------------------------------------------- checks
def _index(name: str, t, numel: int | None = None, what: str = "") -> None:
    _checks.tensor(name, t, ndim=1)
    if t.dtype != torch.int64:
        raise TypeError(f"{name}: expected an int64 index tensor, got {str(t.dtype).replace('torch.', '')}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name}: expected {numel} entries ({what}), got {t.numel()}")


def check_format(values, crow, col, ccol, row, perm) -> None:
    """Shapes and dtypes of the six storage tensors (no reads of their values)."""
    _checks.tensor("values", values, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    nnzb, bs, bs2 = values.shape
    if bs != bs2 or bs not in BLOCK_SIZES:
        raise ValueError(f"values: expected shape [nnzb, bs, bs] with bs in {BLOCK_SIZES}, got {tuple(values.shape)}")
    _index("crow", crow)
    if crow.numel() < 1:
        raise ValueError("crow: expected R + 1 >= 1 row pointers, got an empty tensor")
    _index("ccol", ccol)
    if ccol.numel() < 1:
        raise ValueError("ccol: expected Cb + 1 >= 1 column pointers, got an empty tensor")
    _index("col", col, nnzb, "one per stored block, values.shape[0]")
    _index("row", row, nnzb, "one per stored block, values.shape[0]")
    _index("perm", perm, nnzb, "one per stored block, values.shape[0]")
    _checks.same_device(values=values, crow=crow, col=col, ccol=ccol, row=row, perm=perm)


def _pattern_stamp(tensors) -> tuple | None:
    versions = [_checks.version(t) for t in tensors]
    if any(v is None for v in versions):  # inference tensors: no version counter, so no memory
        return None
    return tuple((weakref.ref(t), v) for t, v in zip(tensors, versions))


def _checked_before(tensors) -> bool:
    """Whether these exact tensor objects passed ``check_pattern`` and none was written in place
    since (``_version`` counts in-place writes). Saves its ~20 small ops (~0.2 ms) per call of a
    layer whose pattern buffers never change."""
    stamp = getattr(tensors[0], "_lotus_bsr_checked", None)
    if stamp is None or len(stamp) != len(tensors):
        return False
    return all(ref() is t and version == _checks.version(t) for (ref, version), t in zip(stamp, tensors))


def check_pattern(crow, col, ccol, row, perm) -> None:
    """The index tensors describe one consistent block pattern: pointers start at 0, end at nnzb and
    never decrease, indices are in range, columns strictly increase inside a block row (no
    duplicate block), rows strictly increase inside a block column, and ``perm`` maps each BSC
    entry to the BSR block at the same (row, column). Reads the values (a sync on GPU); remembered
    on ``crow`` for the same five tensor objects until one of them is modified in place."""
    tensors = (crow, col, ccol, row, perm)
    if _checked_before(tensors):
        return
    _check_pattern(crow, col, ccol, row, perm)
    try:
        crow._lotus_bsr_checked = _pattern_stamp(tensors)
    except (AttributeError, RuntimeError):  # a tensor subclass without a __dict__: just check every time
        pass


def _check_pattern(crow, col, ccol, row, perm) -> None:
    nnzb, R, Cb = col.numel(), crow.numel() - 1, ccol.numel() - 1
    for name, ptr in (("crow", crow), ("ccol", ccol)):
        if int(ptr[0]) != 0 or int(ptr[-1]) != nnzb or bool((ptr.diff() < 0).any()):
            raise ValueError(
                f"{name}: expected non-decreasing pointers from 0 to nnzb = {nnzb}, "
                f"got {ptr.tolist() if ptr.numel() <= 16 else 'other values'}"
            )
    _checks.index_range("col", col, Cb)
    _checks.index_range("row", row, R)
    _checks.index_range("perm", perm, nnzb)
    if nnzb == 0:
        return
    brow = block_rows(crow)
    if bool(((brow[1:] == brow[:-1]) & (col[1:] <= col[:-1])).any()):
        raise ValueError(
            "col: expected strictly increasing block columns inside each block row (sorted, no duplicates)"
        )
    bcol = block_rows(ccol)
    if bool(((bcol[1:] == bcol[:-1]) & (row[1:] <= row[:-1])).any()):
        raise ValueError(
            "row: expected strictly increasing block rows inside each block column (sorted, no duplicates)"
        )
    if not (bool((col[perm] == bcol).all()) and bool((brow[perm] == row).all())):
        raise ValueError(
            "perm / ccol / row: the BSC view does not describe the same blocks as crow / col "
            "(build all five with bsr_indices or bsr_from_dense)"
        )


_LOW = (torch.bfloat16, torch.float16)


def _mixed(x, values) -> bool:
    """x fp32 with bf16 / fp16 values: computed as x.to(values.dtype) (see the module docstring)."""
    return x.dtype == torch.float32 and values.dtype in _LOW


def _check(x, values, crow, col, ccol, row, perm, bias, allow_mixed: bool = False) -> None:
    check_format(values, crow, col, ccol, row, perm)
    bs = values.shape[-1]
    out_f, in_f = (crow.numel() - 1) * bs, (ccol.numel() - 1) * bs
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] != in_f:
        raise ValueError(
            f"x: expected shape [..., {in_f}] (in_features = (ccol.numel() - 1) * block size), got {tuple(x.shape)}"
        )
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1)
        if bias.shape[0] != out_f:
            raise ValueError(
                f"bias: expected shape ({out_f},) (out_features = (crow.numel() - 1) * block size), "
                f"got {tuple(bias.shape)}"
            )
    _checks.same_device(x=x, values=values, crow=crow, bias=bias)
    if not (allow_mixed and _mixed(x, values)):
        _checks.same_dtype(x=x, values=values, bias=bias)
    else:
        _checks.same_dtype(values=values, bias=bias)


# ---------------------------------------------------------------- the three products as ops
def _kernel_backend(t: torch.Tensor) -> str:
    return _backend.select(t.device, "block_sparse_linear")


def _check_sizes(x, values, crow, col, ccol, bias) -> None:
    """The sizes the kernels index memory with, checked inside the op: a TorchScript or torch.fx
    graph (or a direct ``torch.ops`` call) reaches the op without the wrapper's ``_check``, and a
    wrong in_features or block count would read out of bounds. A few integer compares per call."""
    if values.dim() != 3 or values.shape[0] != col.shape[0]:
        raise ValueError(
            f"values: expected shape [nnzb = {col.shape[0]}, bs, bs] (one block per col entry), "
            f"got {tuple(values.shape)}"
        )
    bs = values.shape[-1]
    in_f, out_f = (ccol.shape[0] - 1) * bs, (crow.shape[0] - 1) * bs
    if x.dim() == 0 or x.shape[-1] != in_f:
        raise ValueError(f"x: expected shape [..., {in_f}] (in_features), got {tuple(x.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_f):
        raise ValueError(f"bias: expected shape ({out_f},) (out_features), got {tuple(bias.shape)}")
    if x.get_device() != values.get_device():  # an int per tensor: cheaper than comparing torch.device
        raise ValueError(f"x: expected a tensor on {values.device} (like values), got one on {x.device}")


@torch.library.custom_op("lotus_kernels::block_sparse_linear", mutates_args=())
def _bsl_fwd(
    x: torch.Tensor,
    values: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    ccol: torch.Tensor,
    row: torch.Tensor,
    perm: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    _check_sizes(x, values, crow, col, ccol, bias)
    check_pattern(crow, col, ccol, row, perm)
    backend = _kernel_backend(x)
    if backend not in _CAPS.mixed_input and x.dtype != values.dtype:  # mixed: cast for kernels that do not convert
        x = x.to(values.dtype)
    if backend == "reference":
        return block_sparse_linear_reference(x, values, crow, col, ccol, bias)
    out_f = (crow.numel() - 1) * values.shape[-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out = _backend.new_output((x2.shape[0], out_f), x, values.dtype)
    _backend.launch(
        backend,
        _MODULE,
        "bsr_linear_fwd",
        x2,
        values.contiguous(),
        crow.contiguous(),
        col.contiguous(),
        None if bias is None else bias.contiguous(),
        out,
    )
    return out.reshape(*x.shape[:-1], out_f)


@_bsl_fwd.register_fake
def _(x, values, crow, col, ccol, row, perm, bias):
    return x.new_empty(*x.shape[:-1], (crow.shape[0] - 1) * values.shape[-1], dtype=values.dtype)


def _dx_dtype(dy, dx_fp32: bool):
    return torch.float32 if dx_fp32 else dy.dtype


def _bwd_input_kernel(backend, dy, values, crow, col, ccol, row, perm, dx_fp32=False):
    if backend not in _CAPS.mixed_input and dx_fp32 and dy.dtype != torch.float32:  # cast (module docstring)
        return _bwd_input_kernel(backend, dy, values, crow, col, ccol, row, perm).to(torch.float32)
    if backend == "reference":
        return _bwd_input_reference(dy, values, crow, col, ccol)
    dx = _backend.new_output((dy.shape[0], (ccol.numel() - 1) * values.shape[-1]), dy, _dx_dtype(dy, dx_fp32))
    _backend.launch(
        backend,
        _MODULE,
        "bsr_linear_bwd_input",
        dy.contiguous(),
        values.contiguous(),
        ccol.contiguous(),
        row.contiguous(),
        perm.contiguous(),
        dx,
    )
    return dx


@torch.library.custom_op("lotus_kernels::block_sparse_linear_bwd_input", mutates_args=())
def _bsl_bwd_input(
    dy: torch.Tensor,
    values: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    ccol: torch.Tensor,
    row: torch.Tensor,
    perm: torch.Tensor,
    dx_fp32: bool = False,
) -> torch.Tensor:
    """dx [M, in] = dy [M, out] @ W (dx_fp32: dx in fp32 for an fp32 x of a mixed call)."""
    return _bwd_input_kernel(_kernel_backend(dy), dy, values, crow, col, ccol, row, perm, dx_fp32)


@_bsl_bwd_input.register_fake
def _(dy, values, crow, col, ccol, row, perm, dx_fp32=False):
    return dy.new_empty(dy.shape[0], (ccol.shape[0] - 1) * values.shape[-1], dtype=_dx_dtype(dy, dx_fp32))


@torch.library.custom_op("lotus_kernels::block_sparse_linear_bwd_input_bias", mutates_args=())
def _bsl_bwd_input_bias(
    dy: torch.Tensor,
    values: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    ccol: torch.Tensor,
    row: torch.Tensor,
    perm: torch.Tensor,
    dx_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dbias) = (dy @ W, dy.sum(0)). The CPU kernels add dy's columns up while packing dy for dx
    (a bias layer's backward then reads dy once, not twice); the other backends sum separately."""
    backend = _kernel_backend(dy)
    if backend not in _CAPS.fused_bias:
        return _bwd_input_kernel(backend, dy, values, crow, col, ccol, row, perm, dx_fp32), dy.sum(0)
    dx = _backend.new_output((dy.shape[0], (ccol.numel() - 1) * values.shape[-1]), dy, _dx_dtype(dy, dx_fp32))
    db = _backend.new_output((dy.shape[1],), dy)
    _backend.launch(
        backend,
        _MODULE,
        "bsr_linear_bwd_input_bias",
        dy.contiguous(),
        values.contiguous(),
        ccol.contiguous(),
        row.contiguous(),
        perm.contiguous(),
        dx,
        db,
    )
    return dx, db


@_bsl_bwd_input_bias.register_fake
def _(dy, values, crow, col, ccol, row, perm, dx_fp32=False):
    return (
        dy.new_empty(dy.shape[0], (ccol.shape[0] - 1) * values.shape[-1], dtype=_dx_dtype(dy, dx_fp32)),
        dy.new_empty(dy.shape[1]),
    )


@torch.library.custom_op("lotus_kernels::block_sparse_linear_bwd_weight", mutates_args=())
def _bsl_bwd_weight(
    dy: torch.Tensor,
    x: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    ccol: torch.Tensor,
    row: torch.Tensor,
    perm: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """dvalues [nnzb, bs, bs]: the stored blocks of dy [M, out]^T @ x [M, in] (x may be fp32 with a bf16 /
    fp16 dy: a mixed call, computed as x.to(dy.dtype))."""
    backend = _kernel_backend(dy)
    if backend not in _CAPS.mixed_input and x.dtype != dy.dtype:
        x = x.to(dy.dtype)
    if backend == "reference":
        return _bwd_weight_reference(dy, x, crow, col, block_size)
    dv = _backend.new_output((col.numel(), block_size, block_size), dy)
    _backend.launch(
        backend,
        _MODULE,
        "bsr_linear_bwd_weight",
        dy.contiguous(),
        x.contiguous(),
        crow.contiguous(),
        col.contiguous(),
        dv,
    )
    return dv


@_bsl_bwd_weight.register_fake
def _(dy, x, crow, col, ccol, row, perm, block_size):
    return dy.new_empty(col.shape[0], block_size, block_size)


# ---------------------------------------------------------------- autograd (each product's backward uses the others)
def _fwd_setup(ctx, inputs, output):
    x, values, crow, col, ccol, row, perm, bias = inputs
    ctx.save_for_backward(x, values, crow, col, ccol, row, perm)
    ctx.has_bias = bias is not None


def _fwd_backward(ctx, grad):
    x, values, crow, col, ccol, row, perm = ctx.saved_tensors
    need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = ctx.needs_input_grad[7] and ctx.has_bias
    g2 = grad.reshape(-1, grad.shape[-1])
    dx_fp32 = x.dtype != values.dtype  # mixed: dx fp32 like x
    dx = dv = db = None
    if need_x and need_b:  # one pass over the gradient for both
        dx, db = _bsl_bwd_input_bias(g2, values, crow, col, ccol, row, perm, dx_fp32)
        dx = dx.reshape(x.shape)
    elif need_x:
        dx = _bsl_bwd_input(g2, values, crow, col, ccol, row, perm, dx_fp32).reshape(x.shape)
    elif need_b:
        db = g2.sum(0)
    if need_v:
        dv = _bsl_bwd_weight(g2, x.reshape(-1, x.shape[-1]), crow, col, ccol, row, perm, values.shape[-1])
    return dx, dv, None, None, None, None, None, db


_bsl_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def _bwd_input_setup(ctx, inputs, output):
    dy, values, crow, col, ccol, row, perm, dx_fp32 = inputs
    ctx.save_for_backward(dy, values, crow, col, ccol, row, perm)
    ctx.dx_fp32 = dx_fp32


def _bwd_input_bias_backward(ctx, g, g_db):
    # (dx, db) = (dy @ W, dy.sum(0)): d(dy) = g @ W^T + g_db (the forward with g_db as its bias),
    # d(values) = stored blocks of dy^T g. bwd_input alone is the case g_db = None.
    dy, values, crow, col, ccol, row, perm = ctx.saved_tensors
    if g is None:
        g = dy.new_zeros(dy.shape[0], (ccol.numel() - 1) * values.shape[-1], dtype=_dx_dtype(dy, ctx.dx_fp32))
    d_dy = d_v = None
    if ctx.needs_input_grad[0]:
        d_dy = _bsl_fwd(g, values, crow, col, ccol, row, perm, g_db)
    if ctx.needs_input_grad[1]:
        d_v = _bsl_bwd_weight(dy, g, crow, col, ccol, row, perm, values.shape[-1])
    return d_dy, d_v, None, None, None, None, None, None


_bsl_bwd_input_bias.register_autograd(_bwd_input_bias_backward, setup_context=_bwd_input_setup)


def _bwd_input_backward(ctx, g):
    return _bwd_input_bias_backward(ctx, g, None)


_bsl_bwd_input.register_autograd(_bwd_input_backward, setup_context=_bwd_input_setup)


def _bwd_weight_setup(ctx, inputs, output):
    dy, x, crow, col, ccol, row, perm, block_size = inputs
    ctx.save_for_backward(dy, x, crow, col, ccol, row, perm)


def _bwd_weight_backward(ctx, g):
    # dv = blocks of dy^T x, i.e. <G, dy^T x> with G block-sparse of values g: d(dy) = x @ G^T,
    # d(x) = dy @ G.
    dy, x, crow, col, ccol, row, perm = ctx.saved_tensors
    d_dy = d_x = None
    if ctx.needs_input_grad[0]:
        d_dy = _bsl_fwd(x, g, crow, col, ccol, row, perm, None)
    if ctx.needs_input_grad[1]:
        d_x = _bsl_bwd_input(dy, g, crow, col, ccol, row, perm, x.dtype != dy.dtype)
    return d_dy, d_x, None, None, None, None, None, None


_bsl_bwd_weight.register_autograd(_bwd_weight_backward, setup_context=_bwd_weight_setup)


# ---------------------------------------------------------------- public API
def block_sparse_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    ccol: torch.Tensor,
    row: torch.Tensor,
    perm: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for the block-sparse weight W stored as (values, crow, col, ccol, row,
    perm) (see the module docstring; ``bsr_from_dense`` builds them). Gradients flow to ``x``,
    ``values`` (stored blocks only) and ``bias``.

    Under ``torch.autocast`` to bf16 / fp16, an fp32 ``x`` is not cast: the op takes it as it is (a
    mixed call, see the module docstring; dx comes back fp32 without a cast node).

    TorchScript compiles this to the registered op (which checks the shapes it indexes with, but
    casts nothing for autocast); under torch.fx tracing it is one graph node calling this function."""
    if torch.jit.is_scripting():
        return torch.ops.lotus_kernels.block_sparse_linear(x, values, crow, col, ccol, row, perm, bias)
    if _fx.is_proxy(x, values, crow, col, ccol, row, perm, bias):
        return _fx.record(block_sparse_linear, x, values, crow, col, ccol, row, perm, bias)
    mixed = (
        isinstance(x, torch.Tensor)
        and x.dtype == torch.float32
        and torch.is_autocast_enabled(x.device.type)
        and torch.get_autocast_dtype(x.device.type) in _LOW
    )
    if mixed:
        values, bias = _checks.autocast_inputs(values, bias)
    else:
        x, values, bias = _checks.autocast_inputs(x, values, bias)
    _check(x, values, crow, col, ccol, row, perm, bias, allow_mixed=mixed)
    return _bsl_fwd(x, values, crow, col, ccol, row, perm, bias)

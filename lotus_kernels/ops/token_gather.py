"""``gather_tokens`` / ``scatter_tokens``: keep a subset of tokens per image, and its adjoint.

gather_tokens(x [B, N, C], idx [B, K]) -> [B, K, C]        out[b, k] = x[b, idx[b, k]]
scatter_tokens(src [B, K, C], idx [B, K], n) -> [B, n, C]  out[b, m] = sum of src[b, k] with idx[b, k] == m

Each is the other's backward, so both have gradients of any order.
"""

from __future__ import annotations

import torch

from .. import _backend, _checks


# ---------------------------------------------------------------- reference (ground truth)
def gather_tokens_reference(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens_reference(src: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    out = src.new_zeros(src.shape[0], n, src.shape[-1])
    return out.scatter_add_(1, idx.unsqueeze(-1).expand_as(src), src)


# ---------------------------------------------------------------- checks
def _check_gather(x, idx) -> None:
    _checks.tensor("x", x, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.index_tensor("idx", idx, batch=x.shape[0], batch_name="x")
    _checks.same_device(x=x, idx=idx)


def _check_scatter(src, idx, n) -> None:
    _checks.tensor("src", src, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.index_tensor("idx", idx, batch=src.shape[0], batch_name="src")
    if idx.shape[1] != src.shape[1]:
        raise ValueError(f"idx: expected shape [B, {src.shape[1]}] to match src [B, K, C], got {tuple(idx.shape)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int (number of tokens), got {n!r}")
    _checks.same_device(src=src, idx=idx)


# ---------------------------------------------------------------- registered ops
@torch.library.custom_op("lotus_kernels::gather_tokens", mutates_args=())
def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    _checks.index_range("idx", idx, x.shape[1])
    backend = _backend.select(x.device, "token_gather")
    if backend == "reference":
        return gather_tokens_reference(x, idx)
    out = _backend.new_output((idx.shape[0], idx.shape[1], x.shape[2]), x)
    _backend.launch(backend, "token_gather", "gather_tokens", x.contiguous(), idx.contiguous(), out)
    return out


@_gather_tokens.register_fake
def _(x, idx):
    return x.new_empty(idx.shape[0], idx.shape[1], x.shape[2])


@torch.library.custom_op("lotus_kernels::scatter_tokens", mutates_args=())
def _scatter_tokens(src: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    _checks.index_range("idx", idx, n)
    backend = _backend.select(src.device, "token_gather")
    if backend == "reference":
        return scatter_tokens_reference(src, idx, n)
    out = _backend.new_output((src.shape[0], n, src.shape[2]), src)
    _backend.launch(backend, "token_gather", "scatter_tokens", src.contiguous(), idx.contiguous(), out)
    return out


@_scatter_tokens.register_fake
def _(src, idx, n):
    return src.new_empty(src.shape[0], n, src.shape[2])


def _gather_setup(ctx, inputs, output):
    x, idx = inputs
    ctx.save_for_backward(idx)
    ctx.n = x.shape[1]


def _gather_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    return _scatter_tokens(grad, idx, ctx.n), None


def _scatter_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _scatter_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    return _gather_tokens(grad, idx), None, None


_gather_tokens.register_autograd(_gather_backward, setup_context=_gather_setup)
_scatter_tokens.register_autograd(_scatter_backward, setup_context=_scatter_setup)


# ---------------------------------------------------------------- public API
def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx[b]`` of every ``x[b]``: ``x`` [B, N, C] float, ``idx`` [B, K] int64 in [0, N).

    Backward is a scatter-add into zeros (duplicate indices accumulate)."""
    _check_gather(x, idx)
    return _gather_tokens(x, idx)


def scatter_tokens(src: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Adjoint of ``gather_tokens``: ``src`` [B, K, C] summed into rows ``idx[b]`` of zeros [B, n, C]."""
    _check_scatter(src, idx, n)
    return _scatter_tokens(src, idx, n)

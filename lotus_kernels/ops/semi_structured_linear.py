"""``semi_structured_linear``: a linear layer whose weight is 2:4 sparse along ``in_features``, run by
PyTorch's own semi-structured sparse kernels (cuSPARSELt, or CUTLASS when torch is told to force it).

semi_structured_linear(x [..., in], weight [out, in], mask [out, in] bool, bias [out]?) -> [..., out]
    y = x @ weight.T + bias, with ``weight`` zero where ``mask`` is False and ``mask`` 2:4: at most
    2 True in every group of 4 consecutive entries of a row.

Forward: the weight is compressed (``torch.sparse.to_sparse_semi_structured``) on every call of this
functional op, since training changes it every step, and ``F.linear`` on the compressed tensor runs
the sparse GEMM. The backward is that of ``masked_linear``: dx = dy @ weight (dense: a 2:4 pattern
along ``in_features`` is not 2:4 along ``out_features``, which dx contracts over) and dweight =
(dy^T @ x) zeroed where ``mask`` is False, so pruned weights stay at zero through SGD / AdamW.
``nn.SemiStructuredLinear`` does better: it compresses W once per optimizer step (cached on the
weight's version), and with a *transposable* mask (``semi_structured_mask(w, transposable=True)``:
2 of every 4 along both axes, chosen per 4x4 tile by magnitude, as torchao's training path does) it
also compresses W^T, so dx runs on the sparse kernels too.

The kernels need CUDA, compute capability 8.0+, fp16/bf16, and shapes that are multiples of the
backend's minimum tile; ``kernel_unsupported`` says which requirement a call misses, and
``nn.SemiStructuredLinear`` falls back (with a warning) or raises on it.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F

from .. import _checks, _fx
from .masked_linear import _ml_backward, _ml_setup, check_linear_args, check_mask

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)


# ---------------------------------------------------------------- the 2:4 pattern
@functools.cache
def _tile_patterns() -> torch.Tensor:
    """The 90 4x4 0/1 tiles with exactly 2 ones in every row and every column, [90, 16] float."""
    rows = [r for r in itertools.product((0, 1), repeat=4) if sum(r) == 2]
    tiles = [t for t in itertools.product(rows, repeat=4) if all(sum(c) == 2 for c in zip(*t))]
    return torch.tensor(tiles, dtype=torch.float32).reshape(len(tiles), 16)


def semi_structured_mask(weight: torch.Tensor, *, transposable: bool = False) -> torch.Tensor:
    """The 2:4 mask by magnitude: in every group of 4 consecutive weights of a row (along
    ``in_features``) keep the 2 of largest absolute value (ties: the earlier one).

    ``transposable=True``: the mask is 2:4 along both axes (so W^T is 2:4 too and the input gradient
    can use the sparse kernels): in every 4x4 tile the pattern with 2 per row and 2 per column that
    keeps the largest total magnitude (ties: the first of the 90 patterns in lexicographic order).
    It keeps a little less magnitude than the row-wise mask; both dimensions must be multiples of 4."""
    _checks.tensor("weight", weight, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    out_features, in_features = weight.shape
    if in_features % 4 != 0:
        raise ValueError(
            f"weight: in_features={in_features} must be a multiple of 4 for 2:4 sparsity "
            f"(groups of 4 consecutive weights along in_features)"
        )
    if transposable:
        if out_features % 4 != 0:
            raise ValueError(
                f"weight: out_features={out_features} must be a multiple of 4 for a transposable 2:4 mask (4x4 tiles)"
            )
        tiles = weight.detach().abs().float().reshape(out_features // 4, 4, in_features // 4, 4).permute(0, 2, 1, 3)
        pats = _tile_patterns().to(weight.device)
        best = (tiles.reshape(-1, 16) @ pats.t()).argmax(1)  # argmax: the first maximum
        mask = pats[best].reshape(out_features // 4, in_features // 4, 4, 4).permute(0, 2, 1, 3)
        return mask.reshape(out_features, in_features).bool()
    groups = weight.detach().abs().reshape(out_features, in_features // 4, 4)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return mask.reshape(out_features, in_features)


def check_semi_structured_mask(name: str, mask, shape, like: str) -> None:
    """``mask``: bool, of ``shape``, at most 2 True in every group of 4 along the last dim."""
    check_mask(name, mask, shape, like)
    out_features, in_features = shape
    if in_features % 4 != 0:
        raise ValueError(f"{name}: in_features={in_features} must be a multiple of 4 for 2:4 sparsity")
    kept = mask.reshape(out_features, in_features // 4, 4).sum(-1)
    bad = (kept > 2).nonzero()
    if bad.numel():
        r, g = bad[0].tolist()
        raise ValueError(
            f"{name}: expected a 2:4 pattern (at most 2 True in every group of 4 consecutive "
            f"entries along in_features); row {r}, columns {4 * g}..{4 * g + 3} keep "
            f"{int(kept[r, g])}"
        )


def is_transposable(mask: torch.Tensor) -> bool:
    """Whether a bool [out, in] mask is 2:4 along both axes (at most 2 of every 4 consecutive entries
    of each row and of each column). Reads the mask."""
    out_features, in_features = mask.shape
    if out_features % 4 or in_features % 4:
        return False
    rows = mask.reshape(out_features, in_features // 4, 4).sum(-1)
    cols = mask.t().reshape(in_features, out_features // 4, 4).sum(-1)
    return bool((rows <= 2).all()) and bool((cols <= 2).all())


# ---------------------------------------------------------------- when the kernels apply
def gemm_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer's GEMM runs in: the autocast dtype when ``torch.autocast`` is on for
    the weight's device (and the weight is fp32 / fp16 / bf16), else the weight's own. The 2:4
    decision is made on this dtype: an fp32 model under bf16 autocast runs its GEMMs in bf16."""
    dev = weight.device.type
    if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def _semi_structured_class():
    """The subclass ``to_sparse_semi_structured`` builds (torch picks by this flag alone)."""
    sst = torch.sparse.SparseSemiStructuredTensor
    return (
        torch.sparse.SparseSemiStructuredTensorCUTLASS
        if sst._FORCE_CUTLASS
        else torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    )


def kernel_unsupported(
    device: torch.device,
    dtype: torch.dtype,
    out_features: int,
    in_features: int,
    capability: tuple[int, int] | None = None,
    backend_cls=None,
):
    """None if the 2:4 kernels can run a weight [out_features, in_features] of ``dtype`` on
    ``device``; else (exception type, message naming the argument and the requirement).
    ``capability`` / ``backend_cls`` default to the device's and torch's choice (tests pass them)."""
    device = torch.device(device)
    if device.type != "cuda":
        return RuntimeError, f"weight: the 2:4 kernels need a CUDA tensor, got one on {device}"
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        return RuntimeError, (
            f"weight: the 2:4 kernels need compute capability "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (sm80, Ampere or newer), "
            f"got {capability[0]}.{capability[1]}"
        )
    if dtype not in KERNEL_DTYPES:
        return TypeError, (f"weight: the 2:4 kernels take float16 or bfloat16, got {str(dtype).replace('torch.', '')}")
    cls = backend_cls or _semi_structured_class()
    cfg = cls._DTYPE_SHAPE_CONSTRAINTS[dtype]
    rows, cols = cfg.sparse_min_rows, cfg.sparse_min_cols
    for name, n, m in (("out_features", out_features, rows), ("in_features", in_features, cols)):
        if n < m or n % m:
            return ValueError, (
                f"{name}={n} must be a positive multiple of {m} for the {cls.BACKEND} 2:4 "
                f"kernels with {str(dtype).replace('torch.', '')} (weight "
                f"[out_features, in_features] in multiples of ({rows}, {cols}))"
            )
    return None


# ---------------------------------------------------------------- reference
def semi_structured_linear_reference(x, weight, mask, bias=None):
    return F.linear(x, weight * mask, bias)


# ---------------------------------------------------------------- op
@torch.library.custom_op("lotus_kernels::semi_structured_linear", mutates_args=())
def _semi_structured_linear(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], weight.shape[0])
    w = torch.sparse.to_sparse_semi_structured(weight.detach().contiguous())
    return F.linear(x2, w, bias).reshape(*x.shape[:-1], weight.shape[0])


@_semi_structured_linear.register_fake
def _(x, weight, mask, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# Same products as masked_linear's backward (dense dx, masked dweight, summed bias).
_semi_structured_linear.register_autograd(_ml_backward, setup_context=_ml_setup)


def semi_structured_linear(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on the 2:4 sparse kernels; ``weight`` must already be zero where
    the 2:4 ``mask`` is False (not re-checked per call). Raises if the kernels cannot run it (see
    ``kernel_unsupported``); ``nn.SemiStructuredLinear`` handles the fallback. TorchScript compiles
    this to the registered op; under torch.fx tracing it is one graph node calling this function."""
    if torch.jit.is_scripting():
        return torch.ops.lotus_kernels.semi_structured_linear(x, weight, mask, bias)
    if _fx.is_proxy(x, weight, mask, bias):
        return _fx.record(semi_structured_linear, x, weight, mask, bias)
    x, weight, bias = _checks.autocast_inputs(x, weight, bias)
    check_linear_args(x, weight, mask, bias)
    out_features, in_features = weight.shape
    why = kernel_unsupported(weight.device, weight.dtype, out_features, in_features)
    if why is not None:
        exc, msg = why
        raise exc(f"semi_structured_linear: {msg}")
    return _semi_structured_linear(x, weight, mask, bias)

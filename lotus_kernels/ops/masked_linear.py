"""``masked_linear``: a linear layer whose weight is pruned by a fixed bool mask (unstructured).

masked_linear(x [..., in], weight [out, in], mask [out, in] bool, bias [out]?) -> [..., out]
    y = x @ weight.T + bias

The caller keeps ``weight`` exactly zero where ``mask`` is False (``nn.MaskedLinear`` does), so the
forward is one plain GEMM with no masked copy of the weight, and dx = dy @ weight needs no mask
either. Only the weight gradient is masked: dweight = (dy^T @ x) zeroed where ``mask`` is False,
the zeroing one in-place pass over dweight (``masked_weight_grad``). With a zero gradient, SGD
(momentum, weight decay) and AdamW leave pruned weights at exactly zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend, _checks, _fx


# ---------------------------------------------------------------- references (ground truth)
def masked_linear_reference(x, weight, mask, bias=None):
    """Masks the weight explicitly, so its autograd gradients are the definition (and it does not
    rely on ``weight`` being zero at pruned positions)."""
    return F.linear(x, weight * mask, bias)


def masked_weight_grad_reference(grad_out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    g = grad_out.reshape(-1, grad_out.shape[-1])
    return (g.t() @ x.reshape(-1, x.shape[-1])).masked_fill_(~mask, 0)


# ---------------------------------------------------------------- checks
def check_mask(name: str, mask, shape, like: str) -> None:
    """``mask``: a bool tensor of ``shape`` (that of the weight called ``like``)."""
    _checks.tensor(name, mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected a bool tensor (True = keep), got {str(mask.dtype).replace('torch.', '')}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} to match {like}, got {tuple(mask.shape)}")


def check_linear_args(x, weight, mask, bias) -> None:
    """x [..., in], weight [out, in] float, bool mask [out, in], bias [out]?: same device and dtype."""
    _checks.tensor("weight", weight, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    out_features, in_features = weight.shape
    check_mask("mask", mask, weight.shape, "weight [out_features, in_features]")
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"x: expected shape [..., {in_features}] (last dim = weight's in_features), got {tuple(x.shape)}"
        )
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1)
        if bias.shape[0] != out_features:
            raise ValueError(f"bias: expected shape ({out_features},) (weight's out_features), got {tuple(bias.shape)}")
    _checks.same_device(x=x, weight=weight, mask=mask, bias=bias)
    _checks.same_dtype(x=x, weight=weight, bias=bias)


# ---------------------------------------------------------------- masked weight gradient op
@torch.library.custom_op("lotus_kernels::masked_weight_grad", mutates_args=())
def _masked_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    backend = _backend.select(grad_out.device, "masked_weight_grad")
    if backend == "reference":
        return masked_weight_grad_reference(grad_out, x, mask)
    g = grad_out.reshape(-1, grad_out.shape[-1])
    out = _backend.new_output(mask.shape, x)
    torch.mm(g.t(), x.reshape(-1, x.shape[-1]), out=out)
    _backend.cpp_ops().masked_fill_grad_(out, mask.contiguous())  # "cpu": the only kernel backend
    return out


@_masked_weight_grad.register_fake
def _(grad_out, x, mask):
    return x.new_empty(mask.shape)


def _mwg_setup(ctx, inputs, output):
    grad_out, x, mask = inputs
    ctx.save_for_backward(grad_out, x, mask)


def _mwg_backward(ctx, gw):
    # The op is bilinear in (grad_out, x): out = (g^T x) * mask.
    grad_out, x, mask = ctx.saved_tensors
    gw = gw.masked_fill(~mask, 0)
    d_g = d_x = None
    if ctx.needs_input_grad[0]:
        d_g = x @ gw.t()
    if ctx.needs_input_grad[1]:
        d_x = grad_out @ gw
    return d_g, d_x, None


_masked_weight_grad.register_autograd(_mwg_backward, setup_context=_mwg_setup)


# ---------------------------------------------------------------- masked_linear op
@torch.library.custom_op("lotus_kernels::masked_linear", mutates_args=())
def _masked_linear(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return F.linear(x, weight, bias)  # weight is already zero where mask is False


@_masked_linear.register_fake
def _(x, weight, mask, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _ml_setup(ctx, inputs, output):
    x, weight, mask, bias = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.has_bias = bias is not None


def _ml_backward(ctx, grad):
    x, weight, mask = ctx.saved_tensors
    need_x, need_w, _, need_b = ctx.needs_input_grad
    dx = dw = db = None
    if need_x:
        dx = grad @ weight
    if need_w:
        dw = _masked_weight_grad(grad, x, mask)
    if need_b and ctx.has_bias:
        db = grad.reshape(-1, grad.shape[-1]).sum(0)
    return dx, dw, None, db


_masked_linear.register_autograd(_ml_backward, setup_context=_ml_setup)


# ---------------------------------------------------------------- public API
def masked_linear(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a ``weight`` [out, in] pruned by the bool ``mask`` [out, in]
    (True = kept). ``weight`` must already be zero where ``mask`` is False (not checked: that would
    cost a pass over the weight per call); its gradient is zero there.

    TorchScript compiles this to the registered op (no checks, no autocast casts); under torch.fx
    tracing it is one graph node calling this function."""
    if torch.jit.is_scripting():
        return torch.ops.lotus_kernels.masked_linear(x, weight, mask, bias)
    if _fx.is_proxy(x, weight, mask, bias):
        return _fx.record(masked_linear, x, weight, mask, bias)
    x, weight, bias = _checks.autocast_inputs(x, weight, bias)
    check_linear_args(x, weight, mask, bias)
    return _masked_linear(x, weight, mask, bias)

"""``SemiStructuredLinear``: an ``nn.Linear`` with a 2:4 sparse weight (2 of every 4 consecutive
weights along ``in_features`` kept), trained through PyTorch's semi-structured sparse kernels.

On the kernel path the layer compresses its weight once per optimizer step (the compressed copy is
cached on the weight's version counter, which every in-place update bumps), in the dtype the GEMM
runs in (``gemm_dtype``: the autocast dtype under ``torch.autocast``, so an fp32 model under bf16
autocast takes the sparse path). With a transposable mask (2:4 along both axes:
``from_linear(..., transposable=True)``) it also compresses W^T, and the input gradient dx = dy @ W
runs on the sparse kernels too; the weight gradient stays a dense GEMM, masked.

Where those kernels cannot run (CPU, a GPU older than sm80, fp32/fp64, a shape that is not a multiple
of the kernel's tile), the layer falls back to a dense matmul with the 2:4-masked weight
(``ops.masked_linear``: same result, same masked gradient, no speed-up) and says so once per layer
with a ``SemiStructuredFallbackWarning`` naming the requirement it missed; ``strict=True`` raises
instead. As in ``MaskedLinear``, ``weight`` is kept exactly zero where ``mask`` is False: set on
construction and on ``load_state_dict``, preserved by training because its gradient is zero there.

TorchScript and torch.fx graphs (traced through the layer) run the masked dense product, without a
warning: the compressed weights live in a Python-side cache keyed on the weight's version, which a
graph cannot carry. Same result, no 2:4 speed-up. timm's FX tracer keeps the layer as a leaf, so its
graphs call this forward and get the kernels where they run.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks, _fx
from ..ops.masked_linear import _masked_weight_grad, masked_linear
from ..ops.semi_structured_linear import (
    check_semi_structured_mask,
    gemm_dtype,
    is_transposable,
    kernel_unsupported,
    semi_structured_mask,
)
from ._convert import masked_layer_from_linear
from ._masked_weight import MaskedWeightLinear


class SemiStructuredFallbackWarning(UserWarning):
    """A ``SemiStructuredLinear`` runs a dense masked matmul because the 2:4 kernels cannot run it."""


class _SparseGemms(torch.autograd.Function):
    """y = x W^T + b on the compressed W; dx on the compressed W^T when there is one (else dense);
    dW = (dy^T x) masked, dense. Everything in ``dtype`` (the GEMM dtype); gradients come back in
    the dtypes of x, W and b, as autocast's casts would give them."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, w_c, wt_c, dtype):
        x2 = x.to(dtype).reshape(-1, x.shape[-1]).contiguous()
        b = None if bias is None else bias.to(dtype)
        if x2.shape[0]:
            y = F.linear(x2, w_c, b)
        else:
            y = x2.new_empty(0, weight.shape[0])
        ctx.save_for_backward(x2, weight, mask)
        ctx.wt_c, ctx.dtype, ctx.x_shape, ctx.x_dtype = wt_c, dtype, x.shape, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mask = ctx.saved_tensors
        dy2 = dy.to(ctx.dtype).reshape(-1, dy.shape[-1]).contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if ctx.wt_c is not None and dy2.shape[0]:
                dx = F.linear(dy2, ctx.wt_c)  # dy @ (W^T)^T = dy @ W on the sparse kernels
            else:
                dx = dy2 @ weight.to(ctx.dtype)
            dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = _masked_weight_grad(dy2, x2, mask).to(weight.dtype)
        if ctx.needs_input_grad[2] and ctx.bias_dtype is not None:
            db = dy2.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None


class SemiStructuredLinear(MaskedWeightLinear):
    """``y = x @ weight.T + bias`` with ``weight`` [out, in] 2:4 sparse where the bool buffer ``mask``
    is True. On construction the mask is the 2:4 magnitude mask of the initial weight."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *, strict: bool = False
    ):
        if in_features % 4 != 0:
            raise ValueError(f"in_features={in_features} must be a multiple of 4 for 2:4 sparsity")
        super().__init__(in_features, out_features, bias, device, dtype)
        self.strict = strict
        self._warned = False
        self._compressed = None  # (key, W compressed, W^T compressed or None): see _sparse_weights
        self._transposable = None  # (mask version, mask data pointer, bool)

    # The compressor (a staticmethod so tests can count its calls).
    _compress = staticmethod(lambda w: torch.sparse.to_sparse_semi_structured(w))

    def mask_is_transposable(self) -> bool:
        """Whether ``mask`` is 2:4 along both axes (remembered until the mask is written)."""
        key = (_checks.version(self.mask), self.mask.data_ptr())
        if key[0] is None or self._transposable is None or self._transposable[0] != key:
            self._transposable = (key, is_transposable(self.mask))
        return self._transposable[1]

    @torch.no_grad()
    def _sparse_weights(self, dtype: torch.dtype):
        """(W, W^T or None) compressed in ``dtype``, made once per version of the weight: an
        optimizer step (or any in-place write) bumps ``weight._version`` and the next forward
        compresses again; within a step the forward and backward reuse them."""
        w = self.weight
        key = (_checks.version(w), w.data_ptr(), dtype, _checks.version(self.mask))
        # An inference tensor has no version (None): compress on every call rather than trust a cache.
        if None in (key[0], key[3]) or self._compressed is None or self._compressed[0] != key:
            wd = w.detach().to(dtype).contiguous()
            wt_c = None
            if (
                self.mask_is_transposable()
                and kernel_unsupported(w.device, dtype, self.in_features, self.out_features) is None
            ):
                wt_c = self._compress(wd.t().contiguous())
            self._compressed = (key, self._compress(wd), wt_c)
        return self._compressed[1], self._compressed[2]

    def _initial_mask(self) -> torch.Tensor:
        return semi_structured_mask(self.weight)

    def _check_loaded_mask(self, name: str) -> None:
        check_semi_structured_mask(name, self.mask, self.weight.shape, "weight [out_features, in_features]")

    def kernel_unsupported_reason(self) -> str | None:
        """Why the 2:4 kernels cannot run this layer where it is now (in the dtype its GEMM would run
        in here, autocast included), or None if they can."""
        why = kernel_unsupported(self.weight.device, gemm_dtype(self.weight), self.out_features, self.in_features)
        return None if why is None else why[1]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # TorchScript and torch.fx graphs run the masked product (module docstring); a strict layer
        # refuses (here under torch.fx, in __prepare_scriptable__ for TorchScript).
        if torch.jit.is_scripting():
            return masked_linear(input, self.weight, self.mask, self.bias)
        if _fx.is_proxy(input, self.weight):
            if self.strict:
                raise RuntimeError(
                    "SemiStructuredLinear(strict=True): a torch.fx graph runs the dense masked "
                    "product; trace with the layer as a leaf module to keep the 2:4 kernels"
                )
            return masked_linear(input, self.weight, self.mask, self.bias)
        dtype = gemm_dtype(self.weight)
        why = kernel_unsupported(self.weight.device, dtype, self.out_features, self.in_features)
        if why is None:
            _checks.tensor("input", input, dtypes=_checks.FLOAT_DTYPES)
            if input.dim() == 0 or input.shape[-1] != self.in_features:
                raise ValueError(f"input: expected shape [..., {self.in_features}], got {tuple(input.shape)}")
            _checks.same_device(weight=self.weight, input=input)
            if input.dtype != self.weight.dtype and not torch.is_autocast_enabled(input.device.type):
                raise TypeError(f"input: expected dtype {self.weight.dtype} (like weight), got {input.dtype}")
            w_c, wt_c = self._sparse_weights(dtype)
            return _SparseGemms.apply(input, self.weight, self.bias, self.mask, w_c, wt_c, dtype)
        exc, msg = why
        if self.strict:
            raise exc(f"SemiStructuredLinear(strict=True): {msg}")
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"SemiStructuredLinear: 2:4 sparse kernels need CUDA (sm80+) with fp16/bf16 and "
                f"tile-aligned shapes ({msg}); falling back to a dense matmul with the 2:4-masked "
                f"weight (lotus_kernels.ops.masked_linear: same result, no speed-up)",
                SemiStructuredFallbackWarning,
                stacklevel=4,
            )  # the caller of module(x)
        return masked_linear(input, self.weight, self.mask, self.bias)

    def __prepare_scriptable__(self):
        if self.strict:
            raise RuntimeError(
                "SemiStructuredLinear(strict=True): TorchScript would run the dense masked product "
                "(the 2:4 kernels are eager / torch.compile only)"
            )
        return self

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls, linear: nn.Linear, mask: torch.Tensor | None = None, *, strict: bool = False, transposable: bool = False
    ) -> SemiStructuredLinear:
        """A copy of ``linear`` pruned 2:4: by ``mask`` (bool [out, in], at most 2 True in every group
        of 4 along in_features) or, if None, by magnitude (``semi_structured_mask``; with
        ``transposable=True`` 2:4 along both axes, so the input gradient is sparse too). ``linear`` is
        left untouched; device, dtype, ``requires_grad`` and train/eval mode are kept."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        if w.shape[1] % 4 != 0:
            raise ValueError(f"linear: in_features={w.shape[1]} must be a multiple of 4 for 2:4 sparsity")
        if mask is None:
            mask = semi_structured_mask(w, transposable=transposable)
        else:
            check_semi_structured_mask("mask", mask, w.shape, "linear.weight [out_features, in_features]")
        return masked_layer_from_linear(cls, linear, mask, strict=strict)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, strict={self.strict}"

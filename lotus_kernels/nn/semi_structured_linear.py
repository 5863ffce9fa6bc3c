"""``SemiStructuredLinear``: an ``nn.Linear`` with a 2:4 sparse weight (2 of every 4 consecutive
weights along ``in_features`` kept), trained through PyTorch's semi-structured sparse kernels.

Where those kernels cannot run (CPU, a GPU older than sm80, fp32/fp64, a shape that is not a multiple
of the kernel's tile), the layer falls back to a dense matmul with the 2:4-masked weight
(``ops.masked_linear``: same result, same masked gradient, no speed-up) and says so once per layer
with a ``SemiStructuredFallbackWarning`` naming the requirement it missed; ``strict=True`` raises
instead. As in ``MaskedLinear``, ``weight`` is kept exactly zero where ``mask`` is False: set on
construction and on ``load_state_dict``, preserved by training because its gradient is zero there.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..ops.masked_linear import masked_linear
from ..ops.semi_structured_linear import (check_semi_structured_mask, kernel_unsupported, semi_structured_linear,
                                          semi_structured_mask)
from ._convert import masked_layer_from_linear
from ._masked_weight import MaskedWeightLinear


class SemiStructuredFallbackWarning(UserWarning):
    """A ``SemiStructuredLinear`` runs a dense masked matmul because the 2:4 kernels cannot run it."""


class SemiStructuredLinear(MaskedWeightLinear):
    """``y = x @ weight.T + bias`` with ``weight`` [out, in] 2:4 sparse where the bool buffer ``mask``
    is True. On construction the mask is the 2:4 magnitude mask of the initial weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 strict: bool = False):
        if in_features % 4 != 0:
            raise ValueError(f"in_features={in_features} must be a multiple of 4 for 2:4 sparsity")
        super().__init__(in_features, out_features, bias, device, dtype)
        self.strict = strict
        self._warned = False

    def _initial_mask(self) -> torch.Tensor:
        return semi_structured_mask(self.weight)

    def _check_loaded_mask(self, name: str) -> None:
        check_semi_structured_mask(name, self.mask, self.weight.shape, "weight [out_features, in_features]")

    def kernel_unsupported_reason(self) -> str | None:
        """Why the 2:4 kernels cannot run this layer where it is now, or None if they can."""
        why = kernel_unsupported(self.weight.device, self.weight.dtype, self.out_features, self.in_features)
        return None if why is None else why[1]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        why = kernel_unsupported(self.weight.device, self.weight.dtype, self.out_features, self.in_features)
        if why is None:  # dtype / device mismatches of `input` get semi_structured_linear's own errors
            return semi_structured_linear(input, self.weight, self.mask, self.bias)
        exc, msg = why
        if self.strict:
            raise exc(f"SemiStructuredLinear(strict=True): {msg}")
        if not self._warned:
            self._warned = True
            warnings.warn(f"SemiStructuredLinear: 2:4 sparse kernels need CUDA (sm80+) with fp16/bf16 and "
                          f"tile-aligned shapes ({msg}); falling back to a dense matmul with the 2:4-masked "
                          f"weight (lotus_kernels.ops.masked_linear: same result, no speed-up)",
                          SemiStructuredFallbackWarning, stacklevel=4)  # the caller of module(x)
        return masked_linear(input, self.weight, self.mask, self.bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor | None = None, *,
                    strict: bool = False) -> "SemiStructuredLinear":
        """A copy of ``linear`` pruned 2:4: by ``mask`` (bool [out, in], at most 2 True in every group
        of 4 along in_features) or, if None, by magnitude (``semi_structured_mask``). ``linear`` is
        left untouched; device, dtype, ``requires_grad`` and train/eval mode are kept."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        if w.shape[1] % 4 != 0:
            raise ValueError(f"linear: in_features={w.shape[1]} must be a multiple of 4 for 2:4 sparsity")
        if mask is None:
            mask = semi_structured_mask(w)
        else:
            check_semi_structured_mask("mask", mask, w.shape, "linear.weight [out_features, in_features]")
        return masked_layer_from_linear(cls, linear, mask, strict=strict)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, strict={self.strict}"

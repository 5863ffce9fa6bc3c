"""``MaskedLinear``: an ``nn.Linear`` with an unstructured bool pruning mask.

The invariant ``weight == 0 where mask is False`` is established when the mask is set
(``from_linear``, ``set_mask_``, ``load_state_dict``) and kept by training, because the weight's
gradient is zero there (``ops.masked_linear``). It is not re-checked per forward: that would cost a
pass over the weight every call. Writing into ``weight`` directly can break it; call
``set_mask_(layer.mask)`` afterwards to restore it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.masked_linear import check_mask, masked_linear
from ._convert import linear_from, masked_layer_from_linear


class MaskedLinear(nn.Module):
    """``y = x @ weight.T + bias`` with ``weight`` [out, in] pruned where the bool buffer ``mask``
    [out, in] is False (all True, i.e. dense, on construction)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation (kaiming-uniform, a = sqrt(5)), then the pruned weights zeroed.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)
        self._zero_pruned()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return masked_linear(input, self.weight, self.mask, self.bias)

    @torch.no_grad()
    def _zero_pruned(self) -> None:
        self.weight.masked_fill_(~self.mask, 0)

    @torch.no_grad()
    def set_mask_(self, mask: torch.Tensor) -> "MaskedLinear":
        """Replace the mask (True = keep) and zero the weights it prunes. A weight pruned before and
        kept now restarts from zero."""
        check_mask("mask", mask, self.weight.shape, "weight [out_features, in_features]")
        self.mask.copy_(mask)
        self._zero_pruned()
        return self

    @property
    def density(self) -> float:
        """Fraction of weights kept (1.0 = dense)."""
        return float(self.mask.sum()) / max(self.mask.numel(), 1)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor) -> "MaskedLinear":
        """A MaskedLinear with ``linear``'s weight (times ``mask``) and bias, copied: ``linear`` is
        left untouched. Keeps device, dtype, ``requires_grad`` and train/eval mode."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        check_mask("mask", mask, linear.weight.shape, "linear.weight [out_features, in_features]")
        return masked_layer_from_linear(cls, linear, mask)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding a copy of the masked weight and the bias."""
        return linear_from(self.weight.masked_fill(~self.mask, 0), self.bias,
                           requires_grad=self.weight.requires_grad, training=self.training)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state dict may carry nonzero weights at pruned positions (e.g. saved from a dense model,
        # or edited); re-establish the invariant once, here, instead of checking every forward.
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.mask.dtype != torch.bool:  # load_state_dict(assign=True) with a non-bool mask
            self.mask = self.mask.bool()
        self._zero_pruned()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, density={self.density:.3f}")

"""The base of ``MaskedLinear`` and ``SemiStructuredLinear``: a dense weight [out, in] kept exactly
zero where the bool buffer ``mask`` is False.

The invariant is established when the mask is set (construction, ``from_linear``,
``load_state_dict``) and kept by training, because the ops zero the weight's gradient there. It is
not re-checked per forward: that would cost a pass over the weight every call.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._convert import linear_from


class MaskedWeightLinear(nn.Module):
    # Python only: TorchScript would compile the property into the class once and fail to redefine
    # it for the next model scripted.
    __jit_unused_properties__ = ["density"]

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation (kaiming-uniform, a = sqrt(5)), then ``_initial_mask`` and the
        pruned weights zeroed."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)
        with torch.no_grad():
            self.mask.copy_(self._initial_mask())
        self._zero_pruned()

    def _initial_mask(self) -> torch.Tensor:
        return torch.ones_like(self.mask)

    def _check_loaded_mask(self, name: str) -> None:
        """Hook for layouts whose masks have a pattern to respect (2:4)."""

    @torch.no_grad()
    def _zero_pruned(self) -> None:
        self.weight.masked_fill_(~self.mask, 0)

    @property
    def density(self) -> float:
        """Fraction of weights kept (1.0 = dense)."""
        return float(self.mask.sum()) / max(self.mask.numel(), 1)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding a copy of the masked weight and the bias."""
        return linear_from(
            self.weight.masked_fill(~self.mask, 0),
            self.bias,
            requires_grad=self.weight.requires_grad,
            training=self.training,
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state dict may carry nonzero weights at pruned positions (e.g. saved from a dense model,
        # or edited); re-establish the invariant once, here, instead of checking every forward.
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.mask.dtype != torch.bool:  # load_state_dict(assign=True) with a non-bool mask
            self.mask = self.mask.bool()
        self._check_loaded_mask(f"{prefix}mask")
        self._zero_pruned()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, density={self.density:.3f}"
        )

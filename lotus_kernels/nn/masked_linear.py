"""``MaskedLinear``: an ``nn.Linear`` with an unstructured bool pruning mask.

The invariant ``weight == 0 where mask is False`` is established when the mask is set
(``from_linear``, ``set_mask_``, ``load_state_dict``) and kept by training, because the weight's
gradient is zero there (``ops.masked_linear``). It is not re-checked per forward: that would cost a
pass over the weight every call. Writing into ``weight`` directly can break it; call
``set_mask_(layer.mask)`` afterwards to restore it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.masked_linear import check_mask, masked_linear
from ._convert import masked_layer_from_linear
from ._masked_weight import MaskedWeightLinear


class MaskedLinear(MaskedWeightLinear):
    """``y = x @ weight.T + bias`` with ``weight`` [out, in] pruned where the bool buffer ``mask``
    [out, in] is False (all True, i.e. dense, on construction)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return masked_linear(input, self.weight, self.mask, self.bias)

    @torch.no_grad()
    def set_mask_(self, mask: torch.Tensor) -> MaskedLinear:
        """Replace the mask (True = keep) and zero the weights it prunes. A weight pruned before and
        kept now restarts from zero."""
        check_mask("mask", mask, self.weight.shape, "weight [out_features, in_features]")
        self.mask.copy_(mask)
        self._zero_pruned()
        return self

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor) -> MaskedLinear:
        """A MaskedLinear with ``linear``'s weight (times ``mask``) and bias, copied: ``linear`` is
        left untouched. Keeps device, dtype, ``requires_grad`` and train/eval mode."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        check_mask("mask", mask, linear.weight.shape, "linear.weight [out_features, in_features]")
        return masked_layer_from_linear(cls, linear, mask)

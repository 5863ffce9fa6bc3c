"""Conversions between ``nn.Linear`` and the sparse layers, in one place: values are copied, and
``requires_grad`` and train/eval mode follow the source layer."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def masked_layer_from_linear(cls, linear: nn.Linear, mask: torch.Tensor, **kwargs) -> nn.Module:
    """A ``cls`` (a layer with ``weight``, ``bias``, a bool ``mask`` buffer and ``_zero_pruned()``)
    holding copies of ``linear``'s weight and bias, pruned by the (already checked) ``mask``."""
    w = linear.weight
    layer = nn.utils.skip_init(
        cls,
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        device=w.device,
        dtype=w.dtype,
        **kwargs,
    )
    layer.mask.copy_(mask)
    layer.weight.copy_(w)
    layer.weight.requires_grad_(w.requires_grad)
    if linear.bias is not None:
        layer.bias.copy_(linear.bias)
        layer.bias.requires_grad_(linear.bias.requires_grad)
    layer._zero_pruned()
    return layer.train(linear.training)


@torch.no_grad()
def linear_from(weight: torch.Tensor, bias: torch.Tensor | None, *, requires_grad: bool, training: bool) -> nn.Linear:
    """A plain ``nn.Linear`` holding copies of ``weight`` [out, in] and ``bias``."""
    out_features, in_features = weight.shape
    linear = nn.utils.skip_init(
        nn.Linear, in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    linear.weight.copy_(weight)
    linear.weight.requires_grad_(requires_grad)
    if bias is not None:
        linear.bias.copy_(bias)
        linear.bias.requires_grad_(bias.requires_grad)
    return linear.train(training)

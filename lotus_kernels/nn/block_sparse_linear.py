"""``BlockSparseLinear``: an ``nn.Linear`` whose weight stores only some bs x bs blocks.

The block pattern (which blocks are stored) is fixed when the layer is built and kept as index
buffers (``crow``, ``col``, ``ccol``, ``row``, ``perm``); the stored blocks are the Parameter
``values`` [nnzb, bs, bs] and train. Blocks that are not stored are exactly zero forever: they have
no storage, so no optimizer can touch them.

``state_dict`` holds ``values``, ``bias`` and the five index buffers. Loading it into a layer with
the same pattern (e.g. a fresh ``sparsify_`` of the same model, or ``BlockSparseLinear.from_linear``
with the same mask) restores it exactly; loading one with another pattern raises (the values of
one pattern mean nothing in another), naming the layer and both block counts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.block_sparse_linear import BLOCK_SIZES, block_sparse_linear, bsr_from_dense, bsr_to_dense, check_block_size
from ._convert import linear_from

_PATTERN = ("crow", "col", "ccol", "row", "perm")


def block_norms(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """L2 norm of every bs x bs block of ``weight`` [out, in] -> [out // bs, in // bs] (fp32)."""
    o, i = weight.shape
    bs = block_size
    return weight.detach().float().reshape(o // bs, bs, i // bs, bs).square().sum((1, 3)).sqrt()


def top_blocks(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask keeping the ``keep`` highest ``scores`` (ties to the lower flat index)."""
    flat = scores.flatten()
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep > 0:
        # Stable descending sort: among equal scores the lower index comes first.
        order = torch.sort(flat, descending=True, stable=True).indices
        mask[order[:keep]] = True
    return mask.view_as(scores)


def density_block_mask(weight: torch.Tensor, block_size: int, density: float) -> torch.Tensor:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density: expected a fraction of blocks to keep in (0, 1], got {density!r}")
    scores = block_norms(weight, block_size)
    if torch.isnan(scores).any():
        raise ValueError("weight: has NaN entries; cannot rank blocks by L2 norm")
    return top_blocks(scores, round(density * scores.numel()))


def to_block_mask(mask: torch.Tensor, shape, block_size: int, name: str = "mask") -> torch.Tensor:
    """A bool mask as a block mask [out // bs, in // bs]: given as one (that shape), or elementwise
    ([out, in]: a block is kept if any of its entries is)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected a bool tensor (True = keep), got {str(mask.dtype).replace('torch.', '')}")
    o, i = shape
    bs = block_size
    if tuple(mask.shape) == (o, i):
        return mask.reshape(o // bs, bs, i // bs, bs).any(3).any(1)
    if tuple(mask.shape) == (o // bs, i // bs):
        return mask
    raise ValueError(
        f"{name}: expected an elementwise mask of shape {(o, i)} or a block mask of shape "
        f"{(o // bs, i // bs)} (block_size {bs}), got {tuple(mask.shape)}"
    )


class BlockSparseLinear(nn.Module):
    """``y = x @ W.T + bias`` with W [out, in] stored as bs x bs blocks (``block_size``); ``density``
    is the fraction of blocks kept at construction (those of largest L2 norm of nn.Linear's random
    initialisation, i.e. a random pattern). Use ``from_linear`` to sparsify a trained layer.

    torch.fx traces it as one node (see ``ops.block_sparse_linear``; timm's tracer keeps the layer
    itself as a leaf) and TorchScript scripts its forward; the properties below are Python only."""

    # Inspection helpers, not compiled by TorchScript (a compiled property is bound to the class
    # once, so the second model scripted failed with "Can't redefine method").
    __jit_unused_properties__ = ["weight", "block_mask", "density"]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        block_size: int = 32,
        density: float = 1.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_block_size(block_size, out_features, in_features, where="(out_features, in_features)")
        w = torch.empty(out_features, in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Linear's initialisation
        b = None
        if bias:
            b = torch.empty(out_features, device=device, dtype=dtype)
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0
            nn.init.uniform_(b, -bound, bound)
        self._build(w, density_block_mask(w, block_size, density), b, block_size)

    @torch.no_grad()
    def _build(self, weight, block_mask, bias, block_size) -> None:
        self.out_features, self.in_features = weight.shape
        self.block_size = block_size
        self._set(weight, block_mask)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone())

    @torch.no_grad()
    def _set(self, weight: torch.Tensor, block_mask: torch.Tensor) -> None:
        values, *pattern = bsr_from_dense(weight, block_mask, self.block_size)
        self.values = nn.Parameter(values)
        for name, t in zip(_PATTERN, pattern):
            self.register_buffer(name, t)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return block_sparse_linear(input, self.values, self.crow, self.col, self.ccol, self.row, self.perm, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight [out, in] (zeros outside the stored blocks); a new tensor, differentiable
        in ``values``. For inspection: writing into it does not change the layer."""
        return bsr_to_dense(self.values, self.crow, self.col, self.in_features)

    @property
    def block_mask(self) -> torch.Tensor:
        """Bool [out // bs, in // bs]: which blocks are stored."""
        bs = self.block_size
        mask = torch.zeros(self.out_features // bs, self.in_features // bs, dtype=torch.bool, device=self.crow.device)
        rows = torch.repeat_interleave(torch.arange(mask.shape[0], device=mask.device), self.crow.diff())
        mask[rows, self.col] = True
        return mask

    @property
    def density(self) -> float:
        """Fraction of blocks stored (1.0 = dense)."""
        total = (self.out_features // self.block_size) * (self.in_features // self.block_size)
        return self.values.shape[0] / max(total, 1)

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls, linear: nn.Linear, mask: torch.Tensor | None = None, *, block_size: int = 32, density: float | None = None
    ) -> BlockSparseLinear:
        """A BlockSparseLinear with a copy of ``linear``'s blocks and bias (``linear`` is untouched).
        Which blocks: ``mask`` (bool; a block mask [out // bs, in // bs], or an elementwise mask
        [out, in] of which a block is kept whole if any entry is), or ``density`` (keep that fraction
        of blocks, those of largest L2 norm), or neither (all blocks: dense). Keeps device, dtype,
        ``requires_grad`` and train/eval mode."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        if mask is not None and density is not None:
            raise ValueError("mask / density: give at most one of them (both decide which blocks are kept)")
        w = linear.weight
        check_block_size(block_size, *w.shape, where="linear.weight")
        if mask is not None:
            block_mask = to_block_mask(mask, w.shape, block_size).to(w.device)
        elif density is not None:
            block_mask = density_block_mask(w, block_size, density)
        else:
            block_mask = torch.ones(
                w.shape[0] // block_size, w.shape[1] // block_size, dtype=torch.bool, device=w.device
            )
        # Not skip_init: the pattern is computed from values, which a meta-device build cannot do.
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._build(w, block_mask, linear.bias, block_size)
        layer.values.requires_grad_(w.requires_grad)
        if linear.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer.train(linear.training)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` whose weight is the block-sparse weight (zeros outside the stored
        blocks) and the bias, copied."""
        return linear_from(self.weight, self.bias, requires_grad=self.values.requires_grad, training=self.training)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # The pattern is structural (it sizes ``values``): a state dict of another pattern is refused
        # with one clear message instead of torch's size mismatch or, worse, a silent adoption.
        theirs = {n: state_dict.get(prefix + n) for n in ("crow", "col")}
        if all(isinstance(t, torch.Tensor) for t in theirs.values()):
            same = all(
                t.shape == getattr(self, n).shape and torch.equal(t.to(getattr(self, n).device), getattr(self, n))
                for n, t in theirs.items()
            )
            if not same:
                error_msgs.append(
                    f"{prefix or 'BlockSparseLinear'}: the state dict's block pattern ({theirs['col'].numel()} "
                    f"stored blocks) differs from this layer's ({self.col.numel()} stored blocks); build the layer "
                    "with the same mask (e.g. sparsify_ the same model the same way) before loading"
                )
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, density={self.density:.3f}"
        )


__all__ = ["BlockSparseLinear", "BLOCK_SIZES"]

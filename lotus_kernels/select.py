"""Which patches to keep: top-k by score, or uniformly at random."""

from __future__ import annotations

import math

import torch

from . import _checks


def num_keep(n: int, keep_ratio: float) -> int:
    """k = ceil(keep_ratio * n), at least 1 (a tolerance keeps 0.7 * 10 from becoming 8)."""
    _check_ratio(keep_ratio)
    return max(1, min(n, math.ceil(keep_ratio * n - 1e-9)))


def _check_ratio(keep_ratio) -> None:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio: expected a number in (0, 1], got {keep_ratio!r}")


def select_keep(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Sorted int64 indices [B, k] of the ``k = ceil(keep_ratio * N)`` highest-scoring patches of
    each row of ``scores`` [B, N]. Ties go to the lower index, so the result is deterministic."""
    _checks.tensor("scores", scores, ndim=2)
    if not scores.is_floating_point():
        raise TypeError(f"scores: expected a floating-point tensor, got {scores.dtype}")
    if scores.shape[1] == 0:
        raise ValueError(f"scores: expected at least one patch per row, got shape {tuple(scores.shape)}")
    if not _checks.host_reads_are_free(scores.device):  # checked on the device: no host sync
        _checks.device_assert(~torch.isnan(scores).any(), "scores: contains NaN; patch scores must be finite or +-inf")
    elif torch.isnan(scores).any():
        raise ValueError("scores: contains NaN; patch scores must be finite or +-inf")
    k = num_keep(scores.shape[1], keep_ratio)
    # A stable descending sort breaks ties by position, unlike topk.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=1).values


def random_keep(batch: int, n: int, keep_ratio: float, *, device=None, generator=None) -> torch.Tensor:
    """Sorted indices [batch, k] of a uniformly random subset of ``k = ceil(keep_ratio * n)`` patches."""
    k = num_keep(n, keep_ratio)
    noise = torch.rand(batch, n, device=device, generator=generator)
    return noise.topk(k, dim=1).indices.sort(dim=1).values

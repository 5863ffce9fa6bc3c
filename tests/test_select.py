import math

import pytest
import torch

from lotus_kernels import select_keep
from lotus_kernels.select import num_keep, random_keep


@pytest.mark.parametrize("n,r", [(196, 0.9), (196, 0.5), (196, 0.7), (10, 0.7), (64, 0.1), (7, 1.0), (5, 1e-6)])
def test_k_is_ceil_of_ratio_times_n_at_least_one(n, r):
    k = num_keep(n, r)
    assert k == max(1, min(n, math.ceil(round(r * n, 9))))
    assert select_keep(torch.randn(3, n), r).shape == (3, k)


def test_keeps_the_top_scores_sorted():
    scores = torch.randn(4, 50)
    idx = select_keep(scores, 0.3)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, idx.sort(1).values)
    kept = scores.gather(1, idx)
    dropped_mask = torch.ones_like(scores, dtype=torch.bool).scatter_(1, idx, False)
    for b in range(4):
        assert kept[b].min() >= scores[b][dropped_mask[b]].max()


def test_ties_go_to_the_lower_index():
    assert select_keep(torch.zeros(1, 6), 0.5).tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("r", [0, -0.1, 1.01, float("nan"), "0.5", None, True])
def test_keep_ratio_outside_unit_interval_is_refused(r):
    with pytest.raises(ValueError, match="keep_ratio: expected a number in \\(0, 1\\]"):
        select_keep(torch.randn(2, 8), r)


@pytest.mark.parametrize(
    "scores,exc,match",
    [
        (torch.randn(8), ValueError, "scores: expected a 2-D tensor, got 1-D"),
        (torch.ones(2, 8, dtype=torch.long), TypeError, "scores: expected a floating-point tensor"),
        (torch.randn(2, 0), ValueError, "scores: expected at least one patch per row"),
        (torch.tensor([[0.0, float("nan")]]), ValueError, "scores: contains NaN"),
    ],
)
def test_bad_scores_are_refused(scores, exc, match):
    with pytest.raises(exc, match=match):
        select_keep(scores, 0.5)


def test_random_keep_is_a_sorted_subset_without_repeats():
    idx = random_keep(16, 196, 0.5)
    assert idx.shape == (16, 98)
    assert all(len(set(row.tolist())) == 98 for row in idx)
    assert torch.equal(idx, idx.sort(1).values) and idx.min() >= 0 and idx.max() < 196

import math

import pytest
import torch

from lotus.stats import describe, mcnemar, paired_bootstrap, summary, verdict


def _pair(n01, n10, n11, n00):
    """Correctness vectors with n01 images only a gets right, n10 only b, n11 both, n00 neither."""
    a = torch.tensor([1] * n01 + [0] * n10 + [1] * n11 + [0] * n00, dtype=torch.bool)
    b = torch.tensor([0] * n01 + [1] * n10 + [1] * n11 + [0] * n00, dtype=torch.bool)
    return a, b


def test_mcnemar_known_example():
    # 10 images only a gets right, 2 only b: exact p = 2 * P(Binomial(12, 1/2) <= 2) = 2 * 79 / 4096
    a, b = _pair(10, 2, 50, 38)
    r = mcnemar(a, b)
    assert (r["a_only"], r["b_only"]) == (10, 2)
    assert r["p"] == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar(b, a)["p"] == pytest.approx(r["p"])  # symmetric
    assert mcnemar(a, a)["p"] == 1.0  # no discordant image
    assert mcnemar(*_pair(3, 3, 10, 0))["p"] == 1.0  # balanced: capped at 1
    with pytest.raises(ValueError, match="same length"):
        mcnemar(a, b[:-1])


def test_paired_bootstrap_known_example():
    a, b = _pair(10, 2, 50, 38)  # 100 images: a is 8 points better
    r = paired_bootstrap(a, b, n_boot=4000, seed=1)
    assert r["diff"] == pytest.approx(8.0)
    # the bootstrap SD of a mean of 100 paired differences in {-1, 0, 1}: sqrt(var / n)
    d = a.double() - b.double()
    se = 100 * float(d.std(unbiased=False)) / math.sqrt(100)
    assert r["lo"] == pytest.approx(8.0 - 1.96 * se, abs=1.2)
    assert r["hi"] == pytest.approx(8.0 + 1.96 * se, abs=1.2)
    assert r["lo"] > 0 and verdict(r) == "significant" and r["p"] < 0.05
    same = paired_bootstrap(a, a)
    assert same["diff"] == same["lo"] == same["hi"] == 0.0 and verdict(same) == "not significant"
    tie = paired_bootstrap(*_pair(5, 5, 40, 50))
    assert tie["diff"] == 0 and tie["lo"] < 0 < tie["hi"] and "not significant" in describe(tie)


def test_paired_bootstrap_over_seeds():
    # two seeds: +10 points on seed 0, -10 on seed 1: mean 0, and resampling seeds widens the interval
    a0, b0 = _pair(10, 0, 45, 45)
    a1, b1 = _pair(0, 10, 45, 45)
    r = paired_bootstrap(torch.stack([a0, a1]), torch.stack([b0, b1]), seed=0)
    assert r["diff"] == pytest.approx(0.0) and r["seeds"] == 2 and r["n"] == 100
    assert r["lo"] <= -5 and r["hi"] >= 5
    with pytest.raises(ValueError, match="same"):
        paired_bootstrap(torch.stack([a0, a1]), b0)


def test_summary_known_values():
    s = summary([40.0, 42.0, 44.0])
    assert s["mean"] == pytest.approx(42.0) and s["sd"] == pytest.approx(2.0)
    half = 4.303 * 2.0 / math.sqrt(3)  # t(0.975, 2 df)
    assert (s["lo"], s["hi"]) == (pytest.approx(42 - half), pytest.approx(42 + half))
    one = summary([50.0])
    assert one["mean"] == 50.0 and one["sd"] is None and one["lo"] is None
    with pytest.raises(ValueError):
        summary([])

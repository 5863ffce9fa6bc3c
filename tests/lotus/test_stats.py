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
    half = 4.30265 * 2.0 / math.sqrt(3)  # t(0.975, 2 df)
    assert (s["lo"], s["hi"]) == (pytest.approx(42 - half, abs=1e-4), pytest.approx(42 + half, abs=1e-4))
    one = summary([50.0])
    assert one["mean"] == 50.0 and one["sd"] is None and one["lo"] is None
    with pytest.raises(ValueError):
        summary([])


def test_student_t_against_tables():
    from lotus.stats import t_cdf, t_ppf

    # two-sided 95% and one-sided 95% quantiles from any t table
    for df, q975, q95 in (
        (1, 12.706, 6.314),
        (2, 4.303, 2.920),
        (4, 2.776, 2.132),
        (10, 2.228, 1.812),
        (30, 2.042, 1.697),
    ):
        assert t_ppf(0.975, df) == pytest.approx(q975, abs=1e-3)
        assert t_ppf(0.95, df) == pytest.approx(q95, abs=1e-3)
    assert t_cdf(0.0, 3) == pytest.approx(0.5)
    assert t_cdf(2.0, 5) == pytest.approx(0.94903, abs=1e-5) and t_cdf(-2.0, 5) == pytest.approx(0.05097, abs=1e-5)


def test_seed_t_interval_known_example():
    from lotus.stats import seed_t, t_interval

    # per-seed differences 1, 2, 3, 4, 5 points: mean 3, SD sqrt(2.5), SE sqrt(0.5), t(0.975, 4) = 2.7764
    r = t_interval([1, 2, 3, 4, 5])
    se = math.sqrt(0.5)
    assert r["diff"] == 3 and r["se"] == pytest.approx(se) and r["df"] == 4
    assert (r["lo"], r["hi"]) == (pytest.approx(3 - 2.7764 * se, abs=1e-4), pytest.approx(3 + 2.7764 * se, abs=1e-4))
    assert r["lower"] == pytest.approx(3 - 2.1318 * se, abs=1e-4)  # one-sided 95%: t(0.95, 4)
    assert r["p"] == pytest.approx(0.01324, abs=1e-4)  # two-sided, t = 3 / sqrt(0.5) = 4.243 on 4 df
    assert t_interval([2.0]) is None
    # from per-image correctness: seed s of a is right on 50 + s of 100 images, b on 50
    b = torch.zeros(3, 100, dtype=torch.bool)
    b[:, :50] = True
    a = b.clone()
    for s, extra in enumerate((1, 3, 5)):
        a[s, 50 : 50 + extra] = True
    r = seed_t(a, b)
    assert r["diff"] == pytest.approx(3.0) and r["se"] == pytest.approx(2 / math.sqrt(3))


def test_compare_reports_the_wider_interval():
    from lotus.stats import compare

    # 3 seeds that disagree (+8, 0, -2 points): the seed t interval is far wider than the bootstrap's
    a, b = torch.zeros(3, 200, dtype=torch.bool), torch.zeros(3, 200, dtype=torch.bool)
    b[:, :100] = True
    a[:, :100] = True
    a[0, 100:116] = True
    a[2, :4] = False
    r = compare(a, b)
    t, boot = r["t"], r["bootstrap"]
    assert t["hi"] - t["lo"] > boot["hi"] - boot["lo"] and (r["lo"], r["hi"]) == (t["lo"], t["hi"])
    assert r["p"] == max(t["p"], boot["p"]) and r["lower"] == min(t["lower"], boot["lower"])
    one = compare(a[:1], b[:1])  # one seed: the bootstrap alone
    assert one["t"] is None and (one["lo"], one["hi"]) == (one["bootstrap"]["lo"], one["bootstrap"]["hi"])


def test_holm_known_example():
    from lotus.stats import holm

    # sorted p: 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> the running max 0.06)
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert holm({"x": 0.6, "y": 0.5}) == pytest.approx({"y": 1.0, "x": 1.0})  # capped at 1
    assert holm({}) == {}


def test_p_values_are_never_printed_as_zero():
    from lotus.stats import fmt_p

    a, b = _pair(60, 0, 40, 0)
    r = paired_bootstrap(a, b)
    assert r["p"] == 0.0 and fmt_p(r["p"]) == "< 0.001" and "p < 0.001" in describe(r)
    assert fmt_p(0.0123) == "0.012" and fmt_p(1.0) == "1.000"
    assert "Holm 0.500" in describe(paired_bootstrap(*_pair(5, 5, 40, 50)), p_adjusted=0.5)

"""Statistics for comparing models on the same images: per-seed summaries, paired tests, intervals.

Every comparison in the report is *paired*: two models are evaluated on the same held-out images,
and fine-tuning arms run the same seeds (same data order), so the per-image differences carry the
signal and the shared difficulty of the images cancels.

  mcnemar(a, b)              exact McNemar test on one pair of per-image correctness vectors
  paired_bootstrap(a, b)     mean difference of accuracy (points) with a 95% percentile interval and a
                             one-sided 95% lower bound, resampling seeds and then images (two levels)
  seed_t(a, b)               the same difference as a Student t interval over the per-seed differences
                             (the seeds are the independent replicates; with few seeds this is wider)
  compare(a, b)              both, and the *wider* of the two as the comparison's interval, the larger
                             p and the lower one-sided bound (what the report states)
  holm(p)                    Holm's step-down adjustment of a family of p-values
  summary(acc_per_seed)      mean, SD (n - 1) and a 95% t interval over seeds
  fmt_p(p)                   "0.012", or "< 0.001" (a bootstrap p is never exactly 0)
"""

from __future__ import annotations

import math
import statistics

import torch

LEVEL = 0.95


# ---------------------------------------------------------------- Student t (no scipy)
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df: expected > 0, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (bisection on ``t_cdf``)."""
    if not 0 < q < 1:
        raise ValueError(f"q: expected a probability in (0, 1), got {q}")
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return (lo + hi) / 2.0


# ---------------------------------------------------------------- inputs
def _as_matrix(x, name: str) -> torch.Tensor:
    """Per-image correctness as bool [seeds, images] (a 1-D vector is one seed)."""
    t = torch.as_tensor(x)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[1] == 0:
        raise ValueError(
            f"{name}: expected per-image correctness [images] or [seeds, images], got shape {tuple(t.shape)}"
        )
    return t.bool()


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a / b: expected the same [seeds, images] shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


# ---------------------------------------------------------------- tests
def mcnemar(a, b) -> dict:
    """Exact two-sided McNemar test of two models' per-image correctness ``a``, ``b`` (bool [N]).

    Only discordant images count: ``b01`` = a right / b wrong, ``b10`` = a wrong / b right. Under
    H0 (same accuracy) b01 ~ Binomial(b01 + b10, 1/2); p = 2 * P(X <= min(b01, b10)), capped at 1."""
    a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
    if a.shape != b.shape or a.shape[0] != 1:
        raise ValueError(f"a / b: expected two vectors of the same length, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a[0], b[0]
    n01 = int((a & ~b).sum())
    n10 = int((~a & b).sum())
    n = n01 + n10
    k = min(n01, n10)
    p = 1.0 if n == 0 else min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n)
    return {"a_only": n01, "b_only": n10, "p": p}


def paired_bootstrap(a, b, *, n_boot: int = 2000, seed: int = 0, level: float = LEVEL) -> dict:
    """Accuracy difference a - b in points, paired per image (and per seed).

    ``a``, ``b``: bool [seeds, images] correctness of two arms on the same images, row s of each from
    the same seed. Each replicate resamples seeds with replacement (when there are several), then
    images with replacement, and takes the mean difference; the interval is the percentile interval,
    ``lower`` the one-sided ``level`` lower bound. ``p`` is the two-sided bootstrap p-value (twice the
    smaller tail around 0; its resolution is 2 / n_boot)."""
    a, b = _pair(a, b)
    d = a.double() - b.double()  # [S, N] in {-1, 0, 1}
    s, n = d.shape
    g = torch.Generator().manual_seed(seed)
    # per replicate: mean over resampled seeds of the mean over resampled images, in chunks (all
    # replicates at once would hold n_boot * S * N indices)
    boot = torch.empty(n_boot, dtype=torch.float64)
    for i in range(0, n_boot, 100):
        m = min(100, n_boot - i)
        rows = torch.randint(0, s, (m, s), generator=g)
        cols = torch.randint(0, n, (m, n), generator=g)
        boot[i : i + m] = d[rows].gather(2, cols[:, None, :].expand(-1, s, -1)).mean((1, 2)) * 100.0
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2, 1 - level], dtype=boot.dtype)
    lo, hi, lower = torch.quantile(boot, q).tolist()
    diff = float(d.mean()) * 100.0
    p = min(1.0, 2.0 * min(float((boot <= 0).double().mean()), float((boot >= 0).double().mean())))
    return {"diff": diff, "lo": lo, "hi": hi, "lower": lower, "p": p, "seeds": s, "n": n, "method": "bootstrap"}


def seed_t(a, b, *, level: float = LEVEL) -> dict | None:
    """Student t interval of the mean per-seed accuracy difference a - b (points), df = seeds - 1:
    the seeds are the independent replicates of a fine-tuning run. None with one seed."""
    a, b = _pair(a, b)
    per_seed = (a.double().mean(1) - b.double().mean(1)) * 100.0
    return t_interval(per_seed.tolist(), level=level)


def t_interval(values, *, level: float = LEVEL) -> dict | None:
    """Mean of ``values`` with its two-sided Student t interval, one-sided lower bound and the
    two-sided p of "mean = 0". None for fewer than 2 values."""
    v = [float(x) for x in values]
    if len(v) < 2:
        return None
    df = len(v) - 1
    mean = statistics.fmean(v)
    se = statistics.stdev(v) / math.sqrt(len(v))
    two, one = t_ppf(1 - (1 - level) / 2, df), t_ppf(level, df)
    if se == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = 2.0 * (1.0 - t_cdf(abs(mean) / se, df))
    return {
        "diff": mean,
        "lo": mean - two * se,
        "hi": mean + two * se,
        "lower": mean - one * se,
        "p": p,
        "seeds": len(v),
        "se": se,
        "df": df,
        "method": "seed t",
    }


def compare(a, b, *, seed: int = 0) -> dict:
    """A paired comparison as the report states it: the bootstrap and (with >= 2 seeds) the seed-level
    t interval; ``lo`` / ``hi`` from the wider of the two, ``p`` the larger, ``lower`` (one-sided 95%
    lower bound) the smaller."""
    boot = paired_bootstrap(a, b, seed=seed)
    t = seed_t(a, b)
    out = dict(boot, bootstrap={k: boot[k] for k in ("lo", "hi", "lower", "p")}, t=None)
    if t is not None:
        out["t"] = {k: t[k] for k in ("lo", "hi", "lower", "p", "se", "df")}
        if t["hi"] - t["lo"] > boot["hi"] - boot["lo"]:
            out.update(lo=t["lo"], hi=t["hi"], method="seed t")
        out.update(p=max(boot["p"], t["p"]), lower=min(boot["lower"], t["lower"]))
    return out


def holm(pvalues: dict, alpha: float = 0.05) -> dict:
    """Holm's step-down adjusted p-values of a family {name: p}: sort ascending, multiply the i-th
    smallest (0-based) by (m - i), carry the running maximum, cap at 1."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    m = len(order)
    out, running = {}, 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[k]))
        out[k] = running
    return out


def summary(values) -> dict:
    """Mean, sample SD and a 95% t interval of per-seed accuracies (SD and interval None for 1 seed)."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("values: expected at least one accuracy")
    mean = statistics.fmean(v)
    if len(v) < 2:
        return {"mean": mean, "sd": None, "lo": None, "hi": None, "n": 1}
    sd = statistics.stdev(v)
    half = t_ppf(1 - (1 - LEVEL) / 2, len(v) - 1) * sd / math.sqrt(len(v))
    return {"mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half, "n": len(v)}


# ---------------------------------------------------------------- wording
def fmt_p(p: float | None) -> str:
    if p is None:
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def verdict(diff: dict, p_adjusted: float | None = None, alpha: float = 0.05) -> str:
    """'significant' when the interval excludes 0 (and, given, the Holm-adjusted p is below alpha)."""
    if diff["lo"] <= 0 <= diff["hi"]:
        return "not significant"
    if p_adjusted is not None and p_adjusted >= alpha:
        return "not significant after Holm"
    return "significant"


def describe(diff: dict, unit: str = "points", p_adjusted: float | None = None) -> str:
    """'+1.23 points [95% CI -0.40, +2.90], p = 0.140 (Holm 0.840), not significant'."""
    holm_txt = "" if p_adjusted is None else f" (Holm {fmt_p(p_adjusted)})"
    return (
        f"{diff['diff']:+.2f} {unit} [95% CI {diff['lo']:+.2f}, {diff['hi']:+.2f}], p {_p_eq(diff['p'])}"
        f"{holm_txt}, {verdict(diff, p_adjusted)}"
    )


def _p_eq(p: float) -> str:
    s = fmt_p(p)
    return s if s.startswith("<") else f"= {s}"

"""Statistics for comparing models on the same images: per-seed summaries, paired tests, intervals.

Every comparison in the report is *paired*: two models are evaluated on the same held-out images,
and fine-tuning arms run the same seeds (same data order), so the per-image differences carry the
signal and the shared difficulty of the images cancels.

  mcnemar(a, b)              exact McNemar test on one pair of per-image correctness vectors
  paired_bootstrap(a, b)     mean difference of accuracy (points) with a 95% percentile interval,
                             resampling images and, with several seeds, seeds too (two levels)
  summary(acc_per_seed)      mean, SD (n - 1) and a 95% t interval over seeds
  verdict(diff)              "significant" only when the interval excludes 0
"""
from __future__ import annotations

import math
import statistics

import torch

# Two-sided 97.5% Student t quantiles for 1..30 degrees of freedom (avoids scipy).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def _as_matrix(x, name: str) -> torch.Tensor:
    """Per-image correctness as bool [seeds, images] (a 1-D vector is one seed)."""
    t = torch.as_tensor(x)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[1] == 0:
        raise ValueError(f"{name}: expected per-image correctness [images] or [seeds, images], got shape "
                         f"{tuple(t.shape)}")
    return t.bool()


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
    p = 1.0 if n == 0 else min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n)
    return {"a_only": n01, "b_only": n10, "p": p}


def paired_bootstrap(a, b, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Accuracy difference a - b in points, paired per image (and per seed).

    ``a``, ``b``: bool [seeds, images] correctness of two arms on the same images, row s of each from
    the same seed. Each replicate resamples seeds with replacement (when there are several), then
    images with replacement, and takes the mean difference; the interval is the percentile interval.
    ``p`` is the two-sided bootstrap p-value (twice the smaller tail around 0)."""
    a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a / b: expected the same [seeds, images] shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    d = (a.double() - b.double())  # [S, N] in {-1, 0, 1}
    s, n = d.shape
    g = torch.Generator().manual_seed(seed)
    # per replicate: mean over resampled seeds of the mean over resampled images, in chunks (all
    # replicates at once would hold n_boot * S * N indices)
    boot = torch.empty(n_boot, dtype=torch.float64)
    for i in range(0, n_boot, 100):
        m = min(100, n_boot - i)
        rows = torch.randint(0, s, (m, s), generator=g)
        cols = torch.randint(0, n, (m, n), generator=g)
        boot[i:i + m] = d[rows].gather(2, cols[:, None, :].expand(-1, s, -1)).mean((1, 2)) * 100.0
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    lo, hi = torch.quantile(boot, torch.tensor([lo_q, hi_q], dtype=boot.dtype)).tolist()
    diff = float(d.mean()) * 100.0
    p = min(1.0, 2.0 * min(float((boot <= 0).double().mean()), float((boot >= 0).double().mean())))
    return {"diff": diff, "lo": lo, "hi": hi, "p": p, "seeds": s, "n": n}


def summary(values) -> dict:
    """Mean, sample SD and a 95% t interval of per-seed accuracies (SD and interval None for 1 seed)."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("values: expected at least one accuracy")
    mean = statistics.fmean(v)
    if len(v) < 2:
        return {"mean": mean, "sd": None, "lo": None, "hi": None, "n": 1}
    sd = statistics.stdev(v)
    t = _T975[min(len(v) - 1, len(_T975)) - 1]
    half = t * sd / math.sqrt(len(v))
    return {"mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half, "n": len(v)}


def verdict(diff: dict) -> str:
    """'significant' when the 95% interval of a difference excludes 0, else 'not significant'."""
    return "not significant" if diff["lo"] <= 0 <= diff["hi"] else "significant"


def describe(diff: dict, unit: str = "points") -> str:
    """'+1.23 points [95% CI -0.40, +2.90], p = 0.14, not significant'."""
    return (f"{diff['diff']:+.2f} {unit} [95% CI {diff['lo']:+.2f}, {diff['hi']:+.2f}], p = {diff['p']:.3g}, "
            f"{verdict(diff)}")

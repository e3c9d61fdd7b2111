"""Statistics for comparing ablation variants with the baseline over seeds.

Pure functions on numbers, no I/O, so that every figure the report prints can be checked
against scipy in a test. Seeds are the unit of replication: a variant's values are its
cells' lowest validation losses, one per seed. Differences are paired by seed when the
variant and the baseline share at least two seeds (the same seed fixes the data split
and initialisation noise they share); otherwise Welch's t-test compares the two groups.
Holm's step-down method corrects the p-values for the number of variants compared.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95  # level of every interval in the report
ALPHA = 0.05  # significance level, applied to Holm-corrected p-values
POWER = 0.8  # power targeted when estimating how many seeds a comparison needs
MIN_SEEDS = 3  # the fewest paired seeds we recommend, whatever the estimate says
PAIRED, WELCH = "paired t", "Welch t"


@dataclass(frozen=True)
class Interval:
    """Mean of a sample with its standard deviation and t-interval (NaN where undefined)."""
    n: int  # finite values used
    mean: float
    std: float  # sample standard deviation (ddof=1); NaN when n < 2
    low: float  # lower end of the t-interval; NaN when n < 2
    high: float


@dataclass(frozen=True)
class Comparison:
    """A variant's best validation loss against the baseline's (variant - baseline)."""
    test: str  # PAIRED, WELCH, or "" when neither is possible
    n_pairs: int  # seeds shared with the baseline
    diff: float  # mean paired difference, or difference of means
    low: float  # t-interval of diff; NaN without a test
    high: float
    p: float  # two-sided p-value, uncorrected; NaN without a test


def _finite(values: Sequence[float] | pd.Series) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    return x[np.isfinite(x)]


def t_interval(values: Sequence[float] | pd.Series, confidence: float = CONFIDENCE) -> Interval:
    """Mean, std and Student-t interval of the finite values."""
    x = _finite(values)
    n = len(x)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Interval(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Interval(n, mean, std, mean - half, mean + half)


def compare_to_baseline(variant: pd.Series, baseline: pd.Series,
                        confidence: float = CONFIDENCE) -> Comparison:
    """Compare two Series of best validation losses indexed by seed (NaNs ignored).

    Paired t-test over the shared seeds when there are at least two; Welch's t-test
    when both sides have at least two values; otherwise no test (diff of means only).
    """
    v, b = variant.dropna(), baseline.dropna()
    shared = v.index.intersection(b.index)
    if len(shared) >= 2:
        test, res = PAIRED, stats.ttest_rel(v[shared], b[shared])
        diff = float((v[shared] - b[shared]).mean())
    elif len(v) >= 2 and len(b) >= 2:
        test, res = WELCH, stats.ttest_ind(v, b, equal_var=False)
        diff = float(v.mean() - b.mean())
    else:
        diff = float(v.mean() - b.mean()) if len(v) and len(b) else math.nan
        return Comparison("", len(shared), diff, math.nan, math.nan, math.nan)
    if math.isnan(res.pvalue) and diff == 0:  # identical values: nothing to detect
        return Comparison(test, len(shared), 0.0, 0.0, 0.0, 1.0)
    ci = res.confidence_interval(confidence)
    return Comparison(test, len(shared), diff, float(ci.low), float(ci.high), float(res.pvalue))


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (monotone step-down, capped at 1); NaNs stay NaN
    and do not count as comparisons."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = len(idx)
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def verdict(comparison: Comparison, p_holm: float, alpha: float = ALPHA) -> str:
    """'better' / 'worse' (a lower loss is better) / 'no significant difference', or why
    no verdict is possible."""
    if not comparison.test:
        return "n/a (1 seed)" if np.isfinite(comparison.diff) else "n/a (no finished cell)"
    if p_holm < alpha and comparison.diff < 0:
        return "better"
    if p_holm < alpha and comparison.diff > 0:
        return "worse"
    return "no significant difference"


def pooled_std(groups: Sequence[Sequence[float]]) -> float:
    """Within-group standard deviation pooled over the groups with >= 2 finite values
    (the seed-to-seed spread of the study); NaN when no group has two."""
    xs = [x for x in map(_finite, groups) if len(x) >= 2]
    dof = sum(len(x) - 1 for x in xs)
    if dof == 0:
        return math.nan
    return math.sqrt(sum(((x - x.mean()) ** 2).sum() for x in xs) / dof)


def seeds_needed(diff: float, sd_diff: float, alpha: float = ALPHA, power: float = POWER,
                 max_n: int = 100) -> int | None:
    """Fewest paired seeds (>= MIN_SEEDS) for a two-sided paired t-test at level alpha to
    detect a true difference `diff` with the given power, when paired differences have
    standard deviation sd_diff. None when more than max_n would be needed (or diff is 0)."""
    if not (np.isfinite(diff) and np.isfinite(sd_diff)):
        raise ValueError(f"seeds_needed needs a finite difference and spread, got {diff}, {sd_diff}")
    if diff == 0:
        return None
    if sd_diff == 0:
        return MIN_SEEDS
    effect = abs(diff) / sd_diff
    for n in range(max(2, MIN_SEEDS), max_n + 1):
        df, nc = n - 1, effect * math.sqrt(n)
        crit = stats.t.ppf(1 - alpha / 2, df)
        achieved = stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)
        if achieved >= power:
            return n
    return None


"""An independent reference for the verdicts' numbers (stats.decide), for the tests: the shared
variance from statsmodels' OLS of value ~ C(variant) + C(seed), the spending from scipy's normal
distribution, and the bounds written out from stats.METHOD's words, not from stats' code."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from scipy import stats as sps


def spent(alpha: float, plan: list[int], look: int) -> float:
    """alpha_k: Lan-DeMets O'Brien-Fleming-type spending, increments of 2 - 2 Phi(z / sqrt(t))."""
    cumulative = [2 * sps.norm.sf(sps.norm.ppf(1 - alpha / 2) / math.sqrt(n / plan[-1])) for n in plan]
    cumulative[-1] = alpha
    return cumulative[look] - (cumulative[look - 1] if look else 0.0)


@dataclass
class Reference:
    low: float
    high: float
    eq_low: float
    eq_high: float
    variance: str
    df: float
    within: bool  # both one-sided tests inside the margin
    verdict: str  # lower is better
    shared_se: float  # standard error of the mean difference under the shared model


def shared(values: dict[str, dict[int, float]]) -> tuple[float, float]:
    """Residual variance and its df of value ~ variant + seed (statsmodels OLS)."""
    return _fit(tuple((v, str(s), y) for v, by_seed in values.items() for s, y in by_seed.items()))


@functools.lru_cache(maxsize=1024)
def _fit(rows: tuple[tuple[str, str, float], ...]) -> tuple[float, float]:
    """One fit per set of values: reference() fits the same study without each candidate outlier
    once per variant it is asked about (11 variants: 132 fits, 12 of them different)."""
    fit = smf.ols("y ~ C(variant) + C(seed)", pd.DataFrame(rows, columns=["variant", "seed", "y"])).fit()
    return float(fit.scale), float(fit.df_resid)


def outliers(values: dict[str, dict[int, float]], baseline: str = "baseline") -> set[str]:
    """Variants whose own paired variance exceeds twice the residual variance of the fit without
    them by an F-test at 1% (4 paired seeds or more): the shared variance leaves them out."""
    out = set()
    for v in values:
        seeds = sorted(set(values[v]) & set(values[baseline]))
        if v == baseline or len(seeds) < 4:
            continue
        d = np.array([values[v][s] - values[baseline][s] for s in seeds])
        var, df = shared({u: ys for u, ys in values.items() if u != v})
        if d.var(ddof=1) / (2 * var) > sps.f.isf(0.01, len(d) - 1, df):
            out.add(v)
    return out


def reference(values: dict[str, dict[int, float]], variant: str, a: float, margin: float,
              baseline: str = "baseline", relative: bool = False) -> Reference:
    """The variant's 1 - a interval (better/worse) and 1 - 2a interval (equivalence) from every
    finite value known at the look (but the outliers'), with the guards: its own paired spread beyond the shared one's
    F-test at 10% (from 4 paired seeds on) means the wider of the two; never narrower than its own
    paired t at 98% (one-sided 1% and 2%), or at the test's own level when that is laxer. A relative
    margin tests y - (1 + r) y0 < 0 and y - (1 - r) y0 > 0 per seed (r = margin, baseline > 0)."""
    pooled = {v: ys for v, ys in values.items() if v not in outliers(values, baseline)}
    var, df = shared(pooled)
    seeds = sorted(set(values[variant]) & set(values[baseline]))
    y, y0 = (np.array([values[v][s] for s in seeds]) for v in (variant, baseline))
    d = y - y0
    n, mean = len(d), d.mean()
    large = n >= 4 and d.var(ddof=1) / (2 * var) > sps.f.isf(0.10, n - 1, df)

    def half(c: np.ndarray, weight: float, one_sided: float, guard: float) -> float:
        own_se = c.std(ddof=1) / math.sqrt(n)
        halves = [sps.t.isf(max(guard, one_sided), n - 1) * own_se,
                  sps.t.isf(one_sided, df) * math.sqrt(weight * var / n)]
        if large:
            halves.append(sps.t.isf(one_sided, n - 1) * own_se)
        return max(halves)

    h2, h1 = half(d, 2, a / 2, 0.01), half(d, 2, a, 0.02)
    if relative:
        up, down = y - (1 + margin) * y0, y - (1 - margin) * y0
        within = (up.mean() + half(up, 1 + (1 + margin) ** 2, a, 0.02) < 0
                  and down.mean() - half(down, 1 + (1 - margin) ** 2, a, 0.02) > 0)
    else:
        within = -margin < mean - h1 and mean + h1 < margin
    verdict = ("better" if mean + h2 < 0 else "worse" if mean - h2 > 0 else "equivalent" if within else "undecided")
    return Reference(mean - h2, mean + h2, mean - h1, mean + h1, "own" if large else "shared", df, bool(within),
                     verdict, math.sqrt(2 * var / n))

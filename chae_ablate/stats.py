"""Statistics for comparing ablation variants with the baseline over seeds.

Pure functions on numbers, no I/O, so that every figure the report prints can be checked
against scipy and statsmodels in a test. Seeds are the unit of replication: a variant's values
are its cells' metric (by default the lowest validation loss), one per seed, and differences are
paired by seed (the same seed fixes the initialisation and data-order noise they share).

The decisive verdicts (decide, looks, simulate; METHOD says it in words) replace
"no significant difference" with better / worse / equivalent / undecided against a declared margin,
valid for the whole study across adaptive rounds of seeds. References: Dunn (1961) Multiple
comparisons among means, JASA 56:52-64; Jennison & Turnbull (1989) Interim analyses: the repeated
confidence interval approach, JRSS B 51:305-361; Schuirmann (1987) A comparison of the two
one-sided tests procedure..., J Pharmacokin Biopharm 15:657-680; Holm (1979) Scand J Stat
6:65-70; Cohen (1988) Statistical Power Analysis for the Behavioral Sciences, ch. 2; Efron &
Tibshirani (1993) An Introduction to the Bootstrap, ch. 13; Bouthillier et al. (2021) Accounting
for variance in machine learning benchmarks, MLSys.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import optimize, stats

from .records import DECISIONS, Verdict

CONFIDENCE = 0.95  # level of the descriptive interval of each variant's mean
ALPHA = 0.05  # default family-wise error rate of the verdicts
POWER = 0.8  # power targeted when stating the difference an undecided comparison could detect


@dataclass(frozen=True)
class Interval:
    """Mean of a sample with its standard deviation and t-interval (NaN where undefined)."""
    n: int  # finite values used
    mean: float
    std: float  # sample standard deviation (ddof=1); NaN when n < 2
    low: float  # lower end of the t-interval; NaN when n < 2
    high: float


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


# Student t-interval at confidence 1 - alpha / (m * K) for the study's m variants and K planned
# looks; by the union (Bonferroni) bound all m * K intervals cover their true differences at once
# with probability >= 1 - alpha. Every verdict is read off its interval, and a verdict can only be
# wrong when its interval misses the true difference, so the chance of any wrong verdict in the
# study, over every look and whatever the stopping, is <= alpha. Holm's step-down is not used on
# purpose: it is valid when a rejection is wrong only for a true null, but here every variant's
# interval can miss (an "equivalent" variant can still be wrongly called better at a laxer later
# Holm level), so reading verdicts off Holm-level intervals loses the guarantee
# (benchmarks/power.py measures by how much).

N_BOOT = 9999  # bootstrap resamples

METHOD = (
    "Paired differences (variant - baseline, same seed). Every interval is a Student t-interval of "
    "the mean difference at confidence 1 - alpha/(m K): m variants, K looks planned in advance; "
    "simultaneous Bonferroni intervals over variants and looks (Dunn 1961), the simplest repeated "
    "confidence intervals (Jennison & Turnbull 1989). Verdicts are read off the interval: better or "
    "worse when it excludes 0, equivalent when it lies inside +-margin (two one-sided tests, "
    "Schuirmann 1987, each at alpha/(2 m K)), otherwise undecided with the difference these seeds "
    "could detect with 80% power. Undecided variants get more seeds at the next planned look; "
    "decided ones stop. Since all m K intervals cover their true differences together with "
    "probability >= 1 - alpha, the chance of any wrong verdict in the study, at any look, is at most "
    "alpha. Beside each verdict: a percentile bootstrap interval of the mean difference at the same "
    "level (Efron & Tibshirani 1993, ch. 13), a check on the t-interval's normality that is narrower "
    "than it with few seeds, and the share of seeds on which the variant beat the baseline "
    "(probability of improvement, Bouthillier et al. 2021; ties count half)."
)


def looks(min_seeds: int, max_seeds: int, step: int | None = None) -> list[int]:
    """Seed counts at which verdicts are taken: min_seeds, then +step (or doubling when step is
    None) until max_seeds, which is always the last look. K = len(looks(...)) is fixed before
    the first seed runs, as the error guarantee requires. Doubling (3, 6, 10 for 3..10) keeps K
    small, and each look's share of alpha large, while seeds grow as fast as decisions need."""
    if not 2 <= min_seeds <= max_seeds:
        raise ValueError(f"need 2 <= min_seeds <= max_seeds, got {min_seeds}, {max_seeds}")
    if step is not None and step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    plan = [min_seeds]
    while plan[-1] < max_seeds:
        plan.append(min(max_seeds, plan[-1] + step if step else 2 * plan[-1]))
    return plan


def interval_level(alpha: float, n_variants: int, n_looks: int) -> float:
    """Confidence of every interval: 1 - alpha / (n_variants * n_looks) (Bonferroni, Dunn 1961)."""
    if not 0 < alpha < 1 or n_variants < 1 or n_looks < 1:
        raise ValueError(f"need 0 < alpha < 1 and n_variants, n_looks >= 1, "
                         f"got {alpha}, {n_variants}, {n_looks}")
    return 1 - alpha / (n_variants * n_looks)


def power_two_sided(effect: float, n: int, a: float) -> float:
    """Power of the two-sided one-sample (paired) t-test at level a with n observations against a
    true mean of `effect` standard deviations (noncentral t; Cohen 1988, ch. 2)."""
    df, nc = n - 1, effect * math.sqrt(n)
    crit = stats.t.ppf(1 - a / 2, df)
    wrong_side = stats.nct.sf(crit, df, -nc)  # = P(T' < -crit); scipy's cdf there can give NaN
    return float(stats.nct.sf(crit, df, nc) + np.nan_to_num(wrong_side))


def detectable_difference(sd: float, n: int, a: float, power: float = POWER) -> float:
    """Minimum detectable difference: the true mean difference that the two-sided paired t-test at
    level a with n seeds detects with the given power when the differences have standard deviation
    sd (Cohen 1988, ch. 2). NaN for n < 2 or a non-finite sd; 0 when sd is 0."""
    if n < 2 or not np.isfinite(sd):
        return math.nan
    if sd == 0:
        return 0.0
    hi = 1.0
    while power_two_sided(hi, n, a) < power:
        hi *= 2
    return sd * float(optimize.brentq(lambda e: power_two_sided(e, n, a) - power, 0.0, hi, xtol=1e-10))


@dataclass(frozen=True)
class Decision:
    """A variant's verdict against the baseline at one look, with the figures behind it.

    Differences are variant - baseline in the metric's units; low/high is the interval the verdict
    was read from (confidence `level`), so printing it with `level` is consistent with the verdict.
    """
    verdict: Verdict  # better, worse, equivalent or undecided, in the metric's own direction
    within_margin: bool  # the interval lies inside +-margin (always so for an equivalent one)
    n: int  # finite paired differences (seeds)
    mean: float  # mean paired difference; NaN when n == 0
    sd: float  # standard deviation of the differences (ddof=1); NaN when n < 2
    low: float  # t-interval of the mean at `level`; NaN when n < 2
    high: float
    level: float  # confidence of low/high: 1 - alpha / (m K)
    p_diff: float  # two-sided paired t-test of a zero mean, unadjusted
    p_equiv: float  # TOST p-value (larger of the two one-sided p's against +-margin), unadjusted
    p_diff_adj: float  # min(1, m K p_diff): better/worse iff < alpha
    p_equiv_adj: float  # min(1, 2 m K p_equiv): equivalent iff < alpha
    boot_low: float  # percentile bootstrap interval of the mean at `level`; NaN when n < 2
    boot_high: float
    share_better: float  # share of seeds on which the variant beat the baseline (ties half)
    detectable: float  # difference detectable with POWER at this level and n, from sd
    margin: float

    @property
    def label(self) -> str:
        """The verdict as the report words it, e.g. 'better (less than the margin)'."""
        if self.verdict in (Verdict.BETTER, Verdict.WORSE) and self.within_margin:
            return f"{self.verdict} (less than the margin)"
        return self.verdict


def _t_bounds(mean, sd, n, a):
    """Two-sided t-interval at confidence 1 - a, elementwise; NaN where n < 2."""
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = stats.t.ppf(1 - a / 2, np.where(n >= 2, n - 1, np.nan)) * sd / np.sqrt(n)
    half = np.where(n >= 2, half, np.nan)
    return mean - half, mean + half


def _classify(low, high, margin: float, lower_is_better: bool):
    """(verdict code, within margin) of intervals, elementwise: the one rule decide() and
    simulate() share. NaN bounds compare False, so they give undecided."""
    low, high = np.asarray(low), np.asarray(high)
    below, above = high < 0, low > 0
    within = (low > -margin) & (high < margin)
    better, worse = (below, above) if lower_is_better else (above, below)
    codes = [DECISIONS.index(v) for v in (Verdict.BETTER, Verdict.WORSE, Verdict.EQUIVALENT, Verdict.UNDECIDED)]
    code = np.select([better, worse, within], codes[:3], codes[3])
    return code, within


def _t_pvalues(mean: float, sd: float, n: int, margin: float) -> tuple[float, float]:
    """Two-sided p of a zero mean and the TOST p against +-margin (Schuirmann 1987)."""
    if n < 2:
        return math.nan, math.nan
    if sd == 0:
        return (1.0 if mean == 0 else 0.0), (1.0 if abs(mean) >= margin else 0.0)
    se, df = sd / math.sqrt(n), n - 1
    p_diff = float(2 * stats.t.sf(abs(mean) / se, df))
    p_equiv = float(max(stats.t.sf((mean + margin) / se, df), stats.t.cdf((mean - margin) / se, df)))
    return p_diff, p_equiv


def _bootstrap(d: np.ndarray, level: float, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (Efron & Tibshirani 1993, ch. 13)."""
    if len(d) < 2:
        return math.nan, math.nan
    ci = stats.bootstrap((d,), np.mean, n_resamples=n_boot, confidence_level=level,
                         method="percentile", rng=rng).confidence_interval
    return float(ci.low), float(ci.high)


def decide(diffs: Mapping[str, Sequence[float] | np.ndarray], margin: float, *, n_looks: int,
           alpha: float = ALPHA, n_variants: int | None = None, lower_is_better: bool = True,
           power: float = POWER, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Decision]:
    """Verdict of each variant from its paired differences (variant - baseline by seed; NaNs are
    dropped) at one look. margin: the smallest difference that matters, in the metric's units.
    n_looks: K = len(looks(...)), the looks planned for the study. n_variants: the study's m,
    which defaults to len(diffs); pass it when deciding only some of the variants. The bootstrap
    of variant `name` draws from default_rng([seed, crc32(name)]): the same whatever the others.
    See METHOD."""
    if not (np.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be a positive number, got {margin}")
    m = len(diffs) if n_variants is None else n_variants
    if m < len(diffs):
        raise ValueError(f"n_variants={m} but {len(diffs)} variants were given")
    level = interval_level(alpha, m, n_looks)
    a, out = 1 - level, {}
    for name, values in diffs.items():
        d = _finite(values)
        n = len(d)
        mean = float(d.mean()) if n else math.nan
        sd = float(d.std(ddof=1)) if n >= 2 else math.nan
        low, high = (float(x) for x in _t_bounds(mean, sd, n, a))
        code, within = _classify(low, high, margin, lower_is_better)
        p_diff, p_equiv = _t_pvalues(mean, sd, n, margin)
        wins = (d < 0) if lower_is_better else (d > 0)
        boot = _bootstrap(d, level, n_boot, np.random.default_rng([seed, zlib.crc32(name.encode())]))
        out[name] = Decision(
            verdict=DECISIONS[int(code)], within_margin=bool(within), n=n, mean=mean, sd=sd,
            low=low, high=high, level=level, p_diff=p_diff, p_equiv=p_equiv,
            p_diff_adj=float(np.minimum(1.0, m * n_looks * p_diff)),  # NaN stays NaN
            p_equiv_adj=float(np.minimum(1.0, 2 * m * n_looks * p_equiv)),
            boot_low=boot[0], boot_high=boot[1],
            share_better=float((wins.sum() + 0.5 * (d == 0).sum()) / n) if n else math.nan,
            detectable=detectable_difference(sd, n, a, power), margin=margin)
    return out


def undecided(decision: Decision, margin: float) -> Decision:
    """A decision forced to undecided (no usable margin), with its figures kept."""
    return replace(decision, verdict=Verdict.UNDECIDED, within_margin=False, margin=margin)


@dataclass(frozen=True)
class Simulation:
    """Outcome of simulate(): one row per simulated study, one column per variant."""
    verdict: np.ndarray  # (studies, m) int: index into records.DECISIONS
    within_margin: np.ndarray  # (studies, m) bool: the deciding interval lay inside +-margin
    n_used: np.ndarray  # (studies, m) int: seeds the variant ran
    true_diff: np.ndarray  # (m,) the true mean differences
    margin: float
    lower_is_better: bool
    max_seeds: int

    def share(self, verdict: str) -> float:
        """Share of all simulated variants that ended with this verdict."""
        return float((self.verdict == DECISIONS.index(verdict)).mean())

    def wrong(self) -> np.ndarray:
        """(studies, m) bool: a claim the true difference contradicts: better or worse on the
        wrong side of 0 (or at 0), equivalent or 'less than the margin' when |true| >= margin."""
        mu = self.true_diff[None, :]
        good, bad = (mu < 0, mu > 0) if self.lower_is_better else (mu > 0, mu < 0)
        v = self.verdict
        return (((v == DECISIONS.index(Verdict.BETTER)) & ~good) | ((v == DECISIONS.index(Verdict.WORSE)) & ~bad)
                | (self.within_margin & (np.abs(mu) >= self.margin)))

    @property
    def family_error(self) -> float:
        """Share of studies with at least one wrong claim (the rate METHOD bounds by alpha)."""
        return float(self.wrong().any(axis=1).mean())

    @property
    def mean_seeds(self) -> float:
        return float(self.n_used.mean())

    @property
    def seeds_saved(self) -> float:
        """Share of variant seeds saved against running max_seeds for every variant."""
        return 1 - self.mean_seeds / self.max_seeds

    @property
    def study_seeds_saved(self) -> float:
        """The same for whole studies, counting the baseline's seeds: as many as its longest variant."""
        cells = self.n_used.sum(axis=1) + self.n_used.max(axis=1)
        return 1 - float(cells.mean()) / ((self.n_used.shape[1] + 1) * self.max_seeds)


def simulate(true_diff: float | Sequence[float], sd: float, margin: float, *, n_variants: int = 1,
             alpha: float = ALPHA, min_seeds: int = 3, max_seeds: int = 10,
             step: int | None = None, n_studies: int = 2000, corr: float = 0.5,
             lower_is_better: bool = True, seed: int = 0) -> Simulation:
    """The whole adaptive procedure on n_studies simulated studies at once: every variant runs
    min_seeds, then undecided ones run to each next look of looks(min_seeds, max_seeds, step),
    verdicts read off the same intervals as decide(). Paired differences are normal with mean
    true_diff (one value, or one per variant) and standard deviation sd; two variants' differences
    on a seed correlate by `corr` (0.5 when variant and baseline noise are equal and independent:
    they share the baseline's cell). n_variants is used when true_diff is a single value."""
    mu = np.atleast_1d(np.asarray(true_diff, dtype=float))
    mu = np.repeat(mu, n_variants) if mu.size == 1 else mu
    if not 0 <= corr < 1:
        raise ValueError(f"corr must be in [0, 1), got {corr}")
    plan = looks(min_seeds, max_seeds, step)
    a = 1 - interval_level(alpha, mu.size, len(plan))
    rng = np.random.default_rng(seed)
    shape = (n_studies, mu.size, max_seeds)
    noise = (math.sqrt(corr) * rng.standard_normal((n_studies, 1, max_seeds))
             + math.sqrt(1 - corr) * rng.standard_normal(shape))
    d = mu[:, None] + sd * noise  # (studies, m, seeds)
    code = np.full(shape[:2], DECISIONS.index(Verdict.UNDECIDED))
    within = np.zeros(shape[:2], dtype=bool)
    n_used = np.zeros(shape[:2], dtype=int)
    active = np.ones(shape[:2], dtype=bool)
    for n in plan:
        x = d[..., :n]
        c, w = _classify(*_t_bounds(x.mean(-1), x.std(-1, ddof=1), n, a), margin, lower_is_better)
        code, within = np.where(active, c, code), np.where(active, w, within)
        n_used = np.where(active, n, n_used)
        active &= c == DECISIONS.index(Verdict.UNDECIDED)
    return Simulation(code, within, n_used, mu, margin, lower_is_better, max_seeds)

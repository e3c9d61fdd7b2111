"""Statistics for comparing ablation variants with the baseline over seeds.

Pure functions on numbers, no I/O, so that every figure the report prints can be checked
against scipy and statsmodels in a test. Seeds are the unit of replication: a variant's values
are its cells' metric (by default the lowest validation loss), one per seed, and differences are
paired by seed (the same seed fixes the initialisation and data-order noise they share).

The decisive verdicts (decide, looks, spending, seeds_needed, futile; METHOD says it in words;
benchmarks/power.py measures it) replace "no significant difference" with better / worse /
equivalent / undecided against a declared margin, valid for the whole study across adaptive rounds
of seeds. References: Dunn (1961) Multiple comparisons among means, JASA 56:52-64; Dunnett (1955)
A multiple comparison procedure for comparing several treatments with a control, JASA 50:1096-1121;
Lan & DeMets (1983) Discrete sequential boundaries for clinical trials, Biometrika 70:659-663;
Jennison & Turnbull (1989) Interim analyses: the repeated confidence interval approach, JRSS B
51:305-361; Schuirmann (1987) A comparison of the two one-sided tests procedure..., J Pharmacokin
Biopharm 15:657-680; Hauschke, Kieser & Hothorn (1999) Proof of safety in toxicology based on the
ratio of two means for normally distributed data, Biometrical J 41:295-304; Cohen (1988)
Statistical Power Analysis for the Behavioral Sciences, ch. 2; Efron & Tibshirani (1993) An
Introduction to the Bootstrap, ch. 13; Bouthillier et al. (2021) Accounting for variance in
machine learning benchmarks, MLSys.
"""
from __future__ import annotations

import importlib
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .records import Verdict


class _OnFirstUse:
    """A module imported when first used: scipy.stats costs a worker that only trains 0.6 s."""
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


stats, optimize = _OnFirstUse("scipy.stats"), _OnFirstUse("scipy.optimize")

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


# How a study decides (METHOD says it in words for the report). Every look k of the K planned
# looks spends alpha_k of the study's alpha, by Lan & DeMets' (1983) O'Brien-Fleming-type spending
# function of the information fraction t = n_k / n_K: alpha(t) = 2 - 2 Phi(z_{1-alpha/2} / sqrt t).
# Early looks spend little (3 of 10 seeds: 0.7% of alpha), so they decide only gross effects and
# leave almost all of alpha to the looks that have the seeds to use it. Within a look, alpha_k is
# split evenly over the m variants (Bonferroni, Dunn 1961): a_k = alpha_k / m per variant. Each
# variant's verdict can be wrong only when one of its two one-sided bounds at level a_k misses the
# truth (better/worse read off the 1 - a_k interval, equivalence off the 1 - 2 a_k one: Schuirmann's
# TOST), so by the union bound over variants and looks the chance of any wrong verdict in the
# study is <= sum_k alpha_k = alpha, whatever the stopping.
#
# The variance is the study's, not each variant's: all variants share the baseline, the seeds and
# the protocol, so the residual variance of the additive model variant + seed fitted to every cell
# value known at the look (two-way analysis of variance with seeds as blocks: Dunnett's 1955
# many-to-one setting) estimates the noise with (variants - 1)(seeds - 1) degrees of freedom
# instead of each variant's seeds - 1. Guards keep one misbehaving variant (a larger spread, heavy
# tails) from borrowing a precision it does not have, or from blurring the others: a variant whose
# own spread of paired differences exceeds the shared one (F-test at GUARD_F) uses the wider of its
# own and the shared interval, and one far beyond it (POOL_OUT) is left out of the shared variance;
# every verdict must also hold on the variant's own paired t-interval at the fixed level
# GUARD_LEVEL. benchmarks/power.py measures the errors these guards leave under heavy tails,
# unequal spreads, divergent runs and a relative margin.

GUARD_F = 0.10  # a variant's own spread is "larger than the shared one" beyond this F-test level,
GUARD_F_SEEDS = 4  # ... from this many paired seeds on (on 2 df the test flags a tenth of all variants by
# chance, and a flagged variant's own t on 2 df could not decide even a gross effect at the first look,
# which spends under 1% of alpha; the own-t guard and that small level protect the first look instead)
GUARD_LEVEL = 0.02  # every verdict must also hold on the variant's own paired t-interval at this level
POOL_OUT = 0.01  # a variant whose own spread exceeds the shared one at this F-test level leaves the pool
FUTILITY = 3.5  # an undecided variant stops at a look before the last (not the first) when it would
# likely need more than FUTILITY x max_seeds seeds: the largest saving that keeps a no-effect variant's
# chance of "equivalent" at 25% in benchmarks/power.py (sd = margin, 11 variants, 3/6/10 seeds)
N_BOOT = 9999  # bootstrap resamples

METHOD = (
    "Paired differences (variant - baseline, same seed), looked at after a fixed schedule of seeds "
    "(K looks planned in advance). Alpha is spent unevenly over the looks, by the O'Brien-Fleming-type "
    "spending function of Lan & DeMets (1983), so early looks decide only gross effects and the last "
    "look keeps most of it; each look's share is split evenly over the m variants (Bonferroni, Dunn "
    "1961). The noise is estimated once for the whole study: the residual variance of the model "
    "variant + seed fitted to every cell value so far (two-way ANOVA with seeds as blocks; the "
    "many-to-one setting of Dunnett 1955), with far more degrees of freedom than any one variant's "
    "seeds. Guards: a variant whose own paired spread is larger than the shared one (F-test at 10%, "
    "from 4 seeds on) uses the wider of its own and the shared interval, and one far larger than all the others' "
    "(at 1%) is left out of the shared variance, so it does not blur them; every verdict must also hold on "
    "its own paired t-interval at 98%. Better or worse when the interval at 1 - a_k excludes 0; equivalent "
    "when Schuirmann's (1987) two one-sided tests at a_k each put the difference inside +-margin "
    "(the 1 - 2 a_k interval); with a relative margin the two tests are on value - (1 +- margin) x "
    "baseline per seed, so the baseline's own noise is counted (ratio equivalence, Hauschke, Kieser "
    "& Hothorn 1999). Otherwise undecided, with the seeds it would likely need (normal approximation "
    "at its observed difference and spread, 80% power at the last look's level); at a look after the "
    "first and before the last, a variant that would likely need more than 3.5 x max_seeds stops there "
    "(futility: stopping never makes a verdict, so it costs no error). A run that diverged "
    "(a non-finite loss before any finite one) counts as the worst value of its look, not as "
    "missing. By the union bound over variants and looks, the chance of any wrong verdict in the "
    "study is at most alpha when the noise is normal with one spread; benchmarks/power.py measures "
    "it under heavy tails, unequal spreads, divergent runs and a relative margin. Beside each "
    "verdict: a percentile bootstrap interval of the mean difference (Efron & Tibshirani 1993, "
    "ch. 13) and the share of seeds on which the variant beat the baseline (probability of "
    "improvement, Bouthillier et al. 2021; ties count half)."
)


def looks(min_seeds: int, max_seeds: int, step: int | None = None) -> list[int]:
    """Seed counts at which verdicts are taken: min_seeds, then +step (or doubling when step is
    None) until max_seeds, which is always the last look. K = len(looks(...)) is fixed before
    the first seed runs, as the error guarantee requires."""
    if not 2 <= min_seeds <= max_seeds:
        raise ValueError(f"need 2 <= min_seeds <= max_seeds, got {min_seeds}, {max_seeds}")
    if step is not None and step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    plan = [min_seeds]
    while plan[-1] < max_seeds:
        plan.append(min(max_seeds, plan[-1] + step if step else 2 * plan[-1]))
    return plan


def spending(alpha: float, plan: Sequence[int]) -> list[float]:
    """alpha_k spent at each look of `plan` (seed counts): increments of Lan & DeMets' (1983)
    O'Brien-Fleming-type function alpha(t) = 2 - 2 Phi(z_{1 - alpha/2} / sqrt(t)), t = n_k / n_K.
    They sum to alpha; one look spends it all."""
    if not 0 < alpha < 1 or not plan or plan[0] < 1:
        raise ValueError(f"need 0 < alpha < 1 and at least one look, got {alpha}, {list(plan)}")
    z = stats.norm.isf(alpha / 2)
    spent = [2 * stats.norm.sf(z / math.sqrt(n / plan[-1])) for n in plan]
    spent[-1] = alpha  # exact at t = 1
    return [float(b - a) for a, b in zip([0.0, *spent[:-1]], spent)]


def look_level(alpha: float, n_variants: int, plan: Sequence[int], look: int) -> float:
    """a_k: the error each variant may spend at look `look` (0-based): alpha_k / m."""
    if n_variants < 1:
        raise ValueError(f"need n_variants >= 1, got {n_variants}")
    return spending(alpha, plan)[look] / n_variants


def power_two_sided(effect: float, df: float, a: float) -> float:
    """Power of a two-sided t-test at level a with df degrees of freedom when the true mean is
    `effect` standard errors (noncentral t; Cohen 1988, ch. 2)."""
    crit = stats.t.isf(a / 2, df)
    wrong_side = stats.nct.sf(crit, df, -effect)  # = P(T' < -crit); scipy's cdf there can give NaN
    return float(stats.nct.sf(crit, df, effect) + np.nan_to_num(wrong_side))


def detectable_difference(se: float, df: float, a: float, power: float = POWER) -> float:
    """Minimum detectable difference: the true mean difference a two-sided t-test at level a finds
    with the given power when its standard error is se on df degrees of freedom (Cohen 1988, ch. 2).
    NaN for df < 1 or a non-finite se; 0 when se is 0."""
    if not df >= 1 or not np.isfinite(se):
        return math.nan
    if se == 0:
        return 0.0
    hi = 1.0
    while power_two_sided(hi, df, a) < power:
        hi *= 2
    return se * float(optimize.brentq(lambda e: power_two_sided(e, df, a) - power, 0.0, hi, xtol=1e-10))


@dataclass(frozen=True)
class SharedNoise:
    """The study's residual variance at a look: the additive model variant + seed (two-way ANOVA,
    seeds as blocks) fitted by least squares to every cell value known. var is per cell, so a
    paired difference of n seeds has standard error sqrt(2 var / n)."""
    var: float  # NaN when df < 1
    df: int


def shared_noise(values: Mapping[str, Mapping[int, float]]) -> SharedNoise:
    """Residual variance and degrees of freedom (cells - variants - seeds + 1) of value ~ variant
    + seed over every finite value (variant -> seed -> value)."""
    cells = [(v, s, y) for v, by_seed in values.items() for s, y in by_seed.items() if np.isfinite(y)]
    variants = sorted({v for v, _, _ in cells})
    seeds = sorted({s for _, s, _ in cells})
    df = len(cells) - len(variants) - len(seeds) + 1
    if df < 1 or len(variants) < 2:
        return SharedNoise(math.nan, max(df, 0))
    x = np.zeros((len(cells), len(variants) + len(seeds) - 1))
    for row, (v, s, _) in enumerate(cells):
        x[row, variants.index(v)] = 1.0
        if (j := seeds.index(s)) > 0:
            x[row, len(variants) + j - 1] = 1.0
    y = np.array([c[2] for c in cells])
    fit, _, rank, _ = np.linalg.lstsq(x, y, rcond=None)
    df = len(cells) - int(rank)  # a design whose seeds do not connect its variants has a lower rank
    if df < 1:
        return SharedNoise(math.nan, 0)
    return SharedNoise(float(((y - x @ fit) ** 2).sum() / df), df)


def with_divergence(values: Mapping[str, Mapping[int, float]], lower_is_better: bool
                    ) -> tuple[dict[str, dict[int, float]], set[tuple[str, int]]]:
    """Each diverged cell (an infinite value) replaced by the worst finite value of all the cells
    (the highest loss, the lowest accuracy), and the (variant, seed) of each. NaN (no result) is dropped."""
    finite = [y for by_seed in values.values() for y in by_seed.values() if np.isfinite(y)]
    worst = (max(finite) if lower_is_better else min(finite)) if finite else math.nan
    diverged = {(v, s) for v, by_seed in values.items() for s, y in by_seed.items() if np.isinf(y)}
    return ({v: {s: (float(y) if np.isfinite(y) else worst) for s, y in by_seed.items() if not np.isnan(y)}
             for v, by_seed in values.items()}, diverged)


@dataclass(frozen=True)
class Decision:
    """A variant's verdict against the baseline at one look, with the figures behind it.

    Differences are variant - baseline in the metric's units; low/high is the interval that
    better/worse were read from (confidence `level`), so printing it with `level` agrees with the
    verdict; equivalence was read from the 1 - 2 a interval (eq_low, eq_high)."""
    verdict: Verdict  # better, worse, equivalent or undecided, in the metric's own direction
    within_margin: bool  # both one-sided tests put the difference inside +-margin
    n: int  # paired seeds
    mean: float  # mean paired difference; NaN when n == 0
    sd: float  # the variant's own standard deviation of the differences (ddof=1); NaN when n < 2
    se: float  # standard error of the mean difference the verdict used (shared or own)
    df: float  # its degrees of freedom
    variance: str  # "shared" (the study's) or "own" (the guard found this variant's spread larger)
    low: float  # interval of the mean at `level`; NaN when n < 2
    high: float
    level: float  # 1 - a_k, a_k = this look's alpha_k / m
    eq_low: float  # interval at 1 - 2 a_k, the equivalence test's
    eq_high: float
    p_diff: float  # two-sided t-test of a zero mean (se, df above), unadjusted
    p_equiv: float  # larger of the two one-sided p's against +-margin, unadjusted
    boot_low: float  # percentile bootstrap interval of the mean at `level`; NaN when n < 2
    boot_high: float
    share_better: float  # share of seeds on which the variant beat the baseline (ties half)
    detectable: float  # difference detectable with POWER at this level, se and df
    margin: float  # absolute, in the metric's units (relative margins: fraction x baseline mean)
    diverged: int = 0  # the variant's diverged cells among its paired seeds (counted as its worst)

    @property
    def spread(self) -> float:
        """Per-seed standard deviation of the paired difference the verdict used (shared or own)."""
        return self.se * math.sqrt(self.n)

    @property
    def label(self) -> str:
        """The verdict as the report words it, e.g. 'better (less than the margin)'."""
        if self.verdict in (Verdict.BETTER, Verdict.WORSE) and self.within_margin:
            return f"{self.verdict} (less than the margin)"
        return self.verdict


def _half(c: np.ndarray, weight: float, noise: SharedNoise, own_spread: bool, a: float, guard: float) -> float:
    """Half-width of the one-sided bound at level a of the mean of the per-seed contrast c, whose
    variance under the shared model is weight x the cell variance: the shared t-bound (or the wider
    of it and the own one when own_spread), never narrower than the own t-bound at the guard's level
    (or at a, when a is the laxer: with one variant the shared model is the paired t-test itself)."""
    n = len(c)
    own_se = float(c.std(ddof=1)) / math.sqrt(n)
    halves = [float(stats.t.isf(max(guard, a), n - 1)) * own_se]  # the guard is never stricter than the test
    if own_spread or not np.isfinite(noise.var):
        halves.append(float(stats.t.isf(a, n - 1)) * own_se)
    if np.isfinite(noise.var):
        halves.append(float(stats.t.isf(a, noise.df)) * math.sqrt(weight * noise.var / n))
    return max(halves)


def _bootstrap(d: np.ndarray, level: float, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (Efron & Tibshirani 1993, ch. 13)."""
    if len(d) < 2 or np.ptp(d) == 0:
        return (float(d[0]), float(d[0])) if len(d) >= 2 else (math.nan, math.nan)
    ci = stats.bootstrap((d,), np.mean, n_resamples=n_boot, confidence_level=level,
                         method="percentile", rng=rng).confidence_interval
    return float(ci.low), float(ci.high)


def absolute_margin(margin: float, relative: bool, baseline_values: Sequence[float]) -> float:
    """The margin in the metric's units: as given, or a fraction of the baseline's mean (finite values)."""
    if not relative:
        return margin
    x = _finite(baseline_values)
    return margin * abs(float(x.mean())) if len(x) else math.nan


def decide(values: Mapping[str, Mapping[int, float]], active: Sequence[str], *, baseline: str, margin: float,
           relative: bool, plan: Sequence[int], look: int, alpha: float = ALPHA, n_variants: int | None = None,
           lower_is_better: bool = True, power: float = POWER, n_boot: int = N_BOOT,
           seed: int = 0) -> dict[str, Decision]:
    """Verdicts of the `active` variants at look `look` (0-based) of `plan` (seed counts).

    values[variant][seed]: every cell value known at this look, the baseline's included, and the
    variants decided earlier (they still tell the shared noise). +-inf marks a diverged cell, NaN
    none. margin: absolute, or a fraction of the baseline's mean when relative. n_variants: the
    study's m (default: every variant in values but the baseline). The bootstrap of variant `name`
    draws from default_rng([seed, crc32(name)]). See METHOD."""
    if not (np.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be a positive number, got {margin}")
    values, diverged = with_divergence(values, lower_is_better)
    m = n_variants if n_variants is not None else sum(1 for v in values if v != baseline)
    if m < len(active):
        raise ValueError(f"n_variants={m} but {len(active)} variants were given")
    a = look_level(alpha, max(m, 1), plan, look)
    outliers = _spread_outliers(values, baseline)  # one noisy variant must not blur all the others
    noise = shared_noise({v: by_seed for v, by_seed in values.items() if v not in outliers})
    base = values.get(baseline, {})
    out = {}
    for name in active:
        own = values.get(name, {})
        seeds = sorted(s for s in own if s in base)
        y, y0 = np.array([own[s] for s in seeds]), np.array([base[s] for s in seeds])
        out[name] = _decide_one(
            y, y0, noise, a, margin, relative, lower_is_better, power,
            sum((name, s) in diverged for s in seeds), n_boot, np.random.default_rng([seed, zlib.crc32(name.encode())]))
    return out


def _spread_outliers(values: Mapping[str, Mapping[int, float]], baseline: str) -> set[str]:
    """Variants (any, decided ones too) whose own paired spread exceeds the shared spread of all the
    others by an F-test at POOL_OUT, from GUARD_F_SEEDS paired seeds on: left out of the shared variance."""
    base = values.get(baseline, {})
    out = set()
    for v, by_seed in values.items():
        d = np.array([y - base[s] for s, y in by_seed.items() if s in base])
        if v == baseline or len(d) < GUARD_F_SEEDS:
            continue
        others = shared_noise({u: ys for u, ys in values.items() if u != v})
        if np.isfinite(others.var) and \
                d.var(ddof=1) > 2 * others.var * float(stats.f.isf(POOL_OUT, len(d) - 1, others.df)):
            out.add(v)
    return out


def _decide_one(y: np.ndarray, y0: np.ndarray, noise: SharedNoise, a: float, margin: float, relative: bool,
                lower_is_better: bool, power: float, diverged: int, n_boot: int,
                rng: np.random.Generator) -> Decision:
    d = y - y0
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    abs_margin = absolute_margin(margin, relative, y0)
    wins = (d < 0) if lower_is_better else (d > 0)
    share = float((wins.sum() + 0.5 * (d == 0).sum()) / n) if n else math.nan
    if n < 2:
        nan = math.nan
        return Decision(Verdict.UNDECIDED, False, n, mean, nan, nan, nan, "own", nan, nan, 1 - a, nan, nan, nan, nan,
                        nan, nan, share, nan, abs_margin, diverged)
    sd = float(d.std(ddof=1))
    shared = np.isfinite(noise.var)
    own_spread = not shared or (n >= GUARD_F_SEEDS
                                and sd ** 2 > 2 * noise.var * float(stats.f.isf(GUARD_F, n - 1, noise.df)))
    if own_spread and not shared:
        se, df = sd / math.sqrt(n), n - 1
    elif own_spread:  # the wider of the two, at this look's level
        own_half = stats.t.isf(a / 2, n - 1) * sd / math.sqrt(n)
        shared_se = math.sqrt(2 * noise.var / n)
        se, df = ((sd / math.sqrt(n), n - 1) if own_half >= stats.t.isf(a / 2, noise.df) * shared_se
                  else (shared_se, noise.df))
    else:
        se, df = math.sqrt(2 * noise.var / n), noise.df
    half2 = _half(d, 2.0, noise, own_spread, a / 2, GUARD_LEVEL / 2)  # two-sided 1 - a: better/worse
    half1 = _half(d, 2.0, noise, own_spread, a, GUARD_LEVEL)  # one-sided a each: equivalence
    low, high = mean - half2, mean + half2
    if relative:  # value - (1 +- margin) x baseline per seed: Fieller-type, the baseline's noise counted
        sign = 1.0 if y0.mean() >= 0 else -1.0
        up, down = y - (1 + sign * margin) * y0, y - (1 - sign * margin) * y0
        within = bool(up.mean() + _half(up, 1 + (1 + sign * margin) ** 2, noise, own_spread, a, GUARD_LEVEL) < 0
                      and down.mean() - _half(down, 1 + (1 - sign * margin) ** 2, noise, own_spread, a, GUARD_LEVEL) > 0)
    else:
        within = bool(mean + half1 < abs_margin and mean - half1 > -abs_margin)
    below, above = high < 0, low > 0
    better, worse = (below, above) if lower_is_better else (above, below)
    verdict = (Verdict.BETTER if better else Verdict.WORSE if worse else
               Verdict.EQUIVALENT if within else Verdict.UNDECIDED)
    p_diff, p_equiv = _t_pvalues(mean, se, df, abs_margin)
    boot = _bootstrap(d, 1 - a, n_boot, rng)
    return Decision(verdict, within, n, mean, sd, se, df, "own" if own_spread else "shared", low, high, 1 - a,
                    mean - half1, mean + half1, p_diff, p_equiv, boot[0], boot[1], share,
                    detectable_difference(se, df, a, power), abs_margin, diverged)


def _t_pvalues(mean: float, se: float, df: float, margin: float) -> tuple[float, float]:
    """Two-sided p of a zero mean and the TOST p against +-margin (Schuirmann 1987)."""
    if se == 0:
        return (1.0 if mean == 0 else 0.0), (1.0 if abs(mean) >= margin else 0.0)
    p_diff = float(2 * stats.t.sf(abs(mean) / se, df))
    p_equiv = float(max(stats.t.sf((mean + margin) / se, df), stats.t.cdf((mean - margin) / se, df)))
    return p_diff, p_equiv


def seeds_needed(mean: float, sd: float, margin: float, a: float, *, at_least: int = 2, power: float = POWER,
                 most: int = 100) -> int | None:
    """Seeds a variant would likely need for a verdict when its paired differences have this mean
    and per-seed spread sd: the fewest n (at least at_least) at which a test at level a (two-sided
    for better/worse, one-sided for each equivalence bound) has the given power, by the normal
    approximation n = ((z + z_power) sd / distance)^2, distance = |mean| from 0, or margin - |mean|
    from the margin, whichever needs fewer. None when neither is reachable within `most` seeds."""
    if not (np.isfinite(mean) and np.isfinite(sd)):
        return None
    z_power = stats.norm.isf(1 - power)
    options = []
    if abs(mean) > 0:
        options.append(((stats.norm.isf(a / 2) + z_power) * sd / abs(mean)) ** 2)
    if np.isfinite(margin) and margin > abs(mean):
        options.append(((stats.norm.isf(a) + z_power) * sd / (margin - abs(mean))) ** 2)
    if not options:
        return None
    n = max(at_least, math.ceil(min(options)))
    return n if n <= most else None


def futile(decision: Decision, a_last: float, max_seeds: int) -> bool:
    """An undecided variant that would likely need more than FUTILITY x max_seeds seeds for a
    verdict at the last look's level a_last: more seeds up to max_seeds would most likely leave it
    undecided (a non-binding futility stop; it makes no verdict, so the error bound is untouched)."""
    if decision.verdict != Verdict.UNDECIDED or decision.n < 2 or not np.isfinite(decision.se):
        return False
    return seeds_needed(decision.mean, decision.spread, decision.margin, a_last, at_least=decision.n + 1,
                        most=int(FUTILITY * max_seeds)) is None

"""Decisive verdicts (stats.decide and friends): every figure against scipy, statsmodels or the
independent reference in tests/reference_stats.py, and edge cases that must not crash. The error
rates of the whole adaptive procedure are measured by tests/test_power.py and benchmarks/power.py."""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.power import NormalIndPower, TTestPower
from statsmodels.stats.weightstats import ttost_paired

from chae_ablate import stats

from reference_stats import reference, shared, spent

ALPHA = 0.05


def study(rng: np.random.Generator, m: int, n: int, effects=None, sd: float = 0.1, base: float = 1.0) -> dict:
    """values[variant][seed] of a simulated study: the baseline and m variants on seeds 0..n-1."""
    effects = np.zeros(m) if effects is None else np.asarray(effects)
    seed_effect = rng.normal(0, sd, n)
    values = {"baseline": dict(enumerate(base + seed_effect + rng.normal(0, sd, n)))}
    for i in range(m):
        values[f"v{i}"] = dict(enumerate(base + effects[i] + seed_effect + rng.normal(0, sd, n)))
    return values


def decide(values, active=None, *, margin=0.1, relative=False, plan=(10,), look=0, **kw):
    active = [v for v in values if v != "baseline"] if active is None else active
    kw.setdefault("n_boot", 200)
    return stats.decide(values, active, baseline="baseline", margin=margin, relative=relative, plan=list(plan),
                        look=look, **kw)


def test_looks_double_or_step_and_end_at_max():
    assert stats.looks(3, 10) == [3, 6, 10]
    assert stats.looks(3, 10, step=2) == [3, 5, 7, 9, 10]
    assert stats.looks(5, 5) == [5]
    for bad in [(1, 10), (6, 5)]:
        with pytest.raises(ValueError):
            stats.looks(*bad)


def test_spending_is_lan_demets_obrien_fleming():
    """Increments of 2 - 2 Phi(z_{1-alpha/2} / sqrt(t)); at half the information it has spent 0.56%
    of a two-sided 5% (Lan & DeMets 1983's O'Brien-Fleming-type function: 2 - 2 Phi(2.772))."""
    for plan in ([3, 6, 10], [3, 5, 7, 9, 10], [4, 8], [10]):
        shares = stats.spending(ALPHA, plan)
        assert sum(shares) == pytest.approx(ALPHA, rel=1e-12)
        assert shares == pytest.approx([spent(ALPHA, plan, k) for k in range(len(plan))], rel=1e-12)
        assert shares[0] == min(shares) and all(x > 0 for x in shares)  # the first look spends least
    assert stats.spending(ALPHA, [5, 10])[0] == pytest.approx(0.00557, abs=5e-6)
    assert stats.spending(ALPHA, [3, 6, 10])[0] < 0.01 * ALPHA
    assert stats.look_level(ALPHA, 11, [3, 6, 10], 2) == pytest.approx(stats.spending(ALPHA, [3, 6, 10])[2] / 11)


def test_shared_noise_is_the_two_way_residual_variance_in_statsmodels():
    rng = np.random.default_rng(3)
    values = study(rng, 4, 6)
    del values["v1"][5], values["v2"][4], values["v2"][5]  # unbalanced, as after adaptive looks
    noise = stats.shared_noise(values)
    assert (noise.var, noise.df) == pytest.approx(shared(values), rel=1e-9)
    assert noise.df == 4 * 5 - 3  # cells - variants - seeds + 1
    assert math.isnan(stats.shared_noise({"baseline": {0: 1.0, 1: 2.0}}).var)


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_one_variant_is_the_paired_t_test_of_scipy_and_statsmodels(n):
    """With the baseline and one variant the shared model is the paired t-test: its interval at
    1 - a, the equivalence interval at 1 - 2 a (Schuirmann) and the TOST p of statsmodels."""
    rng = np.random.default_rng(n)
    values = study(rng, 1, n, effects=[0.03])
    y, y0 = (np.array(list(values[v].values())) for v in ("v0", "baseline"))
    dec = decide(values, margin=0.2)["v0"]
    res = sps.ttest_rel(y, y0)
    assert (dec.low, dec.high) == pytest.approx(tuple(res.confidence_interval(1 - ALPHA)), rel=1e-9)
    assert (dec.eq_low, dec.eq_high) == pytest.approx(tuple(res.confidence_interval(1 - 2 * ALPHA)), rel=1e-9)
    assert dec.p_diff == pytest.approx(res.pvalue, rel=1e-9)
    assert dec.p_equiv == pytest.approx(ttost_paired(y, y0, -0.2, 0.2)[0], rel=1e-9)
    assert (dec.n, dec.df, dec.variance) == (n, n - 1, "shared")
    assert dec.sd == pytest.approx((y - y0).std(ddof=1))


@pytest.mark.parametrize("seed", range(8))
def test_many_variants_match_the_reference(seed):
    """Bounds, the noise each variant used and its verdict against tests/reference_stats.py, over
    random studies: unequal spreads (the guard's own variance), looks, 2-11 variants."""
    rng = np.random.default_rng(seed)
    m, n = int(rng.integers(2, 12)), int(rng.integers(3, 11))
    values = study(rng, m, n, effects=rng.normal(0, 0.15, m))
    if seed % 3 == 0:  # one variant three times as noisy
        values["v0"] = {s: y + rng.normal(0, 0.3) for s, y in values["v0"].items()}
    plan, look = [3, 6, 10], int(rng.integers(0, 3))
    a = spent(ALPHA, plan, look) / m
    for name, dec in decide(values, margin=0.1, plan=plan, look=look).items():
        ref = reference(values, name, a, 0.1)
        assert (dec.low, dec.high, dec.eq_low, dec.eq_high) == pytest.approx(
            (ref.low, ref.high, ref.eq_low, ref.eq_high), rel=1e-9)
        assert (dec.variance, dec.level) == (ref.variance, pytest.approx(1 - a))
        want = ("better" if ref.high < 0 else "worse" if ref.low > 0 else
                "equivalent" if -0.1 < ref.eq_low and ref.eq_high < 0.1 else "undecided")
        assert dec.verdict == want
        assert dec.within_margin == (-0.1 < ref.eq_low and ref.eq_high < 0.1)


def test_a_larger_own_spread_uses_the_wider_interval_and_leaves_the_pool():
    rng = np.random.default_rng(0)
    values = study(rng, 6, 6, sd=0.01)
    values["v0"] = {s: y + rng.normal(0, 0.2) for s, y in values["v0"].items()}  # 20x the others' noise
    out = decide(values, margin=0.05)
    assert out["v0"].variance == "own" and out["v1"].variance == "shared"
    d = np.array([values["v0"][s] - values["baseline"][s] for s in range(6)])
    own = sps.ttest_1samp(d, 0).confidence_interval(1 - ALPHA / 6)
    assert out["v0"].low <= own.low + 1e-12 and out["v0"].high >= own.high - 1e-12
    # ... and it is left out of the shared variance: the others' is the fit without it
    assert out["v1"].df == shared({v: ys for v, ys in values.items() if v != "v0"})[1] == 5 * 5
    ref = reference(values, "v1", ALPHA / 6, 0.05)
    assert (out["v1"].low, out["v1"].high) == pytest.approx((ref.low, ref.high), rel=1e-9)


def test_relative_margin_tests_value_minus_one_plus_margin_times_baseline():
    """Equivalence within r of the baseline's mean: one-sided t-tests of y - (1 + r) y0 < 0 and
    y - (1 - r) y0 > 0 per seed (scipy), not of the difference against a margin fixed beforehand."""
    rng = np.random.default_rng(5)
    for trial in range(30):
        values = study(rng, 1, 6, effects=[rng.normal(0, 0.06)], sd=0.03)
        y, y0 = (np.array(list(values[v].values())) for v in ("v0", "baseline"))
        dec = decide(values, margin=0.05, relative=True)["v0"]
        up = sps.ttest_1samp(y - 1.05 * y0, 0, alternative="less").pvalue
        down = sps.ttest_1samp(y - 0.95 * y0, 0, alternative="greater").pvalue
        assert dec.within_margin == (max(up, down) < ALPHA)
        assert dec.margin == pytest.approx(0.05 * y0.mean())


def test_diverged_cells_count_as_the_worst_value_of_the_look():
    values = {"baseline": {0: 0.30, 1: 0.32, 2: 0.31, 3: 0.29}, "a": {0: math.inf, 1: 0.5, 2: 0.33, 3: math.nan},
              "b": {0: 0.31, 1: 0.30, 2: math.inf, 3: math.inf}}
    filled, diverged = stats.with_divergence(values, lower_is_better=True)
    assert filled["a"] == {0: 0.5, 1: 0.5, 2: 0.33} and filled["b"][2] == filled["b"][3] == 0.5
    assert diverged == {("a", 0), ("b", 2), ("b", 3)}
    acc, _ = stats.with_divergence({"baseline": {0: 0.9}, "a": {0: -math.inf, 1: 0.7}}, lower_is_better=False)
    assert acc["a"] == {0: 0.7, 1: 0.7}
    out = decide(values, margin=0.05)
    assert (out["a"].diverged, out["b"].diverged, out["a"].n, out["b"].n) == (1, 2, 3, 4)


@pytest.mark.parametrize("n,a", [(3, 0.05), (3, 0.05 / 33), (5, 0.05), (10, 0.05), (10, 0.05 / 33)])
def test_detectable_difference_has_the_target_power_in_statsmodels(n, a):
    sd = 0.3
    mdd = stats.detectable_difference(sd / math.sqrt(n), n - 1, a)
    assert TTestPower().power(effect_size=mdd / sd, nobs=n, alpha=a) == pytest.approx(0.8, abs=1e-6)
    assert stats.detectable_difference(0.0, n - 1, a) == 0.0
    assert math.isnan(stats.detectable_difference(sd, 0, a))


def test_seeds_needed_is_the_normal_approximation_of_statsmodels():
    for mean, sd, margin, a in [(0.5, 1.0, 1.0, 0.001), (0.02, 0.05, 0.1, 0.0045), (0.0, 0.03, 0.05, 0.0045)]:
        by_effect = NormalIndPower().solve_power(abs(mean) / sd, alpha=a, power=0.8, ratio=0) if mean else math.inf
        by_margin = NormalIndPower().solve_power((margin - abs(mean)) / sd, alpha=2 * a, power=0.8, ratio=0)
        assert stats.seeds_needed(mean, sd, margin, a) == max(2, math.ceil(min(by_effect, by_margin) - 1e-9))
    assert stats.seeds_needed(0.1, 1.0, 0.1, 0.001) is None  # at the margin, and too small for better/worse
    assert stats.seeds_needed(0.1, 0.01, 0.5, 0.001, at_least=7) == 7


def test_bootstrap_interval_is_scipys_percentile_interval():
    values = {"baseline": dict(enumerate([1.0, 1.1, 0.9, 1.05, 0.95, 1.0])),
              "a": dict(enumerate([1.0, 2.0, 1.0, 2.0, 1.0, 2.0])),
              "b": dict(enumerate([1.12, 1.07, 0.98, 1.25, 1.0, 1.11]))}
    dec = decide(values, margin=1.0, seed=7, n_boot=9999)["b"]
    d = np.array([values["b"][s] - values["baseline"][s] for s in range(6)])
    want = sps.bootstrap((d,), np.mean, n_resamples=9999, confidence_level=dec.level, method="percentile",
                         rng=np.random.default_rng([7, zlib.crc32(b"b")])).confidence_interval
    assert (dec.boot_low, dec.boot_high) == (pytest.approx(want.low), pytest.approx(want.high))
    alone = decide(values, ["b"], margin=1.0, seed=7, n_boot=9999, n_variants=2)["b"]  # same draws
    assert (alone.boot_low, alone.boot_high) == (dec.boot_low, dec.boot_high)


def test_higher_is_better_flips_the_direction_and_share_counts_ties_half():
    values = {"baseline": dict(enumerate([0.50, 0.52, 0.49, 0.51])), "v": dict(enumerate([0.80, 0.81, 0.79, 0.82])),
              "t": dict(enumerate([0.40, 0.60, 0.49, 0.52]))}
    assert decide(values, ["v"], margin=0.01)["v"].verdict == "worse"
    up = decide(values, ["v"], margin=0.01, lower_is_better=False)["v"]
    assert up.verdict == "better" and up.share_better == 1.0
    assert decide(values, ["t"], margin=0.5)["t"].share_better == pytest.approx(1.5 / 4)


def test_every_label_and_no_crash_on_edge_cases():
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(150):
        m, n = int(rng.integers(1, 5)), int(rng.integers(2, 9))
        values = study(rng, m, n, effects=rng.uniform(-0.3, 0.3, m), sd=rng.uniform(0.005, 0.1))
        for dec in decide(values, margin=0.1, n_boot=50).values():
            seen.add(dec.label)
            if dec.verdict == "better":
                assert dec.high < 0 < -dec.mean
            if dec.verdict == "worse":
                assert dec.low > 0 < dec.mean
    assert seen == {"better", "worse", "equivalent", "undecided", "better (less than the margin)",
                    "worse (less than the margin)"}
    one = decide({"baseline": {0: 1.0}, "v": {0: 2.0}})["v"]  # one seed: no spread
    assert one.verdict == "undecided" and math.isnan(one.low)
    flat = decide({"baseline": {0: 1.0, 1: 1.0}, "v": {0: 1.0, 1: 1.0}})["v"]  # no spread at all
    assert flat.verdict == "equivalent" and abs(flat.low) < 1e-9 and abs(flat.high) < 1e-9
    with pytest.raises(ValueError, match="margin"):
        decide({"baseline": {0: 1.0}, "v": {0: 1.0}}, margin=0.0)

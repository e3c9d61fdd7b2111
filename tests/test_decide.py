"""Decisive verdicts (stats.decide and friends): every figure against scipy or statsmodels, edge
cases that must not crash, and the error rates of the whole adaptive procedure by simulation."""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import ttost_paired

from chae_ablate import stats
from chae_ablate.records import DECISIONS

ALPHA = 0.05
N_STUDIES = 4000  # simulated studies per error-rate check: one standard error of 0.05 is 0.0034


def one(d, margin=1.0, **kw) -> stats.Decision:
    kw.setdefault("n_looks", 1)
    return stats.decide({"v": np.asarray(d, dtype=float)}, margin, **kw)["v"]


def test_looks_double_or_step_and_end_at_max():
    assert stats.looks(3, 10) == [3, 6, 10]
    assert stats.looks(3, 10, step=2) == [3, 5, 7, 9, 10]
    assert stats.looks(5, 5) == [5]
    for bad in [(1, 10), (6, 5)]:
        with pytest.raises(ValueError):
            stats.looks(*bad)


def test_interval_level_is_bonferroni_over_variants_and_looks():
    assert stats.interval_level(0.05, 11, 3) == pytest.approx(1 - 0.05 / 33)
    two = stats.decide({"a": [1.0, 2.0], "b": [0.0, 1.0]}, 1.0, n_looks=3)
    assert two["a"].level == two["b"].level == pytest.approx(1 - 0.05 / 6)


CASES = [(n, mu, sd, margin) for n in (2, 3, 5, 10) for mu, sd, margin in
         [(0.0, 1.0, 1.0), (0.4, 0.3, 1.0), (-2.0, 0.5, 0.5), (0.01, 0.02, 0.05)]]


@pytest.mark.parametrize("n,mu,sd,margin", CASES)
def test_interval_and_p_values_match_scipy_and_statsmodels(n, mu, sd, margin):
    rng = np.random.default_rng(n)
    d = rng.normal(mu, sd, n)
    dec = one(d, margin, n_looks=3, n_variants=11)
    res = sps.ttest_1samp(d, 0.0)
    ci = res.confidence_interval(dec.level)
    assert (dec.low, dec.high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert dec.p_diff == pytest.approx(res.pvalue, rel=1e-10)
    p_tost = ttost_paired(d, np.zeros(n), -margin, margin)[0]
    assert dec.p_equiv == pytest.approx(p_tost, rel=1e-9, abs=1e-300)
    assert dec.mean == pytest.approx(d.mean()) and dec.sd == pytest.approx(d.std(ddof=1))
    assert dec.n == n


def test_verdicts_agree_with_the_adjusted_p_values():
    """The interval rule and the p-value rule are the same test: better/worse iff the Bonferroni
    adjusted two-sided p < alpha; equivalent iff the adjusted TOST p < alpha (each one-sided test
    at alpha / (2 m K): the equivalence is read off the same two-sided interval)."""
    rng = np.random.default_rng(0)
    seen = set()
    for i in range(400):
        n = int(rng.integers(2, 12))
        d = rng.normal(rng.uniform(-2, 2), rng.uniform(0.05, 1.5), n)
        dec = one(d, 1.0, n_looks=3, n_variants=11, n_boot=100)
        seen.add(dec.label)
        assert (dec.verdict in ("better", "worse")) == (dec.p_diff_adj < ALPHA)
        assert dec.within_margin == (dec.p_equiv_adj < ALPHA)
        assert (dec.verdict == "equivalent") == (dec.within_margin and dec.verdict not in ("better", "worse"))
        if dec.verdict == "better":
            assert dec.high < 0 and dec.mean < 0
        if dec.verdict == "worse":
            assert dec.low > 0 and dec.mean > 0
    assert seen == {"better", "worse", "equivalent", "undecided", "better (less than the margin)",
                    "worse (less than the margin)"}


def test_higher_is_better_flips_the_direction():
    d = [0.5, 0.6, 0.55, 0.52]
    assert one(d, 0.1).verdict == "worse"
    assert one(d, 0.1, lower_is_better=False).verdict == "better"
    assert one(d, 1.0, lower_is_better=False).label == "better (less than the margin)"
    assert one(d, 0.1, lower_is_better=False).share_better == 1.0


@pytest.mark.parametrize("n,a", [(2, 0.0015), (3, 0.05), (3, 0.05 / 33), (5, 0.05), (10, 0.05), (10, 0.05 / 33)])
def test_detectable_difference_has_the_target_power_in_statsmodels(n, a):
    sd = 0.3
    mdd = stats.detectable_difference(sd, n, a)
    assert TTestPower().power(effect_size=mdd / sd, nobs=n, alpha=a) == pytest.approx(0.8, abs=1e-6)
    if a == 0.05:  # statsmodels' solver converges only at the usual levels
        assert mdd == pytest.approx(sd * TTestPower().solve_power(None, nobs=n, alpha=a, power=0.8), rel=1e-5)
    assert stats.detectable_difference(0.0, n, a) == 0.0
    assert math.isnan(stats.detectable_difference(sd, 1, a))


def test_power_matches_statsmodels():
    for effect, n, a in [(0.5, 10, 0.05), (1.3, 5, 0.05), (2.0, 10, 0.0015), (4.0, 3, 0.0015)]:
        assert stats.power_two_sided(effect, n, a) == pytest.approx(TTestPower().power(effect, n, a), rel=1e-9)
    assert stats.power_two_sided(8.0, 3, 0.0015) > 0.2  # scipy's lower tail is NaN here; ours is not


def test_bootstrap_interval_is_scipys_percentile_interval():
    d = np.array([0.12, -0.03, 0.08, 0.2, 0.05, 0.11])
    dec = stats.decide({"a": [0.0, 1.0], "b": d}, 1.0, n_looks=3, seed=7)["b"]
    want = sps.bootstrap((d,), np.mean, n_resamples=9999, confidence_level=dec.level, method="percentile",
                         rng=np.random.default_rng([7, zlib.crc32(b"b")])).confidence_interval
    assert (dec.boot_low, dec.boot_high) == (pytest.approx(want.low), pytest.approx(want.high))
    alone = stats.decide({"b": d}, 1.0, n_looks=3, n_variants=2, seed=7)["b"]  # same draws without "a"
    assert (alone.boot_low, alone.boot_high) == (dec.boot_low, dec.boot_high)
    assert dec.boot_low < dec.boot_high and dec.low < dec.boot_low  # narrower than the t with 6 seeds


def test_share_better_counts_wins_and_half_ties():
    assert one([-0.1, -0.2, 0.3, 0.0]).share_better == pytest.approx(2.5 / 4)
    assert one([-0.1, -0.2, 0.3, 0.0], lower_is_better=False).share_better == pytest.approx(1.5 / 4)


def test_zero_variance_gives_a_degenerate_interval():
    same = one([0.0, 0.0, 0.0])
    assert (same.verdict, same.low, same.high, same.p_diff, same.p_equiv) == ("equivalent", 0.0, 0.0, 1.0, 0.0)
    shifted = one([0.25, 0.25, 0.25], margin=1.0)
    assert shifted.label == "worse (less than the margin)" and shifted.detectable == 0.0
    assert one([2.0, 2.0], margin=1.0).label == "worse"


@pytest.mark.parametrize("d", [[], [0.3], [math.nan, 0.3, math.nan], [math.nan]])
def test_fewer_than_two_seeds_is_undecided(d):
    dec = one(d)
    assert dec.verdict == "undecided" and not dec.within_margin
    undefined = (dec.low, dec.high, dec.p_diff, dec.p_diff_adj, dec.boot_low, dec.detectable)
    assert all(math.isnan(x) for x in undefined)
    assert dec.n == sum(np.isfinite(d))


def test_nans_are_dropped():
    assert one([math.nan, 0.1, 0.3, math.nan, 0.2]) == one([0.1, 0.3, 0.2])


def test_bad_arguments_are_refused():
    for margin in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError):
            one([0.1, 0.2], margin)
    with pytest.raises(ValueError):
        stats.decide({"a": [0.1, 0.2], "b": [0.1, 0.2]}, 1.0, n_looks=1, n_variants=1)


def se_bound(rate: float = ALPHA, n: int = N_STUDIES) -> float:
    return rate + 3 * math.sqrt(rate * (1 - rate) / n)


def code(verdict: str) -> int:
    return DECISIONS.index(verdict)


@pytest.mark.parametrize("m", [1, 11])
@pytest.mark.parametrize("sd", [0.25, 1.0, 3.0])
@pytest.mark.parametrize("lower_is_better", [True, False])
def test_no_difference_is_rarely_called_better_or_worse(m, sd, lower_is_better):
    sim = stats.simulate(0.0, sd, 1.0, n_variants=m, min_seeds=3, max_seeds=10, n_studies=N_STUDIES,
                         lower_is_better=lower_is_better, seed=m)
    claimed = np.isin(sim.verdict, [code("better"), code("worse")]).any(axis=1)
    assert claimed.mean() <= se_bound()


def test_family_error_counts_studies_with_any_wrong_claim():
    """Three studies of two variants (true differences 0 and 2, margin 1, lower is better), verdicts
    chosen by hand: a wrong 'better', a wrong 'equivalent' and two right calls."""
    verdicts = np.array([[code("better"), code("worse")],  # variant 0 has no effect: 'better' is wrong
                         [code("undecided"), code("equivalent")],  # a difference of 2 margins is not equivalent
                         [code("undecided"), code("worse")]])  # right
    within = np.array([[False, False], [False, True], [False, False]])
    sim = stats.Simulation(verdicts, within, np.full((3, 2), 3), np.array([0.0, 2.0]), 1.0, True, 10)
    assert sim.wrong().tolist() == [[True, False], [False, True], [False, False]]
    assert sim.family_error == pytest.approx(2 / 3)


@pytest.mark.parametrize("m", [1, 11])
@pytest.mark.parametrize("sd", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("true", [1.0, 1.5, -1.5])
def test_a_difference_of_a_margin_or_more_is_rarely_called_equivalent(m, sd, true):
    sim = stats.simulate(true, sd, 1.0, n_variants=m, min_seeds=3, max_seeds=10, step=2,
                         n_studies=N_STUDIES, corr=0.0, seed=int(10 * sd))
    inside = ((sim.verdict == code("equivalent")) | sim.within_margin).any(axis=1)  # incl. "less than the margin"
    assert inside.mean() <= se_bound()


def test_a_mixed_study_keeps_its_family_error():
    """11 variants: 5 with no effect, 3 at the margin, 3 clearly worse; one family error bound."""
    true = [0.0] * 5 + [1.0] * 3 + [3.0] * 3
    sim = stats.simulate(true, 0.4, 1.0, min_seeds=3, max_seeds=10, n_studies=N_STUDIES, seed=3)
    v, mu = sim.verdict, np.array(true)
    wrong = ((v == code("better")) | ((v == code("worse")) & (mu == 0)) | (sim.within_margin & (mu >= 1.0)))
    assert wrong.any(axis=1).mean() <= se_bound()
    assert (v[:, 8:] == code("worse")).mean() > 0.99


def test_a_large_difference_is_found_at_the_first_look():
    sim = stats.simulate(3.0, 0.05, 1.0, n_variants=11, min_seeds=3, max_seeds=10, n_studies=N_STUDIES)
    assert ((sim.verdict == code("worse")) & (sim.n_used == 3)).mean() > 0.99
    assert sim.seeds_saved == pytest.approx(0.7, abs=0.01)
    assert sim.study_seeds_saved == pytest.approx(0.7, abs=0.01)  # the baseline stops at 3 too
    sim = stats.simulate(-3.0, 0.05, 1.0, n_variants=11, n_studies=N_STUDIES, lower_is_better=False)
    assert (sim.verdict == code("worse")).mean() > 0.99


def test_no_difference_with_a_small_spread_ends_equivalent():
    sim = stats.simulate(0.0, 0.05, 1.0, n_variants=11, min_seeds=3, max_seeds=10, n_studies=N_STUDIES)
    assert (sim.verdict == code("equivalent")).mean() > 0.99
    assert sim.mean_seeds < 4

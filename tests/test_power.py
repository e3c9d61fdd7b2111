"""benchmarks/power.py: its re-implementation of stats.METHOD gives analysis.analyse's verdicts, and
its Monte-Carlo figures are sharp enough to catch a rule twice too lax or three times too strict."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from chae_ablate import stats
from chae_ablate.analysis import analyse
from chae_ablate.config import AnalysisConfig
from chae_ablate.records import DECISIONS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import power  # noqa: E402

STUDIES = 8000  # per Monte-Carlo check: one standard error of a 5% error rate is 0.24%
SE_ALPHA = math.sqrt(power.ALPHA * (1 - power.ALPHA) / STUDIES)


def error_bound() -> float:
    """A family error above alpha + 3 standard errors (at a true rate of alpha) is a real excess."""
    return power.ALPHA + 3 * SE_ALPHA


# (noise, true differences in margins, the rule's margin, studies): every verdict and the
# relative margin's sign and divergence paths occur
REPLAYS = [
    (power.Noise("normal"), (0.0, 0.5, 2.0, -3.0), 1.5, 50),
    (power.Noise("t3", tails=3), (0.0, 1.0, 10.0), 2.0, 40),
    (power.Noise("diverged 10%", diverged=0.1), (0.0, -3.0, 4.0, 8.0, 0.0), 3.0, 40),
    (power.Noise("one wide", wide=3.0), (0.0, 0.0, 2.0, -6.0), 1.0, 30),
    (power.Noise("relative", level=10.0, relative=True), (0.0, 0.3, 2.0, -4.0), 0.25, 40),
    (power.Noise("relative, diverged", level=-10.0, relative=True, diverged=0.1), (0.0, 1.0, -2.0), 0.1, 20),
]


@pytest.fixture
def quick_decide(monkeypatch):
    """stats.decide without its bootstrap and detectable difference: they are printed beside a
    verdict and take no part in it, but are 90% of its time."""
    monkeypatch.setattr(stats, "_bootstrap", lambda *args: (math.nan, math.nan))
    monkeypatch.setattr(stats, "detectable_difference", lambda *args, **kwargs: math.nan)


@pytest.mark.parametrize("noise,true,margin,studies", REPLAYS, ids=[r[0].about for r in REPLAYS])
def test_harness_gives_analyse_verdicts(quick_decide, noise, true, margin, studies):
    y = power.cells(noise, true, studies, np.random.default_rng(len(true) * 100 + studies))
    code, within, n = power.this_method(y, power.PLAN, power.ALPHA, margin, noise.relative)
    names = ["baseline", *(f"v{i}" for i in range(len(true)))]
    config = AnalysisConfig(margin=margin, relative=noise.relative, adaptive=True,
                            min_seeds=power.PLAN[0], max_seeds=power.PLAN[-1])
    seen, stopped = set(), 0
    for b in range(studies):
        values = {v: {s: float(y[b, j, s]) for s in range(power.PLAN[-1])} for j, v in enumerate(names)}
        out = analyse(values, lambda v, s: True, names, {v: list(range(power.PLAN[-1])) for v in names}, config)
        for j, v in enumerate(names[1:]):
            decision = out.decisions[v]
            assert (decision.verdict, decision.within_margin, decision.n, len(out.seeds[v])) == \
                (DECISIONS[code[b, j]], within[b, j], n[b, j], n[b, j]), (noise.about, b, v, decision)
        assert len(out.seeds["baseline"]) == n[b].max()
        seen |= {DECISIONS[c] for c in code[b]}
        stopped += len(out.stopped)
    assert len(seen) >= 3, seen  # the replay exercised several verdicts
    if noise.about in ("diverged 10%", "one wide"):
        assert stopped > 10  # ... and futility stops (about 40-50 of them here)


def test_family_error_at_one_margin_catches_a_lax_equivalence():
    """Every true difference exactly one margin (equivalence's hardest case), normal noise: the
    rule's family error stays under alpha; the same rule given twice the margin does not."""
    ok = power.simulate(power.MODELS["normal"], 1.0, studies=STUDIES, seed=1)
    lax = power.simulate(power.MODELS["normal"], 1.0, studies=STUDIES, seed=1, margin=2.0)
    assert ok.family_error <= error_bound(), ok.family_error
    assert lax.family_error > error_bound(), lax.family_error


def equivalence_ceiling(alpha: float, m: int, n: int) -> float:
    """Share of true-0 variants called equivalent by the two one-sided z-tests at the last look's
    level alpha_K / m with the variance known (sd = margin): the mean of n differences must lie
    inside +-(margin - z se), se = margin / sqrt n. A rule that estimates the variance does no
    better on average, and the earlier looks add nothing (even knowing the variance, their bound
    is wider than the margin at 3 and 6 seeds), so more than this is a rule too lax."""
    a = power.spending(alpha, power.PLAN)[-1] / m
    se = 1 / math.sqrt(n)
    return float(1 - 2 * sps.norm.sf((1 - sps.norm.isf(a) * se) / se))


def test_equivalent_at_zero_in_band_catches_a_strict_rule():
    """True differences 0, normal noise: at least the issue's 25% of variants are called equivalent,
    no more than the known-variance ceiling allows; a rule three times too strict (alpha / 3)
    falls below the band."""
    ceiling = equivalence_ceiling(power.ALPHA, power.VARIANTS, power.PLAN[-1])
    levels = power.spending(power.ALPHA, power.PLAN) / power.VARIANTS
    assert all(sps.norm.isf(a) / math.sqrt(n) > 1 for a, n in zip(levels[:-1], power.PLAN[:-1]))  # see the ceiling
    assert 0.35 < ceiling < 0.36
    ok = power.simulate(power.MODELS["normal"], 0.0, studies=STUDIES, seed=2)
    strict = power.simulate(power.MODELS["normal"], 0.0, studies=STUDIES, seed=2, alpha=power.ALPHA / 3)
    band = (0.25 - 3 * ok.share_se(power.EQUIVALENT), ceiling + 3 * ok.share_se(power.EQUIVALENT))
    assert band[0] <= ok.share(power.EQUIVALENT) <= band[1], (ok.share(power.EQUIVALENT), band)
    assert strict.share(power.EQUIVALENT) < band[0], strict.share(power.EQUIVALENT)


@pytest.mark.parametrize("model", ["t3", "diverged 5%", "one variant 3x sd", "relative margin"])
@pytest.mark.parametrize("true", [0.0, 1.0])
def test_family_error_under_misbehaving_noise(model, true):
    studies = power.simulate(power.MODELS[model], true, studies=STUDIES, seed=3)
    assert studies.family_error <= error_bound(), (model, true, studies.family_error)


def test_relative_margin_check_catches_a_lax_equivalence():
    lax = power.simulate(power.MODELS["relative margin"], 1.0, studies=STUDIES, seed=3, margin=2.0)
    assert lax.family_error > error_bound(), lax.family_error


def test_spending_and_previous_method_by_hand():
    """The harness's spending is Lan & DeMets' at t = 0.3, 0.6, 1; the previous method's level is
    alpha / (m K) two-sided."""
    spent = power.spending(0.05, (3, 6, 10))
    assert spent.sum() == pytest.approx(0.05)
    assert spent[0] == pytest.approx(2 * sps.norm.sf(sps.norm.isf(0.025) / math.sqrt(0.3)))
    assert spent[:2].sum() == pytest.approx(2 * sps.norm.sf(sps.norm.isf(0.025) / math.sqrt(0.6)))
    d = np.array([0.3, -0.2, 0.5, 0.1, 0.4, -0.1])  # one variant, 6 seeds: one look of K = 1
    y = np.stack([np.zeros(6), d])[None]
    code, within, n = power.previous_method(y, (6,), 0.05, 1.0, False)
    half = sps.t.isf(0.025, 5) * d.std(ddof=1) / math.sqrt(6)
    assert d.mean() - half < 0 < d.mean() + half and -1 < d.mean() - half and d.mean() + half < 1
    assert (DECISIONS[code[0, 0]], within[0, 0], n[0, 0]) == ("equivalent", True, 6)

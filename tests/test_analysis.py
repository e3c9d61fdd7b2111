"""analysis.analyse, the replay of a study's looks shared by the runner and the report: which seeds
each variant needs, and the verdict read at each look (intervals against tests/reference_stats.py:
statsmodels and scipy); the seeds and
cells of adaptive and vary_split studies; one-line errors for bad analysis settings."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy.stats import t as sps_t

from chae_ablate import analysis
from chae_ablate.config import AnalysisConfig
from chae_ablate.errors import ConfigError
from chae_ablate.records import CellRecord, CellState, PlannedCell
from chae_ablate.study import load_study, study_from_dict

from conftest import STUDIES
from reference_stats import reference, shared as shared_of, spent

ALPHA = 0.05
ORDER = [7, 3, 11, 0, 1, 2, 4, 5, 6, 8]  # the draw order: not sorted, so a sorted replay would differ
BASE = dict(zip(ORDER, [0.50, 0.53, 0.47, 0.52, 0.49, 0.51, 0.55, 0.46, 0.50, 0.48]))
DIFFS = {  # variant - baseline on the seeds in ORDER; margin 0.05, looks at 3, 6, 10 seeds
    "fast": [-0.30, -0.31, -0.29, -0.32, -0.30, -0.28, -0.31, -0.29, -0.30, -0.30],  # better at 3
    "mid": [0.14, 0.08, 0.11, 0.06, 0.10, 0.12, 0.09, 0.11, 0.10, 0.10],  # undecided at 3, worse at 6
    "slow": [0.05, -0.04, 0.03, -0.05, 0.04, -0.03, 0.01, -0.01, 0.00, 0.00],  # equivalent at 10
}
VARIANTS = ["baseline", *DIFFS]
VALUES = {"baseline": BASE, **{v: {s: BASE[s] + d for s, d in zip(ORDER, ds)} for v, ds in DIFFS.items()}}
SEEDS = {v: ORDER for v in VARIANTS}
ADAPTIVE = AnalysisConfig(adaptive=True, min_seeds=3, max_seeds=10, margin=0.05, relative=False)
PLAN = [3, 6, 10]


def a_at(look: int, m: int = 3) -> float:
    """The error each variant may spend at a look (0-based): alpha_k / m."""
    return spent(ALPHA, PLAN, look) / m


def everything(variant: str, seed: int) -> bool:
    return True


def diffs_on(variant: str, seeds, values=VALUES) -> np.ndarray:
    return np.array([values[variant][s] - values["baseline"][s] for s in seeds
                     if s in values[variant] and s in values["baseline"]])


def at_look(values: dict, seeds: dict) -> dict:
    """Every value a look knows: each variant's on its seeds so far."""
    return {v: {s: values[v][s] for s in seeds[v] if s in values[v]} for v in seeds}


def interval(values: dict, seeds: dict, variant: str, a: float, margin: float = 0.05) -> tuple[float, float]:
    ref = reference(at_look(values, seeds), variant, a, margin)
    return ref.low, ref.high


def same(a: analysis.Outcome, b: analysis.Outcome) -> bool:
    """Outcomes equal field by field, NaN equal to NaN."""
    try:
        np.testing.assert_equal(dataclasses.asdict(a), dataclasses.asdict(b))
    except AssertionError:
        return False
    return True


@pytest.fixture(scope="module")
def adaptive():
    return analysis.analyse(VALUES, everything, VARIANTS, SEEDS, ADAPTIVE)


def test_fixed_design_takes_one_look_at_every_listed_seed():
    """Fixed: K = 1, all listed seeds (here 12, more than max_seeds) at once, whatever min_seeds."""
    seeds = list(range(12))
    rng = np.random.default_rng(1)
    base = dict(zip(seeds, rng.normal(0.5, 0.03, 12)))
    values = {"baseline": base, "a": {s: base[s] - 0.2 + rng.normal(0, 0.01) for s in seeds},
              "b": {s: base[s] + rng.normal(0, 0.1) for s in seeds[:8]}}  # b lists only 8 seeds
    config = AnalysisConfig(margin=0.05, relative=False)
    out = analysis.analyse(values, everything, ["baseline", "a", "b"], {"baseline": seeds, "a": seeds, "b": seeds[:8]},
                           config)
    assert (out.n_looks, out.looks_taken, out.complete, out.margin) == (1, {"a": 1, "b": 1}, True, 0.05)
    assert out.seeds == {"baseline": seeds, "a": seeds, "b": seeds[:8]}
    for v, n in [("a", 12), ("b", 8)]:
        dec = out.decisions[v]
        assert dec.n == n and dec.level == pytest.approx(1 - ALPHA / 2)
        assert (dec.low, dec.high) == pytest.approx(interval(values, out.seeds, v, ALPHA / 2), rel=1e-9)
    assert out.decisions["a"].verdict == "better"
    assert out.decisions["b"].verdict == "undecided"


def test_adaptive_looks_stop_decided_variants(adaptive):
    """fast is decided at 3 seeds and gets no more; mid at 6; slow runs to 10, and so does the
    baseline, which needs as many as its longest variant. Seeds are the first n in draw order."""
    assert analysis.planned_looks(ADAPTIVE, 99) == [3, 6, 10]
    assert adaptive.seeds == {"baseline": ORDER, "fast": ORDER[:3], "mid": ORDER[:6], "slow": ORDER}
    assert adaptive.looks_taken == {"fast": 1, "mid": 2, "slow": 3}
    assert (adaptive.n_looks, adaptive.complete, adaptive.margin) == (3, True, 0.05)
    # what each look knew: every variant's seeds up to the look, the decided ones' up to their last
    knew = [{"baseline": ORDER[:3], "fast": ORDER[:3], "mid": ORDER[:3], "slow": ORDER[:3]},
            {"baseline": ORDER[:6], "fast": ORDER[:3], "mid": ORDER[:6], "slow": ORDER[:6]},
            {"baseline": ORDER, "fast": ORDER[:3], "mid": ORDER[:6], "slow": ORDER}]
    for v, look, verdict in [("fast", 0, "better"), ("mid", 1, "worse"), ("slow", 2, "equivalent")]:
        dec, d, n = adaptive.decisions[v], diffs_on(v, ORDER[:PLAN[look]]), PLAN[look]
        assert (dec.verdict, dec.n, dec.level) == (verdict, n, pytest.approx(1 - a_at(look)))
        assert dec.mean == pytest.approx(d.mean(), abs=1e-12)
        ref = reference(at_look(VALUES, knew[look]), v, a_at(look), 0.05)
        assert (dec.low, dec.high, dec.eq_low, dec.eq_high) == pytest.approx(
            (ref.low, ref.high, ref.eq_low, ref.eq_high), rel=1e-9)
        assert (dec.variance, dec.df) == (ref.variance, ref.df)
        for earlier in range(look):  # every earlier look's intervals were undecided
            ref = reference(at_look(VALUES, knew[earlier]), v, a_at(earlier), 0.05)
            assert ref.low < 0 < ref.high and (ref.eq_low < -0.05 or ref.eq_high > 0.05)


def test_a_look_waits_for_its_cells_and_keeps_earlier_decisions(adaptive):
    """One of mid's second-look cells is still running: the replay stops there, asks for the
    second look's seeds, and keeps the first look's verdicts."""
    out = analysis.analyse(VALUES, lambda v, s: (v, s) != ("mid", ORDER[4]), VARIANTS, SEEDS, ADAPTIVE)
    assert not out.complete
    assert out.seeds == {"baseline": ORDER[:6], "fast": ORDER[:3], "mid": ORDER[:6], "slow": ORDER[:6]}
    assert out.looks_taken == {"fast": 1, "mid": 1, "slow": 1}
    assert out.decisions["fast"] == adaptive.decisions["fast"]
    assert [out.decisions[v].verdict for v in ("mid", "slow")] == ["undecided", "undecided"]
    assert out.decisions["mid"].n == 3 and out.margin == 0.05


def test_an_unsettled_first_look_decides_nothing():
    out = analysis.analyse(VALUES, lambda v, s: (v, s) != ("baseline", ORDER[2]), VARIANTS, SEEDS,
                           dataclasses.replace(ADAPTIVE, relative=True))
    assert (out.complete, out.decisions, out.looks_taken) == (False, {}, {"fast": 0, "mid": 0, "slow": 0})
    assert out.seeds == {v: ORDER[:3] for v in VARIANTS} and math.isnan(out.margin)


def test_replay_is_deterministic_and_ignores_cells_beyond_the_needed_ones(adaptive):
    """The same outcome on a rerun, and whether or not cells past what the looks need (extra seeds,
    another variant's later seeds) were logged: a study advanced by several workers agrees."""
    assert same(adaptive, analysis.analyse(VALUES, everything, VARIANTS, SEEDS, ADAPTIVE))
    needed_only = {v: {s: VALUES[v][s] for s in adaptive.seeds[v]} for v in VARIANTS}
    assert same(adaptive, analysis.analyse(needed_only, lambda v, s: s in needed_only[v], VARIANTS, SEEDS, ADAPTIVE))
    more = {v: {**by_seed, 12: 9.0, 13: -9.0} for v, by_seed in VALUES.items()}
    assert same(adaptive, analysis.analyse(more, everything, VARIANTS, SEEDS, ADAPTIVE))
    assert not same(adaptive, analysis.analyse(VALUES, everything, VARIANTS, {v: sorted(ORDER) for v in VARIANTS},
                                               ADAPTIVE))  # the draw order matters


def test_failed_cells_are_settled_without_a_value():
    """A failed cell (settled, no value) drops its pair; a failed baseline cell drops the pair of
    every variant on that seed."""
    values = {v: dict(by_seed) for v, by_seed in VALUES.items()}
    del values["slow"][ORDER[1]], values["baseline"][ORDER[4]]
    out = analysis.analyse(values, everything, VARIANTS, SEEDS, ADAPTIVE)
    assert out.complete and out.seeds == {"baseline": ORDER, "fast": ORDER[:3], "mid": ORDER[:6], "slow": ORDER}
    for v, n_pairs, look in [("fast", 3, 0), ("mid", 5, 1), ("slow", 8, 2)]:
        dec, d = out.decisions[v], diffs_on(v, out.seeds[v], values)
        assert len(d) == dec.n == n_pairs
        knew = {u: seeds[:PLAN[look]] for u, seeds in out.seeds.items()}
        assert (dec.low, dec.high) == pytest.approx(interval(values, knew, v, a_at(look)), rel=1e-9)


def test_relative_margin_is_tested_against_the_baseline_seed_by_seed():
    """A relative margin is no number fixed at the first look: each variant's equivalence is the two
    one-sided tests of value - (1 +- r) x baseline per seed (the baseline's noise counted), and the
    margin shown is r x the baseline's mean over the seeds the verdict used."""
    config = dataclasses.replace(ADAPTIVE, relative=True, margin=0.1)
    out = analysis.analyse(VALUES, everything, VARIANTS, SEEDS, config)
    for v, d in out.decisions.items():
        assert d.margin == pytest.approx(0.1 * abs(np.mean([BASE[s] for s in out.seeds[v]])), rel=1e-12)
    assert out.margin == pytest.approx(0.1 * np.mean([BASE[s] for s in out.seeds["baseline"]]), rel=1e-12)
    slow = out.decisions["slow"]
    y, y0 = (np.array([VALUES[u][s] for s in ORDER]) for u in ("slow", "baseline"))
    var, df = shared_of({u: {s: VALUES[u][s] for s in out.seeds[u]} for u in VARIANTS})
    a = a_at(len(PLAN) - 1)
    for k, side in [(1.1, -1), (0.9, 1)]:  # up: y - 1.1 y0 < 0; down: y - 0.9 y0 > 0
        c = y - k * y0
        half = max(sps_t.isf(a, df) * math.sqrt((1 + k * k) * var / len(c)),
                   sps_t.isf(0.02, len(c) - 1) * c.std(ddof=1) / math.sqrt(len(c)))
        assert (c.mean() - side * half) * side > 0  # the bound lies on the equivalent side
    assert slow.verdict == "equivalent"
    negative = {v: {s: -x for s, x in by_seed.items()} for v, by_seed in VALUES.items()}  # |mean|, not mean
    assert analysis.analyse(negative, everything, VARIANTS, SEEDS, config).margin == pytest.approx(out.margin)


@pytest.mark.parametrize("adaptive", [False, True])
def test_relative_margin_without_a_baseline_value_is_undecided(adaptive):
    """Every baseline cell failed: nothing can size the margin, so no verdict, and no crash."""
    values = {v: by_seed for v, by_seed in VALUES.items() if v != "baseline"}
    config = dataclasses.replace(ADAPTIVE, relative=True, adaptive=adaptive)
    out = analysis.analyse(values, everything, VARIANTS, SEEDS, config)
    assert math.isnan(out.margin) and out.complete
    assert {v: d.verdict for v, d in out.decisions.items()} == dict.fromkeys(DIFFS, "undecided")
    assert {d.n for d in out.decisions.values()} == {0}
    assert out.seeds["fast"] == ORDER  # undecided all the way


def test_higher_is_better_metric_flips_better_and_worse(adaptive):
    out = analysis.analyse(VALUES, everything, VARIANTS, SEEDS, dataclasses.replace(ADAPTIVE, metric="test_acc"))
    assert {v: d.verdict for v, d in out.decisions.items()} == {"fast": "worse", "mid": "better", "slow": "equivalent"}
    assert out.seeds == adaptive.seeds  # the same intervals decide at the same looks
    assert (out.decisions["fast"].low, out.decisions["fast"].high) == (adaptive.decisions["fast"].low,
                                                                       adaptive.decisions["fast"].high)
    assert out.decisions["fast"].share_better == 0.0 and adaptive.decisions["fast"].share_better == 1.0


def test_a_study_of_only_the_baseline_is_complete():
    out = analysis.analyse({"baseline": BASE}, everything, ["baseline"], {"baseline": ORDER}, ADAPTIVE)
    assert out.complete and out.decisions == {} and out.seeds == {"baseline": ORDER[:3]}


# --- the study's seeds and cells -------------------------------------------------------------------

def test_adaptive_study_draws_every_variant_from_one_seed_sequence():
    study = load_study(STUDIES / "synthetic-tiny.yaml", {"analysis.adaptive": True})
    assert study.analysis.adaptive and study.analysis.max_seeds == 10
    assert [study.seeds(v) for v in study.variants] == [list(range(10))] * 2  # [0, 1] then 2..9
    cells = study.cells()
    assert [(c.variant.name, c.seed) for c in cells] == [(v, s) for v in ("baseline", "depth2") for s in range(10)]
    assert len({c.cell_hash for c in cells}) == 20
    fixed = {(c.variant.name, c.seed): c.cell_hash for c in load_study(STUDIES / "synthetic-tiny.yaml").cells()}
    # the fixed study's cells are the adaptive study's first two seeds: nothing is retrained
    assert fixed == {(c.variant.name, c.seed): c.cell_hash for c in cells if c.seed < 2}
    drawn = load_study(STUDIES / "synthetic-tiny.yaml",
                       {"analysis.adaptive": True, "analysis.max_seeds": 5, "protocol.seeds": [5, 2]})
    assert drawn.seeds(drawn.baseline) == [5, 2, 6, 7, 8]  # listed seeds first, then those after the largest


def test_vary_split_gives_each_seed_its_own_split():
    study = load_study(STUDIES / "synthetic-tiny.yaml", {"analysis.vary_split": True, "data.split_seed": 42})
    cells = study.cells()
    assert [c.config.data.split_seed for c in cells] == [c.seed for c in cells] == [0, 1, 0, 1]
    assert len({c.cell_hash for c in cells}) == 4
    fixed = load_study(STUDIES / "synthetic-tiny.yaml", {"data.split_seed": 42}).cells()
    assert {c.config.data.split_seed for c in fixed} == {42}
    assert not {c.cell_hash for c in cells} & {c.cell_hash for c in fixed}  # another split, another cell
    both = load_study(STUDIES / "synthetic-tiny.yaml", {"analysis.vary_split": True, "analysis.adaptive": True})
    assert [c.config.data.split_seed for c in both.cells()] == list(range(10)) * 2


# --- bad analysis settings -------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    ({"margin": 0}, "analysis.margin: 0.0 must be > 0"),
    ({"margin": -0.1, "relative": False}, "analysis.margin: -0.1 must be > 0"),
    ({"margin": 1.0}, "analysis.margin: 1.0 is a fraction of the baseline's mean"),
    ({"margin": 5}, "analysis.margin: 5.0 is a fraction"),
    ({"min_seeds": 6, "max_seeds": 5}, "analysis.max_seeds: 5 must be between min_seeds (6) and 100"),
    ({"min_seeds": 1}, "analysis.min_seeds: 1 must be between 2 and 100"),
    ({"step": 0}, "analysis.step: 0 must be between 1 and 100"),
    ({"metric": "val_acc"}, "analysis.metric: 'val_acc' is not one of best_val_loss, test_loss, test_acc"),
    ({"alpha": 0}, "analysis.alpha: 0.0 must be in (0, 0.5]"),
    ({"alpha": 1.0}, "analysis.alpha: 1.0 must be in (0, 0.5]"),
    ({"alpha": -0.05}, "analysis.alpha: -0.05 must be in (0, 0.5]"),
    ({"alpha": ".nan"}, "analysis.alpha: expected float"),
    ({"margn": 0.1}, "analysis.margn: unknown key (did you mean 'margin'?)"),
    ({"margin": "5%"}, "analysis.margin: expected float, got str '5%'"),
    ({"adaptive": "yes"}, "analysis.adaptive: expected bool"),
])
def test_bad_analysis_settings_are_one_line_errors_naming_the_field(settings, message):
    with pytest.raises(ConfigError) as err:
        study_from_dict({"name": "t", "analysis": settings}, {})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("settings", [{"margin": 2.0, "relative": False}, {"alpha": 0.5},
                                      {"min_seeds": 4, "max_seeds": 4}, {"metric": "test_acc", "step": 1}, {}, None])
def test_good_analysis_settings_are_accepted(settings):
    study = study_from_dict({"name": "t", "analysis": settings}, {})
    assert study.analysis == AnalysisConfig(**(settings or {}))


def test_analysis_overrides_are_validated_too():
    with pytest.raises(ConfigError, match=r"^analysis\.alpha: 0\.9 must be in \(0, 0\.5\]"):
        study_from_dict({"name": "t"}, {"analysis.alpha": 0.9})
    with pytest.raises(ConfigError, match=r"^analysis: expected a mapping"):
        study_from_dict({"name": "t", "analysis": [0.05]}, {})


def test_adaptive_study_refuses_a_variant_with_its_own_seeds():
    raw = {"name": "t", "analysis": {"adaptive": True},
           "variants": {"k5": {"set": {"protocol.seeds": [3, 4], "protocol.lr": 0.01}}}}
    with pytest.raises(ConfigError, match=r"^variants\.k5\.protocol\.seeds: cannot differ"):
        study_from_dict(raw, {})
    fixed = study_from_dict({**raw, "analysis": {}}, {})
    assert fixed.seeds(fixed.variants[1]) == [3, 4]


def plan_of(values: dict, seeds: dict, config: AnalysisConfig, version: str = "v1") -> analysis.Plan:
    cells = tuple(PlannedCell(f"{version}-{v}-{s}", v, s) for v in seeds for s in seeds[v])
    return analysis.Plan("t", cells, {v: tuple(ss) for v, ss in seeds.items()}, config)


def records_of(values: dict, version: str = "v1", state: CellState = CellState.DONE) -> list[CellRecord]:
    return [CellRecord(f"{version}-{v}-{s}", v, s, state, {"best_val_loss": x}) for v, by_seed in values.items()
            for s, x in by_seed.items()]


def test_outcome_joins_records_to_the_plan_on_the_cell_hash_alone(adaptive):
    """Records of another version of the study (other hashes, same variants and seeds) are listed as
    earlier and never counted: the plan's own cells without a record are missing."""
    plan = plan_of(VALUES, SEEDS, ADAPTIVE)
    mine = records_of({v: {s: VALUES[v][s] for s in adaptive.seeds[v]} for v in VARIANTS})
    out = analysis.outcome(plan, mine)
    assert out.seeds == adaptive.seeds and out.complete
    assert {v: d.verdict for v, d in out.decisions.items()} == {"fast": "better", "mid": "worse", "slow": "equivalent"}
    assert [c.cell_hash for c in out.needed] == [f"v1-{v}-{s}" for v in VARIANTS for s in adaptive.seeds[v]]

    gross = {v: {s: 10.0 for s in ORDER} for v in VARIANTS}  # an earlier version with absurd values
    del mine[0]  # the current baseline's first cell has no record yet
    out = analysis.outcome(plan, [*mine, *records_of(gross, version="v0")])
    assert len(out.earlier) == 4 * 10 and {r.cell_hash[:2] for r in out.earlier} == {"v0"}
    first = out.records[f"v1-baseline-{ORDER[0]}"]
    assert first.state == CellState.MISSING and not out.complete  # waits for its own cell
    assert out.decisions == {} and math.isnan(out.value(out.needed[0], "best_val_loss"))


def test_outcome_keeps_unneeded_cells_of_the_plan_apart(adaptive):
    """Cells of this plan that no look needed (seeds run before the study became adaptive) are
    neither counted nor called earlier."""
    plan = plan_of(VALUES, SEEDS, ADAPTIVE)
    out = analysis.outcome(plan, records_of(VALUES))
    assert same(dataclasses.replace(out, needed=(), records={}, unneeded=(), earlier=()), adaptive)
    unneeded = {(r.variant, r.seed) for r in out.unneeded}
    assert unneeded == {(v, s) for v in VARIANTS for s in ORDER if s not in adaptive.seeds[v]}
    assert out.earlier == ()

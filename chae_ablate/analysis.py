"""A study's plan and where it stands: which cells it needs, which are settled, and its verdicts.

`outcome(plan, records)` is the one place that joins cell records (from the ledger or from MLflow)
to a study: on the cell hash alone, so a record of another version of the study (other epochs,
another variant definition) is never counted, only listed. It replays the study's looks from the
values known so far; the runner uses it to queue an adaptive study's next round, `status` to
count, the report to print the verdicts, so all of them always agree. Replaying from scratch makes
it deterministic: a study killed and rerun, or advanced by several workers, takes exactly the same
looks and ends with the same seed counts. The statistics are stats.decide's; see stats.METHOD.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import stats
from .config import AnalysisConfig, parse, to_dict
from .metrics import LOWER_IS_BETTER, Metric
from .records import BASELINE, CellRecord, CellState, PlannedCell, Verdict


@dataclass(frozen=True)
class Plan:
    """One version of a study: the cells it may train, each variant's seeds in draw order, how it
    decides, and each variant's resolved settings. Kept as plan.json in the study's MLflow record,
    so a report is rebuilt from the store alone."""

    study: str
    cells: tuple[PlannedCell, ...]  # every cell the study may run (an adaptive one runs only some), baseline first
    seeds: Mapping[str, tuple[int, ...]]  # per variant (baseline first): the seeds it may use, in draw order
    analysis: AnalysisConfig
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # per variant: dotted path -> value
    source: str = ""  # the study file, resolved ("" for a study built in code)

    @property
    def variants(self) -> list[str]:
        return list(self.seeds)

    @property
    def fingerprint(self) -> str:
        """What makes two versions of a study the same: its cells (by the configuration each
        trains), its variants' names and seeds, and its analysis settings."""
        key = {"cells": [[c.cell_hash, c.variant, c.seed] for c in self.cells],
               "seeds": {v: list(s) for v, s in self.seeds.items()}, "analysis": to_dict(self.analysis)}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]

    def to_json(self) -> dict:
        return {"study": self.study, "source": self.source, "fingerprint": self.fingerprint,
                "cells": [{"variant": c.variant, "seed": c.seed, "cell_hash": c.cell_hash,
                           "description": c.description} for c in self.cells],
                "analysis": to_dict(self.analysis), "seeds": {v: list(s) for v, s in self.seeds.items()},
                "settings": {v: dict(s) for v, s in self.settings.items()}}

    @classmethod
    def from_json(cls, data: dict | list, study: str = "") -> Plan:
        """A plan as plan.json holds it; a plan written before the analysis section (a bare list of
        cells) reads as the default analysis over its listed seeds."""
        data = {"cells": data} if isinstance(data, list) else data
        cells = tuple(PlannedCell(str(c["cell_hash"]), str(c["variant"]), int(c["seed"]), str(c.get("description", "")))
                      for c in data.get("cells", []))
        listed = data.get("seeds") or {}
        seeds: dict[str, tuple[int, ...]] = {v: tuple(int(s) for s in ss) for v, ss in listed.items()}
        if not seeds:
            for c in cells:
                seeds[c.variant] = (*seeds.get(c.variant, ()), c.seed)
        analysis = parse(AnalysisConfig, data.get("analysis") or {}, "analysis")
        return cls(data.get("study", study), cells, seeds, analysis, data.get("settings") or {}, data.get("source", ""))


def planned_looks(analysis: AnalysisConfig, fixed_seeds: int) -> list[int]:
    """Seed counts at which verdicts are taken: the adaptive plan, or one look at the fixed seeds."""
    if analysis.adaptive:
        return stats.looks(analysis.min_seeds, analysis.max_seeds, analysis.step)
    return [fixed_seeds]


@dataclass(frozen=True)
class Outcome:
    """Where a study stands."""

    needed: tuple[PlannedCell, ...]  # the cells its looks have reached so far, baseline first
    records: Mapping[str, CellRecord]  # per needed cell's hash: its record (MISSING when no store has it)
    unneeded: tuple[CellRecord, ...]  # records of this plan's cells that no look needed (not counted)
    earlier: tuple[CellRecord, ...]  # records of cells this plan does not have: another version's (never counted)
    seeds: dict[str, list[int]]  # per variant (baseline included): the seeds it needs up to now
    decisions: dict[str, stats.Decision]  # per non-baseline variant with a look taken: its verdict
    looks_taken: dict[str, int]  # per non-baseline variant: looks taken so far
    n_looks: int  # K, planned in advance
    margin: float  # absolute, in the metric's units (NaN until the baseline has a value)
    complete: bool  # every look the study needs is taken: nothing more to train
    stopped: tuple[str, ...] = ()  # undecided variants stopped for futility (stats.futile) before the last look

    def value(self, cell: PlannedCell, metric: str) -> float:
        """The cell's metric when it is in the statistics (done, finite), else NaN."""
        return _value(self.records.get(cell.cell_hash), metric)


def outcome(plan: Plan, records: Iterable[CellRecord]) -> Outcome:
    """Join the records (one per cell hash) to the plan and replay the study's looks on them."""
    by_hash = {r.cell_hash: r for r in records}
    planned = {c.cell_hash for c in plan.cells}
    at = {(c.variant, c.seed): by_hash.get(c.cell_hash) for c in plan.cells}
    values: dict[str, dict[int, float]] = {}
    for (variant, seed), record in at.items():
        if not math.isnan(value := _value(record, plan.analysis.metric)):
            values.setdefault(variant, {})[seed] = value
    settled = {key for key, r in at.items() if r is not None and r.state.settled}
    replay = analyse(values, lambda v, s: (v, s) in settled, plan.variants, plan.seeds, plan.analysis)
    needed = tuple(c for c in plan.cells if c.seed in replay.seeds.get(c.variant, ()))
    needed_hashes = {c.cell_hash for c in needed}
    return replace(
        replay, needed=needed,
        records={c.cell_hash: by_hash.get(c.cell_hash) or CellRecord(c.cell_hash, c.variant, c.seed, CellState.MISSING)
                 for c in needed},
        unneeded=tuple(r for h, r in by_hash.items() if h in planned and h not in needed_hashes),
        earlier=tuple(r for h, r in by_hash.items() if h not in planned))


def _value(record: CellRecord | None, metric: str) -> float:
    """A finished cell's metric; a diverged cell's is the worst possible (stats counts it as the
    worst value of its look); NaN when there is no result."""
    if record is None or record.state != CellState.DONE:
        return math.nan
    value = float(record.metrics.get(metric, math.nan))
    if not math.isfinite(value) and Metric.DIVERGED_EPOCH in record.metrics:
        return math.inf if LOWER_IS_BETTER[metric] else -math.inf
    return value


def analyse(values: Mapping[str, Mapping[int, float]], settled, variants: Sequence[str],
            seeds: Mapping[str, Sequence[int]], analysis: AnalysisConfig) -> Outcome:
    """Replay the study's looks on what is known (an Outcome without its records: see outcome).

    values[variant][seed]: the metric of each finished cell. settled(variant, seed): whether that
    cell is finished or failed (it will not produce a value later). variants: baseline first.
    seeds: per variant, the seeds it may use, in the order they are drawn (all of a fixed study's
    seeds; the seed sequence of an adaptive one). A look is taken once all its cells are settled.
    """
    baseline, others = variants[0], list(variants[1:])
    looks = planned_looks(analysis, max((len(seeds[v]) for v in variants), default=0))
    needed = {v: [] for v in variants}
    decisions: dict[str, stats.Decision] = {}
    taken = {v: 0 for v in others}
    active, margin, stopped = others, math.nan, []

    def standing(complete: bool) -> Outcome:
        return Outcome((), {}, (), (), needed, decisions, taken, len(looks), margin, complete, tuple(stopped))

    for k, n in enumerate(looks):
        for v in [baseline, *active]:
            needed[v] = list(seeds[v])[:n] if analysis.adaptive else list(seeds[v])
        if not all(settled(v, s) for v in [baseline, *active] for s in needed[v]):
            return standing(complete=False)
        known = {v: {s: values[v][s] for s in needed[v] if s in values.get(v, {})} for v in variants}
        margin = stats.absolute_margin(analysis.margin, analysis.relative,
                                       [y for y in known[baseline].values() if math.isfinite(y)])
        if not active:
            break
        looked = stats.decide(known, active, baseline=baseline, margin=analysis.margin, relative=analysis.relative,
                              plan=looks, look=k, alpha=analysis.alpha, n_variants=len(others),
                              lower_is_better=LOWER_IS_BETTER[analysis.metric])
        for v in active:
            decisions[v], taken[v] = looked[v], k + 1
        active = [v for v in active if looked[v].verdict == Verdict.UNDECIDED]
        if analysis.adaptive and 0 < k < len(looks) - 1:  # futility: not on 3 seeds' word, nor at the end
            a_last = last_look_level(analysis, len(others))
            stopped += [v for v in active if stats.futile(looked[v], a_last, looks[-1])]
            active = [v for v in active if v not in stopped]
        if not active:
            break
    return standing(complete=True)


def last_look_level(analysis: AnalysisConfig, n_variants: int) -> float:
    """a_K, the error each of the study's n_variants may spend at its last look: what more seeds are
    judged against (a fixed design's one look spends all of alpha, whatever its seeds)."""
    plan = planned_looks(analysis, 2)
    return stats.look_level(analysis.alpha, max(n_variants, 1), plan, len(plan) - 1)


@dataclass(frozen=True)
class SeedsNeed:
    """What an undecided variant would likely need for a verdict (stats.seeds_needed)."""
    variant: str
    seeds: int  # paired seeds it has
    needed: int | None  # seeds it would likely need at the observed difference and spread; None: over 100
    cell_minutes: float  # training the extra seeds would take (its cells and the baseline's), NaN if unknown

    @property
    def text(self) -> str:
        if self.needed is None:
            return f"`{self.variant}` would need more than 100 seeds at its difference and spread"
        cost = f", about {self.cell_minutes:.0f} cell-minutes" if math.isfinite(self.cell_minutes) else ""
        return f"`{self.variant}` likely needs {self.needed} seeds (has {self.seeds}{cost})"


def seeds_needs(standing: Outcome, analysis: AnalysisConfig, minutes: Mapping[str, float]) -> list[SeedsNeed]:
    """For each undecided variant: the seeds it would likely need at its observed difference and
    spread, tested at the last look's level, and what they cost at each variant's mean minutes per
    cell (minutes: variant -> minutes; the baseline's extra seeds are counted too)."""
    a = last_look_level(analysis, len(standing.looks_taken))
    base_n = len(standing.seeds.get(BASELINE, ()))
    out = []
    for variant, d in standing.decisions.items():
        if d.verdict != Verdict.UNDECIDED or d.n < 2:  # one seed tells no spread
            continue
        needed = stats.seeds_needed(d.mean, d.spread, d.margin, a, at_least=d.n + 1)
        cost = (math.nan if needed is None else
                (needed - d.n) * minutes.get(variant, math.nan) + max(0, needed - base_n) * minutes.get(BASELINE, math.nan))
        out.append(SeedsNeed(variant, d.n, needed, cost))
    return out


def minutes_per_cell(records: Iterable[CellRecord]) -> dict[str, float]:
    """Each variant's mean training minutes per finished cell (wall_time_s of its records)."""
    times: dict[str, list[float]] = {}
    for r in records:
        if r.state == CellState.DONE and math.isfinite(t := float(r.metrics.get(Metric.WALL_TIME_S, math.nan))):
            times.setdefault(r.variant, []).append(t / 60)
    return {v: sum(t) / len(t) for v, t in times.items()}

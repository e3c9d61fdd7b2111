"""The study's decision: which seeds each variant needs, and its verdict against the baseline.

One function, `analyse`, replays the study's looks from the cell values known so far; the runner
uses it to queue the next round of an adaptive study and the report to print the verdicts, so
both always agree. Replaying from scratch makes it deterministic: a study killed and rerun, or
advanced by several workers, takes exactly the same looks and ends with the same seed counts.
The statistics (intervals, error guarantee across looks) are stats.decide's; see stats.METHOD.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from . import stats
from .config import AnalysisConfig

LOWER_IS_BETTER = {"best_val_loss": True, "test_loss": True, "test_acc": False}


def planned_looks(analysis: AnalysisConfig, fixed_seeds: int) -> list[int]:
    """Seed counts at which verdicts are taken: the adaptive plan, or one look at the fixed seeds."""
    if analysis.adaptive:
        return stats.looks(analysis.min_seeds, analysis.max_seeds, analysis.step)
    return [fixed_seeds]


@dataclass(frozen=True)
class Outcome:
    """Where a study stands: the seeds each variant needs so far and each variant's latest verdict."""

    seeds: dict[str, list[int]]  # per variant (baseline included): the seeds it needs up to now
    decisions: dict[str, stats.Decision]  # per non-baseline variant with a look taken: its verdict
    looks_taken: dict[str, int]  # per non-baseline variant: looks taken so far
    n_looks: int  # K, planned in advance
    margin: float  # absolute, in the metric's units (NaN until the baseline has a value)
    complete: bool  # every look the study needs is taken: nothing more to train


def absolute_margin(analysis: AnalysisConfig, baseline_values: Sequence[float]) -> float:
    """The margin in the metric's units: as given, or a fraction of the baseline's mean."""
    if not analysis.relative:
        return analysis.margin
    values = [v for v in baseline_values if math.isfinite(v)]
    return analysis.margin * abs(float(np.mean(values))) if values else math.nan


def analyse(values: Mapping[str, Mapping[int, float]], settled: Callable[[str, int], bool],
            variants: Sequence[str], seeds: Mapping[str, Sequence[int]], analysis: AnalysisConfig) -> Outcome:
    """Replay the study's looks on what is known.

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
    active, margin = others, math.nan
    for k, n in enumerate(looks):
        for v in [baseline, *active]:
            needed[v] = list(seeds[v])[:n] if analysis.adaptive else list(seeds[v])
        if not all(settled(v, s) for v in [baseline, *active] for s in needed[v]):
            return Outcome(needed, decisions, taken, len(looks), margin, complete=False)
        base = values.get(baseline, {})
        if k == 0:
            margin = absolute_margin(analysis, [base[s] for s in needed[baseline] if s in base])
        if not active:
            break
        diffs = {v: [values.get(v, {})[s] - base[s] for s in needed[v] if s in base and s in values.get(v, {})]
                 for v in active}
        if math.isfinite(margin) and margin > 0:
            looked = stats.decide(diffs, margin, n_looks=len(looks), alpha=analysis.alpha, n_variants=len(others),
                                  lower_is_better=LOWER_IS_BETTER[analysis.metric])
        else:  # no baseline value to size a relative margin: nothing can be decided
            looked = stats.decide(diffs, 1.0, n_looks=len(looks), alpha=analysis.alpha, n_variants=len(others),
                                  lower_is_better=LOWER_IS_BETTER[analysis.metric])
            looked = {v: undecided(d, margin) for v, d in looked.items()}
        for v in active:
            decisions[v], taken[v] = looked[v], k + 1
        active = [v for v in active if looked[v].verdict == stats.UNDECIDED]
        if not active:
            break
    return Outcome(needed, decisions, taken, len(looks), margin, complete=True)


def undecided(decision: stats.Decision, margin: float) -> stats.Decision:
    """A decision forced to undecided (no usable margin), with its figures kept."""
    return replace(decision, verdict=stats.UNDECIDED, within_margin=False, margin=margin)

"""The study plan: every cell's shape and cost, computed without training or allocating a model.

Costs come from the meta device (~0.1 s a model, whatever its size), once per distinct model:
a 999-variant study plans in under two minutes, with a progress bar on a terminal.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
from tqdm import tqdm

from . import stats, tracking
from .analysis import last_look_level, minutes_per_cell, outcome
from .config import DataConfig, ModelConfig
from .errors import ChaeError
from .model import forward_flops, parameter_count
from .records import BASELINE
from .sources import SOURCES
from .study import Study, changed_paths

PROGRESS_FROM = 50  # variants; smaller studies plan in a few seconds


def expected_classes(data: DataConfig) -> tuple[int, str]:
    """Number of classes the data will have, and where that number comes from."""
    return SOURCES[data.source].classes(data)


def model_cost(model: ModelConfig, num_classes: int) -> tuple[int, float]:
    """Trainable parameters and forward MFLOPs per image, both counted on the meta device."""
    return parameter_count(model, num_classes), forward_flops(model, num_classes) / 1e6


def plan_table(study: Study) -> tuple[pd.DataFrame, str]:
    """One row per variant (params, MFLOPs, tokens) and a footer line with the cell count."""
    num_classes, origin = expected_classes(study.baseline.config.data)
    costs: dict[ModelConfig, tuple[int, float]] = {}  # variants that change only data or protocol share one
    rows = []
    quiet = len(study.variants) <= PROGRESS_FROM or not sys.stderr.isatty()
    for v in tqdm(study.variants, desc=f"plan {study.name}", unit="variant", file=sys.stderr,
                  disable=quiet, leave=False):
        m = v.config.model
        if m not in costs:
            costs[m] = model_cost(m, num_classes)
        rows.append({
            "variant": v.name,
            "changes": changed_paths(v),
            "resolution": m.resolution,
            "tokens": m.tokens,
            "params": costs[m][0],
            "MFLOPs/img": costs[m][1],
            "seeds": len(study.seeds(v)),
        })
    table = pd.DataFrame(rows)
    a = study.analysis
    if a.adaptive:
        table["seeds"] = f"{a.min_seeds}-{a.max_seeds}"
        count = f"{a.min_seeds * len(rows)} to {a.max_seeds * len(rows)} cells (adaptive seeds)"
    else:
        count = f"{int(table['seeds'].sum())} cells"
    footer = (f"{len(rows)} variants x seeds = {count}, {study.baseline.config.protocol.epochs} epochs each; "
              f"classes: {num_classes} ({origin})")
    return table, footer


def format_plan(table: pd.DataFrame) -> str:
    return table.to_string(index=False, formatters={
        "params": "{:,}".format, "MFLOPs/img": "{:,.1f}".format})


def seeds_from_earlier(study: Study, earlier: str) -> list[str]:
    """How many seeds each of the study's variants would likely need for a verdict, judged from an
    earlier study's results in MLflow (`plan --spread-from`): a variant the earlier study has is
    taken at its observed difference and spread; a new one at the earlier study's shared spread
    with no effect (the case that needs the most seeds to call equivalent)."""
    runs = tracking.load_study_runs(earlier)
    if runs.plan is None:
        raise ChaeError(f"study '{earlier}' has no recorded plan in MLflow; rerun it with this chae-ablate first")
    analysis = study.analysis
    if runs.plan.analysis.metric != analysis.metric:
        raise ChaeError(f"study '{earlier}' decided on {runs.plan.analysis.metric}, this one on {analysis.metric}; "
                        f"set analysis.metric alike to compare spreads")
    standing = outcome(runs.plan, runs.records)
    spreads = [d.spread for d in standing.decisions.values() if d.variance == "shared" and d.n >= 2]
    shared_sd = spreads[0] if spreads else math.nan
    base = [standing.value(c, analysis.metric) for c in standing.needed if c.variant == BASELINE]
    margin = stats.absolute_margin(analysis.margin, analysis.relative, [v for v in base if math.isfinite(v)])
    others = [v for v in study.variants if v.name != BASELINE]
    a = last_look_level(analysis, len(others))
    minutes = minutes_per_cell(runs.records)
    typical = float(np.mean(list(minutes.values()))) if minutes else math.nan
    lines = [f"from study '{earlier}' ({len(standing.decisions)} variants decided or measured; shared spread of a "
             f"paired difference {shared_sd:.4g}; margin here {margin:.4g}; each test at level {a:.2g}):"]
    for v in others:
        d = standing.decisions.get(v.name)
        mean, sd, why = ((d.mean, d.spread, f"its earlier difference {d.mean:+.4g}") if d and d.n >= 2
                         else (0.0, shared_sd, "new here: no effect assumed"))
        n = stats.seeds_needed(mean, sd, margin, a)
        per_cell = minutes.get(v.name, typical)
        cost = f", about {n * (per_cell + minutes.get(BASELINE, typical)):.0f} cell-minutes with the baseline's" \
            if n and math.isfinite(per_cell) else ""
        lines.append(f"  {v.name}: {f'{n} seeds' if n else 'more than 100 seeds'} ({why}{cost})")
    return lines

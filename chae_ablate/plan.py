"""The study plan: every cell's shape and cost, computed without training or allocating a model.

Costs come from the meta device (~0.1 s a model, whatever its size, for every builder), once per
distinct model and protocol: a 999-variant study plans in under two minutes, with a progress bar
on a terminal.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm import tqdm

from . import stats, tracking
from .analysis import last_look_level, minutes_per_cell, outcome
from .builders import failing_as, forward_flops, parameter_count, training_memory
from .config import DataConfig, ExperimentConfig, ModelConfig
from .errors import ChaeError
from .records import BASELINE
from .render import json_rows
from .sources import SOURCES
from .study import Study, changed_paths

PROGRESS_FROM = 50  # variants; smaller studies plan in a few seconds


def expected_classes(data: DataConfig) -> tuple[int, str]:
    """Number of classes the data will have, and where that number comes from."""
    return SOURCES[data.source].classes(data)


@dataclass(frozen=True)
class ModelCost:
    params: int  # trainable parameters
    mflops: float  # forward MFLOPs per image
    memory_mb: float  # one training step's weights, gradients, optimizer state and saved activations (estimate)


def model_cost(config: ExperimentConfig, num_classes: int, variant: str = BASELINE) -> ModelCost:
    """What a cell's network costs, counted on the meta device (nothing allocated); a builder that
    fails is a one-line ChaeError naming the variant."""
    m, p = config.model, config.protocol
    with failing_as(m, variant):
        return ModelCost(parameter_count(m, num_classes), forward_flops(m, num_classes) / 1e6,
                         training_memory(m, num_classes, p.batch_size, p.optimizer) / 2**20)


@dataclass(frozen=True)
class StudyPlan:
    """What a study will train, before anything is trained (`plan`, `plan --json`, the API)."""

    study: str
    table: pd.DataFrame  # one row per variant: variant, changes, resolution, tokens, params, mflops, memory_mb, seeds
    cells: tuple[int, int]  # cells it will train: fewest and most (equal unless seeds are adaptive)
    epochs: int
    classes: int
    classes_from: str  # where the class count comes from

    @property
    def footer(self) -> str:
        fewest, most = self.cells
        count = f"{fewest} cells" if fewest == most else f"{fewest} to {most} cells (adaptive seeds)"
        return (f"{len(self.table)} variants x seeds = {count}, {self.epochs} epochs each; "
                f"classes: {self.classes} ({self.classes_from})")

    def to_json(self) -> dict:
        return {"study": self.study, "variants": json_rows(self.table), "cells_min": self.cells[0],
                "cells_max": self.cells[1], "epochs": self.epochs, "classes": self.classes,
                "classes_from": self.classes_from}


def study_plan(study: Study) -> StudyPlan:
    """Every variant's shape and cost (params, MFLOPs per image, training memory, CHAE's tokens) and
    the cells to train."""
    num_classes, origin = expected_classes(study.baseline.config.data)
    costs: dict[tuple, ModelCost] = {}  # variants that change only the data or the lr share one
    rows = []
    quiet = len(study.variants) <= PROGRESS_FROM or not sys.stderr.isatty()
    for v in tqdm(study.variants, desc=f"plan {study.name}", unit="variant", file=sys.stderr,
                  disable=quiet, leave=False):
        m, p = v.config.model, v.config.protocol
        key = (m, p.batch_size, p.optimizer)
        if key not in costs:
            costs[key] = model_cost(v.config, num_classes, v.name)
        c = costs[key]
        rows.append({"variant": v.name, "changes": changed_paths(v), "resolution": m.resolution,
                     "tokens": m.tokens if isinstance(m, ModelConfig) else math.nan, "params": c.params,
                     "mflops": c.mflops, "memory_mb": c.memory_mb, "seeds": len(study.seeds(v))})
    table = pd.DataFrame(rows)
    a = study.analysis
    if a.adaptive:
        table["seeds"] = f"{a.min_seeds}-{a.max_seeds}"
        cells = (a.min_seeds * len(rows), a.max_seeds * len(rows))
    else:
        cells = (int(table["seeds"].sum()),) * 2
    return StudyPlan(study.name, table, cells, study.baseline.config.protocol.epochs, num_classes, origin)


def format_plan(table: pd.DataFrame) -> str:
    """The plan's table as text; tokens are "-" for models without them (not CHAE)."""
    return table.rename(columns={"mflops": "MFLOPs/img", "memory_mb": "train MB (est.)"}).to_string(
        index=False, na_rep="-", formatters={"params": "{:,}".format, "MFLOPs/img": "{:,.1f}".format,
                                             "train MB (est.)": "{:,.0f}".format, "tokens": "{:.0f}".format})


@dataclass(frozen=True)
class SeedsFrom:
    """Seeds each variant of a study would likely need, judged from an earlier study (`--spread-from`)."""

    earlier: str
    shared_sd: float  # the earlier study's shared spread of a paired difference
    margin: float  # this study's, in the metric's units
    level: float  # each test's level at this study's last look
    rows: pd.DataFrame  # variant, seeds_needed (NaN: more than 100), basis, cell_minutes
    decided: int  # variants of the earlier study with a look taken

    def lines(self) -> list[str]:
        out = [f"from study '{self.earlier}' ({self.decided} variants decided or measured; shared spread of a "
               f"paired difference {self.shared_sd:.4g}; margin here {self.margin:.4g}; each test at level "
               f"{self.level:.2g}):"]
        for r in self.rows.itertuples():
            cost = (f", about {r.cell_minutes:.0f} cell-minutes with the baseline's"
                    if math.isfinite(r.cell_minutes) else "")
            seeds = f"{r.seeds_needed:.0f} seeds" if math.isfinite(r.seeds_needed) else "more than 100 seeds"
            out.append(f"  {r.variant}: {seeds} ({r.basis}{cost})")
        return out

    def to_json(self) -> dict:
        return {"earlier": self.earlier, "shared_sd": self.shared_sd, "margin": self.margin, "level": self.level,
                "variants": json_rows(self.rows)}


def seeds_from_earlier(study: Study, earlier: str) -> SeedsFrom:
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
    rows = []
    for v in others:
        d = standing.decisions.get(v.name)
        mean, sd, why = ((d.mean, d.spread, f"its earlier difference {d.mean:+.4g}") if d and d.n >= 2
                         else (0.0, shared_sd, "new here: no effect assumed"))
        n = stats.seeds_needed(mean, sd, margin, a)
        cost = n * (minutes.get(v.name, typical) + minutes.get(BASELINE, typical)) if n else math.nan
        rows.append({"variant": v.name, "seeds_needed": n or math.nan, "basis": why, "cell_minutes": cost})
    return SeedsFrom(earlier, shared_sd, margin, a,
                     pd.DataFrame(rows, columns=["variant", "seeds_needed", "basis", "cell_minutes"]),
                     len(standing.decisions))

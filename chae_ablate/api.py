"""A study's plan, results, curves, verdicts and figures, for notebooks and scripts.

    import chae_ablate
    study = chae_ablate.load("studies/quickstart.yaml")   # the study file, validated; trains nothing
    study.verdicts()[["variant", "diff", "diff_low", "diff_high", "verdict"]]
    study.figures()["differences"]                        # a matplotlib Figure, as in the report

Results come from the study's MLflow store, joined to the study file's plan on the cell hash by the
same function the report uses (report.report_tables), so `results()` is results.csv and
`verdicts()` is summary.csv, and cells of other versions of the study are never counted. `status()`
reads the ledger instead (who holds a running cell). Nothing here trains, and nothing writes.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from . import tracking
from .analysis import Outcome, minutes_per_cell, seeds_needs
from .figures import report_figures
from .metrics import EPOCH_METRICS, Metric
from .options import RunOptions
from .plan import StudyPlan, study_plan
from .records import CellState
from .render import json_rows
from .report import ReportTables, report_tables
from .study import Study, load_study

__all__ = ["LedgerStatus", "StudyResults", "load", "ledger_status"]


def load(study: str | Path, *, folder: str | Path = ".", tracking_uri: str | None = None,
         storage: str | None = None, overrides: dict[str, Any] | None = None) -> StudyResults:
    """A study file (validated like `chae-ablate run` does; `overrides`: dotted paths, as --set)
    and where its results are: `folder` is where it was run (its mlflow.db and runs/), or
    `tracking_uri` a tracking server (default: MLFLOW_TRACKING_URI, else folder/mlflow.db) and
    `storage` the ledger (PostgreSQL URL or journal:PATH; default: sqlite under folder/runs)."""
    folder = Path(folder).resolve()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{folder / 'mlflow.db'}"
    return StudyResults(load_study(study, overrides), uri, RunOptions(storage=storage, runs_dir=folder / "runs"))


@dataclass
class StudyResults:
    """One study and its results. Results are read once, when first asked for; refresh() reads
    them again (a study still running)."""

    study: Study  # the study file, as chae_ablate.study.load_study returns it
    tracking_uri: str  # the MLflow store its results are read from
    options: RunOptions = field(default_factory=RunOptions)  # where its ledger is (status())

    @property
    def name(self) -> str:
        return self.study.name

    def plan(self) -> pd.DataFrame:
        """One row per variant: variant, changes, resolution, tokens (CHAE's; NaN for other builders),
        params, mflops (per image, forward), memory_mb (one training step, estimated), seeds; costs
        counted on the meta device (nothing allocated, nothing trained)."""
        return self.study_plan().table

    def study_plan(self) -> StudyPlan:
        """plan() with the cell count, epochs and classes (what `plan --json` prints)."""
        return study_plan(self.study)

    def results(self) -> pd.DataFrame:
        """One row per cell the current plan needs (baseline first): variant, seed, cell_hash,
        description, state, status, run_id, failure_reason, the summary metrics, resolution,
        in_stats (counted by the verdicts) and diff_vs_baseline; the rows of results.csv."""
        return self._tables.cells.copy()

    def verdicts(self) -> pd.DataFrame:
        """One row per variant: n, mean, sd, the paired difference and its interval at the level
        of the look that decided (diff, diff_low, diff_high, level), the equivalence interval,
        verdict, verdict_code and seeds_needed; the rows of summary.csv."""
        return self._tables.summary.copy()

    def curves(self) -> pd.DataFrame:
        """Per-epoch metrics of the current plan's cells, long: variant, seed, cell_hash, run_id,
        epoch and one column per epoch metric (train/val loss and accuracy, lr, ...)."""
        cells = self._tables.cells[["variant", "seed", "cell_hash", "run_id"]]
        epochs = self._runs.epochs.drop(columns=["variant", "seed"])  # the plan's names, not the runs' tags
        joined = cells[cells["run_id"] != ""].merge(epochs, on="run_id", how="inner")
        return joined[["variant", "seed", "cell_hash", "run_id", "epoch", *EPOCH_METRICS]].reset_index(drop=True)

    def figures(self) -> dict[str, Figure]:
        """The report's figures by name (differences, val_loss_curves, params_vs_metric), as
        matplotlib Figures: display them in a notebook, or fig.savefig(...)."""
        tables = self._tables
        return {name: fig for name, fig, _ in
                report_figures(tables.summary, tables.cells, self._runs.epochs, tables.standing.margin)}

    def status(self) -> pd.DataFrame:
        """Where each cell the study needs stands in the ledger now (what `status` prints): variant,
        seed, cell_hash, state, worker (who holds a running cell), best_val_loss, test_acc,
        diverged_epoch, failure_reason. Read afresh on every call."""
        return ledger_status(self.study, self.options).cells

    def undecided(self) -> pd.DataFrame:
        """Per undecided variant, from the ledger now: the seeds it has, the seeds it would likely
        need (NaN: more than 100) and the cell-minutes they would take."""
        return ledger_status(self.study, self.options).undecided

    def refresh(self) -> StudyResults:
        """Forget what was read, so the next call reads the store again; returns self."""
        for cached in ("_runs", "_tables"):
            self.__dict__.pop(cached, None)
        return self

    @cached_property
    def _runs(self) -> tracking.StudyRuns:
        with tracking.using_store(self.tracking_uri):
            return tracking.load_study_runs(self.name)

    @cached_property
    def _tables(self) -> ReportTables:
        return report_tables(self.study.plan(), self._runs.records)


def status_rows(standing: Outcome) -> pd.DataFrame:
    """One row per cell the study needs, from its ledger records (status(), `status --json`)."""
    rows = [{"variant": r.variant, "seed": r.seed, "cell_hash": h, "state": str(r.state),
             "worker": r.worker if r.state == CellState.RUNNING else "",
             **{m: float(r.metrics.get(m, float("nan"))) for m in (Metric.BEST_VAL_LOSS, Metric.TEST_ACC,
                                                                    Metric.DIVERGED_EPOCH)},
             "failure_reason": r.failure_reason} for h, r in standing.records.items()]
    return pd.DataFrame(rows, columns=["variant", "seed", "cell_hash", "state", "worker", Metric.BEST_VAL_LOSS,
                                       Metric.TEST_ACC, Metric.DIVERGED_EPOCH, "failure_reason"])



@dataclass(frozen=True)
class LedgerStatus:
    """Where a study stands in its ledger: `status`, `status --json`, StudyResults.status()."""

    study: str
    standing: Outcome
    cells: pd.DataFrame  # status_rows
    undecided: pd.DataFrame  # per undecided variant: variant, seeds, seeds_needed, cell_minutes, text

    @property
    def counts(self) -> dict[str, int]:
        """Cells per state (every CellState, zeros included) of the cells the study needs."""
        return {str(state): int((self.cells["state"] == state).sum()) for state in CellState}

    @property
    def kept_apart(self) -> dict[str, int]:
        """Cells of other versions of the study in the ledger, per state (never counted)."""
        states = [r.state for r in self.standing.earlier]
        return {str(state): states.count(state) for state in CellState if state in states}  # in CellState's order

    def to_json(self) -> dict:
        return {"study": self.study, "cells": json_rows(self.cells), "counts": self.counts,
                "total": len(self.cells), "complete": self.standing.complete,
                "undecided": json_rows(self.undecided), "kept_apart": self.kept_apart}


def ledger_status(study: Study, options: RunOptions) -> LedgerStatus:
    """Read the study's ledger (changes nothing) and say where each needed cell stands."""
    from .runner import study_status  # loads torch: only when the ledger is asked for
    standing = study_status(study, options)
    needs = seeds_needs(standing, study.analysis, minutes_per_cell(standing.records.values()))
    undecided = pd.DataFrame([{"variant": n.variant, "seeds": n.seeds, "seeds_needed": n.needed or math.nan,
                               "cell_minutes": n.cell_minutes, "text": n.text.replace("`", "")} for n in needs],
                             columns=["variant", "seeds", "seeds_needed", "cell_minutes", "text"])
    return LedgerStatus(study.name, standing, status_rows(standing), undecided)

"""The project's vocabulary for cells and verdicts, defined once.

A cell is one (variant, seed) of a study, identified everywhere by the hash of the configuration it
trains (study.cell_hash). The ledger (Optuna) and the MLflow reader translate their libraries'
states into CellRecords where they enter; the runner, the report, `status` and the search read
only these, and join them to a study's plan on the cell hash alone.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


BASELINE = "baseline"  # the name of every study's unmodified variant, which the others are compared with


class CellState(StrEnum):
    """Where a cell stands."""

    QUEUED = "queued"  # in the ledger, waiting for a worker
    RUNNING = "running"  # claimed by a worker (or its worker died and the grace period is not over)
    DONE = "done"  # finished, with its metrics
    FAILED = "failed"  # its latest attempt failed; the reason is recorded
    PRUNED = "pruned"  # a search trial's cell stopped early by the pruner
    MISSING = "missing"  # the plan needs it, but it was never queued or logged

    @property
    def settled(self) -> bool:
        """It will not produce a value later (a study's look may be taken without waiting for it)."""
        return self in (CellState.DONE, CellState.FAILED)


@dataclass(frozen=True)
class PlannedCell:
    """A cell as a study's plan lists it."""

    cell_hash: str  # the configuration it trains: its identity
    variant: str
    seed: int
    description: str = ""  # the variant's change, in words

    @property
    def label(self) -> str:
        return cell_label(self.variant, self.seed)


@dataclass(frozen=True)
class CellRecord:
    """A cell as a store (the ledger, MLflow) knows it."""

    cell_hash: str
    variant: str
    seed: int
    state: CellState
    metrics: Mapping[str, float] = field(default_factory=dict)  # summary metrics of a DONE cell, else {}
    source: str = ""  # where the record came from, e.g. "ledger trial 7" or "mlflow run 3f2a..."
    run_id: str = ""  # its MLflow run, when it came from MLflow
    failure_reason: str = ""
    worker: str = ""  # who holds (running) or last held the cell: host:pid, and its SLURM task

    @property
    def label(self) -> str:
        return cell_label(self.variant, self.seed)


def cell_label(variant: str, seed: int) -> str:
    """A cell as people read it: `depth2/seed1` (logs, MLflow run names, messages)."""
    return f"{variant}/seed{seed}"


class Verdict(StrEnum):
    """A variant's standing against the baseline, as the report, `run` and the search print it."""

    BETTER = "better"  # its interval of the difference excludes 0, on the good side
    WORSE = "worse"  # ... on the bad side
    EQUIVALENT = "equivalent"  # its interval lies inside +-margin
    UNDECIDED = "undecided"  # anything else: more seeds could decide it
    PENDING = "pending"  # its first look is not complete yet
    BASELINE = BASELINE  # the row every other variant is compared with


DECISIONS = (Verdict.UNDECIDED, Verdict.BETTER, Verdict.WORSE, Verdict.EQUIVALENT)  # what a look can decide;
# a verdict's index here is its code in benchmarks/power.py's arrays

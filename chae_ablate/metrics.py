"""What a cell measures: the per-epoch metrics and the cell's result, and their names.

Training fills these types; tracking logs their fields under the same names and the report reads
them back, so a metric's name is written once, here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch of one cell, logged to MLflow with the epoch as the step."""

    train_loss: float  # mean cross-entropy over the epoch's augmented mix
    train_acc: float
    val_loss: float  # mean cross-entropy on the validation split, no augmentation
    val_acc: float


@dataclass(frozen=True)
class CellResult:
    """A finished cell: its summary metrics (logged at step 0) and its history."""

    best_val_loss: float  # the study's ranking metric: lowest validation loss over the epochs
    best_epoch: int
    val_acc_at_best: float
    test_loss: float  # of the best-validation checkpoint
    test_acc: float
    n_params: int
    mflops: float  # forward MFLOPs per image
    images_per_s: float  # median training throughput over the epochs
    wall_time_s: float
    history: list[dict[str, float]]  # per epoch: EPOCH_METRICS and images_per_s
    resumed_from: int  # epochs restored from a checkpoint (0 = fresh start)

    def summary(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in SUMMARY_METRICS}


EPOCH_METRICS = tuple(f.name for f in dataclasses.fields(EpochMetrics))
SUMMARY_METRICS = tuple(f.name for f in dataclasses.fields(CellResult)
                        if f.name not in ("history", "resumed_from"))

"""What a cell measures: the per-epoch metrics and the cell's result, and their names.

Training fills these types; tracking logs their fields under the same names, the ledger keeps a
finished cell's summary, and the report reads them back as columns: a metric's name is written
once, here, in Metric (the dataclasses' fields are checked against it at import).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class Metric:
    """Every metric's name (plain strings: they are keys of checkpoints, which load weights_only)."""

    TRAIN_LOSS = "train_loss"
    TRAIN_ACC = "train_acc"
    VAL_LOSS = "val_loss"
    VAL_ACC = "val_acc"
    BEST_VAL_LOSS = "best_val_loss"
    BEST_EPOCH = "best_epoch"
    VAL_ACC_AT_BEST = "val_acc_at_best"
    TEST_LOSS = "test_loss"
    TEST_ACC = "test_acc"
    N_PARAMS = "n_params"
    MFLOPS = "mflops"
    IMAGES_PER_S = "images_per_s"
    WALL_TIME_S = "wall_time_s"
    DIVERGED_EPOCH = "diverged_epoch"  # the epoch whose loss went non-finite (a result, not a failure)


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
    diverged_epoch: int | None = None  # training stopped there (non-finite loss); best_* are of the epochs before

    def summary(self) -> dict[str, float]:
        """The summary metrics by name; diverged_epoch only for a cell that diverged. May hold inf
        (a cell that diverged at epoch 1 has no finite loss) and NaN (no epoch to time)."""
        return {name: float(value) for name in SUMMARY_METRICS if (value := getattr(self, name)) is not None}


def _named(cls: type, leave: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The metric fields of a dataclass; a field that Metric does not name fails at import."""
    names = tuple(f.name for f in dataclasses.fields(cls) if f.name not in leave)
    unnamed = set(names) - set(vars(Metric).values())
    if unnamed:
        raise TypeError(f"metrics.Metric lacks {unnamed}")
    return names


EPOCH_METRICS = _named(EpochMetrics)
SUMMARY_METRICS = _named(CellResult, leave=("history", "resumed_from"))
RANKING = Metric.BEST_VAL_LOSS  # a cell's value in the ledger, a search trial's objective, the default decision metric
# what a study may decide on, and whether lower is better
LOWER_IS_BETTER = {Metric.BEST_VAL_LOSS: True, Metric.TEST_LOSS: True, Metric.TEST_ACC: False}

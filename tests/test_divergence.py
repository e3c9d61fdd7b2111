"""A cell whose loss turns non-finite is a result, the variant diverged on that seed: the cell is done,
keeps the best of the epochs before, says where it diverged, and a rerun does not train it again."""
from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import torch

from chae_ablate import train, tracking
from chae_ablate.data import load_dataset
from chae_ablate.ledger import Ledger
from chae_ablate.metrics import Metric
from chae_ablate.records import CellState
from chae_ablate.runner import RunOptions, run_study
from chae_ablate.study import load_study, study_from_dict
from chae_ablate.train import NullTracker, checkpoint_epochs, train_cell

from conftest import STUDIES

TINY = STUDIES / "synthetic-tiny.yaml"


def diverge_at(monkeypatch, epoch: int) -> None:
    """Every cell's weights turn NaN as `epoch` starts, so its loss is NaN as a real divergence's is."""
    real = train._train_epoch

    def poisoned(model, optimizer, stream, seed, at, *rest):
        if at == epoch:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(math.nan)
        return real(model, optimizer, stream, seed, at, *rest)
    monkeypatch.setattr(train, "_train_epoch", poisoned)


def without_speed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in epoch.items() if k != Metric.IMAGES_PER_S} for epoch in history]


def tiny_cell(epochs: int):
    cell = load_study(TINY, {"protocol.seeds": [0], "protocol.epochs": epochs}).cells()[0]
    return cell, load_dataset(cell.config.data, cell.config.model.resolution, Path("runs"), progress=False)


def records(study_name: str) -> tuple[dict, dict]:
    """variant -> CellRecord, from the ledger and from MLflow."""
    ledger = Ledger(study_name, RunOptions().storage_url, reading=True).records()
    return ({r.variant: r for r in ledger}, {r.variant: r for r in tracking.load_study_runs(study_name).records})


def test_divergence_keeps_the_epochs_before_and_a_resume_ends_the_same(workdir, monkeypatch):
    cpu = torch.device("cpu")
    cell, data = tiny_cell(epochs=1)
    one_epoch = train_cell(config=cell.config, seed=0, data=data, device=cpu)
    cell, data = tiny_cell(epochs=3)
    diverge_at(monkeypatch, 2)
    straight = train_cell(config=cell.config, seed=0, data=data, device=cpu, checkpoint_dir=Path("straight"))
    assert straight.diverged_epoch == 2 and straight.best_epoch == 1
    assert without_speed(straight.history) == without_speed(one_epoch.history)
    assert (straight.best_val_loss, straight.test_loss, straight.test_acc) == (
        one_epoch.best_val_loss, one_epoch.test_loss, one_epoch.test_acc)
    assert straight.summary()[Metric.DIVERGED_EPOCH] == 2 and Metric.DIVERGED_EPOCH not in one_epoch.summary()
    assert checkpoint_epochs(Path("straight")) == 1  # the diverged epoch was never checkpointed

    class Crash(Exception):
        pass

    class CrashAfterEpoch1(NullTracker):  # its checkpoint is written before the epoch is logged
        def log_epoch(self, epoch, metrics):
            raise Crash

    with pytest.raises(Crash):
        train_cell(config=cell.config, seed=0, data=data, device=cpu, checkpoint_dir=Path("resumed"),
                   tracker=CrashAfterEpoch1())
    resumed = train_cell(config=cell.config, seed=0, data=data, device=cpu, checkpoint_dir=Path("resumed"))
    assert resumed.resumed_from == 1 and resumed.diverged_epoch == 2
    assert (resumed.best_val_loss, resumed.test_loss, resumed.test_acc) == (
        straight.best_val_loss, straight.test_loss, straight.test_acc)


def test_a_study_records_a_diverged_cell_as_done_and_a_rerun_leaves_it(workdir, monkeypatch, capsys):
    study = load_study(TINY, {"protocol.seeds": [0], "protocol.epochs": 3})
    diverge_at(monkeypatch, 2)
    summary = run_study(study, RunOptions(), report=False)
    assert [c.state for c in summary.cells] == [CellState.DONE] * 2
    assert "baseline/seed0: done (diverged at epoch 2)" in capsys.readouterr().err
    in_ledger, in_mlflow = records(study.name)
    for found in (in_ledger, in_mlflow):
        for r in found.values():
            assert r.state == CellState.DONE and r.metrics[Metric.DIVERGED_EPOCH] == 2
            assert r.metrics[Metric.BEST_EPOCH] == 1 and math.isfinite(r.metrics[Metric.BEST_VAL_LOSS])
    epochs = tracking.load_study_runs(study.name).epochs
    assert sorted(epochs["epoch"]) == [1, 1]  # the diverged epoch was never logged
    for r in in_mlflow.values():
        assert r.metrics[Metric.BEST_VAL_LOSS] == in_ledger[r.variant].metrics[Metric.BEST_VAL_LOSS]

    def no_training(**kwargs):
        raise AssertionError(f"{kwargs['label']} trained again")
    monkeypatch.setattr("chae_ablate.runner.train_cell", no_training)
    again = run_study(study, RunOptions(progress=False), report=False)
    assert [c.state for c in again.cells] == [CellState.DONE] * 2
    assert records(study.name) == (in_ledger, in_mlflow)


def test_a_cell_diverging_at_epoch_1_is_done_with_the_worst_result(workdir):
    raw = {"name": "nan", "data": {"source": "synthetic", "synthetic_classes": 2, "synthetic_per_class": 12},
           "protocol": {"epochs": 2, "lr": 1.0e30, "optimizer": "sgd", "augment": {"copies": 0}},
           "model": {"resolution": 16, "conv": {"stages": [{"channels": 4}, {"channels": 4}]},
                     "transformer": {"depth": 1, "heads": 1, "dim": 4, "mlp_hidden": [4]}},
           "variants": {"small_lr": {"set": {"protocol.lr": 0.001}}}}
    study = study_from_dict(raw, {})
    summary = run_study(study, RunOptions(progress=False), report=False)
    assert [c.state for c in summary.cells] == [CellState.DONE] * 2
    in_ledger, in_mlflow = records(study.name)
    assert Metric.DIVERGED_EPOCH not in in_ledger["small_lr"].metrics
    assert Metric.DIVERGED_EPOCH not in in_mlflow["small_lr"].metrics
    diverged = in_ledger["baseline"].metrics
    assert diverged[Metric.DIVERGED_EPOCH] == 1 and diverged[Metric.BEST_EPOCH] == 0
    assert diverged[Metric.BEST_VAL_LOSS] == diverged[Metric.TEST_LOSS] == math.inf
    assert diverged[Metric.VAL_ACC_AT_BEST] == diverged[Metric.TEST_ACC] == 0.0
    logged = in_mlflow["baseline"].metrics  # MLflow keeps only finite values (it would store inf as 1.8e308)
    assert logged[Metric.DIVERGED_EPOCH] == 1 and logged[Metric.TEST_ACC] == 0.0
    assert Metric.BEST_VAL_LOSS not in logged and Metric.TEST_LOSS not in logged
    assert all(math.isfinite(v) for v in logged.values())
    trials = optuna.load_study(study_name=study.name, storage=RunOptions().storage_url).get_trials()
    assert sorted(t.value for t in trials)[-1] == math.inf  # Optuna takes inf as the worst objective value

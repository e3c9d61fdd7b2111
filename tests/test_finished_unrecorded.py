"""A worker killed -9 after MLflow recorded its cell FINISHED but before the ledger heard: the next
worker records that run's result instead of training the cell a second time."""
from __future__ import annotations

import signal
import subprocess
import sys

import mlflow
import optuna
import pytest

from conftest import STUDIES, chae_here

# `chae-ablate run` whose worker dies by SIGKILL at the moment it would tell the ledger a cell is done
DIES_BEFORE_THE_LEDGER_HEARS = """
import os, signal, sys
from chae_ablate.ledger import queue
queue.Claim.complete = lambda self, summary: os.kill(os.getpid(), signal.SIGKILL)
from chae_ablate.cli import main
sys.argv = ["chae-ablate", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_a_cell_finished_in_mlflow_but_not_in_the_ledger_is_not_trained_again(tmp_path, monkeypatch):
    study = tmp_path / "s.yaml"
    study.write_text((STUDIES / "synthetic-tiny.yaml").read_text())
    env = {k: v for k, v in __import__("os").environ.items() if k != "MLFLOW_TRACKING_URI"}
    victim = subprocess.run([sys.executable, "-c", DIES_BEFORE_THE_LEDGER_HEARS, "run", "s.yaml", "--no-report",
                             "--threads", "1"], cwd=tmp_path, env={**env, "TQDM_DISABLE": "1"},
                            capture_output=True, text=True, timeout=300)
    assert victim.returncode == -signal.SIGKILL, victim.stdout + victim.stderr
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("synthetic-tiny").experiment_id
    finished = client.search_runs([experiment], "tags.`chae.role` = 'cell' and attributes.status = 'FINISHED'")
    assert len(finished) == 1  # MLflow has the cell; the ledger does not
    ledger = optuna.load_study(study_name="synthetic-tiny", storage=f"sqlite:///{tmp_path}/runs/optuna.db")
    assert not [t for t in ledger.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rerun = chae_here("run", "s.yaml", "--no-report", "--threads", "1")
    assert rerun.exit_code == 0, rerun.output
    runs = client.search_runs([experiment], "tags.`chae.role` = 'cell'")
    by_cell = {}
    for run in runs:
        by_cell.setdefault(run.data.tags["cell_hash"], []).append(run.info.status)
    assert len(by_cell) == 4 and all(states == ["FINISHED"] for states in by_cell.values()), by_cell
    adopted = finished[0]
    trials = {t.user_attrs["cell_hash"]: t for t in ledger.get_trials() if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(trials) == 4
    assert trials[adopted.data.tags["cell_hash"]].value == adopted.data.metrics["best_val_loss"]
    assert "already finished in MLflow" in rerun.output

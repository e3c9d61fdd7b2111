"""Nothing trained twice, nothing lost: workers as separate processes on one journal ledger and
one local MLflow store, disturbed as clusters disturb them: a node's clock running ahead, a cell
that kills its own process on every attempt. (ledger/claims.py is the protocol; test_ledger.py
tests it piece by piece, test_distributed.py on PostgreSQL and a tracking server.)"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import mlflow
import optuna
import pytest

from conftest import assert_undisturbed_metrics, chae, chae_here, undisturbed_metrics

pytestmark = pytest.mark.slow
HOOKS = Path(__file__).parent / "hooks"

STUDY = """
name: {name}
data: {{source: synthetic, synthetic_classes: 3, synthetic_per_class: 60}}
protocol: {{epochs: 3, batch_size: 16, lr: 0.003, seeds: {seeds}, augment: {{copies: 1}}}}
model:
  resolution: 24
  conv: {{stages: [{{channels: 8}}, {{channels: 16}}]}}
  transformer: {{depth: 1, heads: 2, dim: 16, mlp_hidden: [32]}}
variants:
  depth2: {{set: {{model.transformer.depth: 2}}}}
"""


def write_study(folder: Path, name: str, seeds: list[int]) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(STUDY.format(name=name, seeds=seeds))
    return path


def trials(folder: Path, name: str) -> list:
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(folder / "ledger.journal")))).get_trials()


def cell_runs(folder: Path, name: str) -> list:
    client = mlflow.tracking.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("chae.role") == "cell"]


def epochs_logged(folder: Path, run) -> list[int]:
    client = mlflow.tracking.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss"))


def test_a_worker_whose_clock_runs_40_s_ahead_takes_no_live_cell(tmp_path):
    """Two workers on one journal, one under libfaketime 40 s ahead (cluster nodes drift): the
    skewed one read every other worker's lease as 40 s old, past the grace period, failed their live
    cells and trained them again. Staleness is now judged by each observer's own clock."""
    if shutil.which("faketime") is None:
        pytest.skip("faketime (Debian's faketime package) is not installed: apt-get install faketime")
    study = write_study(tmp_path, "skew", [0, 1])
    args = ("worker", str(study), "--storage", "journal:ledger.journal", "--threads", "1", "--device", "cpu")
    plain = chae(*args, cwd=tmp_path)
    skewed = chae(*args, cwd=tmp_path, prefix=("faketime", "-f", "+40s"))
    reference = undisturbed_metrics(study, tmp_path / "undisturbed")  # while they train
    outputs = [p.communicate(timeout=300)[0] for p in (plain, skewed)]
    for process, out in zip((plain, skewed), outputs):
        assert process.returncode == 0 and "Traceback" not in out, out
    states = [t.state for t in trials(tmp_path, "skew")]
    assert states == [optuna.trial.TrialState.COMPLETE] * 4, states  # no cell failed as stale, none re-queued
    runs = cell_runs(tmp_path, "skew")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["cell_hash"] for r in runs}) == 4
    assert all(epochs_logged(tmp_path, r) == [1, 2, 3] for r in runs)  # each epoch trained and logged once
    assert_undisturbed_metrics(runs, reference)


def test_a_cell_that_kills_its_process_every_attempt_fails_after_the_retries(tmp_path, monkeypatch):
    """A cell whose every attempt kills its process (the host's OOM killer): it was re-queued
    forever. With --retries 1 the third start finds it dead twice, fails it with the reason in the
    ledger, MLflow and the report, and finishes the rest."""
    study = write_study(tmp_path, "oom", [0])
    env = {"CHAE_TEST_KILL_VARIANT": "depth2",
           "PYTHONPATH": os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")])}
    args = ("run", str(study), "--storage", "journal:ledger.journal", "--retries", "1", "--device", "cpu",
            "--threads", "1")
    for attempt in (1, 2):
        out = chae(*args, cwd=tmp_path, env=env).communicate(timeout=300)[0]
        killed = [t for t in trials(tmp_path, "oom") if t.user_attrs["variant"] == "depth2"]
        assert len(killed) == attempt and killed[-1].state == optuna.trial.TrialState.RUNNING, out
    # the third start goes in this process (no interpreter to start), without the hook: it must not train
    # depth2 at all, and if it did, the ledger's states and MLflow's run below would say so
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    last = chae_here(*args)
    out = last.output
    assert last.exit_code == 1 and isinstance(last.exception, SystemExit) and "Traceback" not in out, out
    assert "not finished: depth2/seed0 failed" in out and "died 2 times" in out, out
    by_variant = {}
    for t in trials(tmp_path, "oom"):
        by_variant.setdefault(t.user_attrs["variant"], []).append(t)
    assert [t.state.name for t in by_variant["baseline"]] == ["COMPLETE"]
    assert [t.state.name for t in by_variant["depth2"]] == ["FAIL", "FAIL"]  # two deaths, no third copy
    assert "died 2 times" in by_variant["depth2"][-1].user_attrs["failure_reason"]
    runs = {r.data.tags["variant"]: r for r in cell_runs(tmp_path, "oom")}
    assert runs["baseline"].info.status == "FINISHED"
    assert_undisturbed_metrics([runs["baseline"]], undisturbed_metrics(study, tmp_path / "undisturbed"))
    assert runs["depth2"].info.status == "FAILED" and "died 2 times" in runs["depth2"].data.tags["failure_reason"]
    assert "died 2 times" in (tmp_path / "reports" / "oom" / "report.md").read_text()

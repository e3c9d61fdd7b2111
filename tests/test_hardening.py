"""Hostile and unlucky inputs, each reproduced first: planted and corrupt checkpoints, names that
would leave their folder, a cell that raises, processes that start together, bad folders."""
from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from typer.testing import CliRunner

from chae_ablate import train
from chae_ablate.cli import app
from chae_ablate.errors import ChaeError
from chae_ablate.files import inside
from chae_ablate.runner import RunOptions, checkpoint_dir, run_study
from chae_ablate.study import load_study, study_from_dict

from conftest import STUDIES, slow_study, chae as _cli

TINY = STUDIES / "synthetic-tiny.yaml"
cli = CliRunner()


class Planted:
    """A pickle that runs a shell command when fully unpickled (torch.load without weights_only)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


BAD_CHECKPOINTS = ("planted", "garbage", "wrong shape", "old format")


def plant(folder: Path, payload: str, marker: Path) -> None:
    """A last.pt in folder that must not load: one that would run code when unpickled, random
    bytes, a real checkpoint of another model, or another version's layout."""
    folder.mkdir(parents=True)
    if payload == "planted":
        (folder / "last.pt").write_bytes(pickle.dumps({"state": Planted(marker)}))
    elif payload == "garbage":
        (folder / "last.pt").write_bytes(os.urandom(4096))
    elif payload == "wrong shape":  # a real checkpoint of another model: loads as data, fails load_state_dict
        torch.save({"format": train.CHECKPOINT_FORMAT, "model": {"w": torch.zeros(3)}, "optimizer": {},
                    "state": {"history": [{}]}}, folder / "last.pt")
    else:  # another version's layout: refused by its format before anything of it is used
        torch.save({"format": 1, "model": {}, "optimizer": {}, "state": {"history": [{}]}}, folder / "last.pt")


def test_a_bad_checkpoint_never_runs_code_and_the_cell_restarts(workdir):
    """Each kind of bad checkpoint in its own cell of the tiny study (four kinds, four cells; one
    run instead of one per kind): none runs code, each is moved aside with a warning naming it, and
    its cell restarts from epoch 1 and writes a good one."""
    study = load_study(TINY)
    folders = {payload: checkpoint_dir(RunOptions(), study, cell)
               for payload, cell in zip(BAD_CHECKPOINTS, study.cells(), strict=True)}
    marker = workdir / "pwned"
    for payload, folder in folders.items():
        plant(folder, payload, marker)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_study(study, RunOptions(progress=False), report=False)
    assert not marker.exists(), "unpickling the checkpoint ran code"
    assert [c.state for c in summary.cells] == ["done"] * 4
    warned = [str(w.message) for w in caught if issubclass(w.category, train.CheckpointWarning)]
    for payload, folder in folders.items():
        assert any(f"checkpoint {folder / 'last.pt'} does not load" in line for line in warned), (payload, warned)
        assert len(list(folder.glob("last.pt.unloadable-*"))) == 1, payload
        assert train.checkpoint_epochs(folder) == 2, payload  # the restarted cell wrote a good one


def test_paths_from_names_cannot_leave_their_folder(tmp_path):
    for bad in ("..", ".", "", "a/b", "../x"):
        with pytest.raises(ChaeError):
            inside(tmp_path, "checkpoints", bad)
    (tmp_path / "link").symlink_to("/")
    with pytest.raises(ChaeError):
        inside(tmp_path, "link")
    assert inside(tmp_path, "checkpoints", "paper11") == tmp_path / "checkpoints" / "paper11"


@pytest.mark.parametrize("name", ["..", ".", "../runs", ".hidden", "a" * 65])
def test_study_names_that_would_escape_are_one_line_errors(workdir, name):
    (workdir / "s.yaml").write_text(f"name: '{name}'\n")
    for command in (["plan", "s.yaml"], ["run", "s.yaml", "--fresh"], ["report", name]):
        result = cli.invoke(app, command)
        assert result.exit_code == 1, (command, result.output)
        assert "is not a study name" in result.output and "Traceback" not in result.output
    assert not (workdir / "runs").exists() and not (workdir / "reports").exists()


def test_an_unexpected_error_fails_one_cell_and_the_study_goes_on(workdir, monkeypatch):
    real = train.train_cell

    def flaky(**kwargs):
        if kwargs["label"] == "depth2/seed1":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(**kwargs)
    monkeypatch.setattr("chae_ablate.runner.train_cell", flaky)
    summary = run_study(load_study(TINY), RunOptions(progress=False))
    states = {(c.variant, c.seed): c for c in summary.cells}
    assert states[("depth2", 1)].state == "failed"
    assert "RuntimeError: CUDA out of memory" in states[("depth2", 1)].failure_reason
    assert sum(c.state == "done" for c in summary.cells) == 3
    assert summary.report is not None and summary.report.exists()
    client = mlflow.tracking.MlflowClient(f"sqlite:///{Path('mlflow.db').resolve()}")
    exp = client.get_experiment_by_name("synthetic-tiny")
    runs = client.search_runs([exp.experiment_id])
    assert {r.info.status for r in runs if r.data.tags.get("chae.role") == "study"} == {"FINISHED"}
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 1 and "out of memory" in failed[0].data.tags["failure_reason"]


def test_run_exits_1_and_counts_failed_cells(workdir, monkeypatch):
    def broken(**kwargs):
        raise ValueError("boom")
    monkeypatch.setattr("chae_ablate.runner.train_cell", broken)
    result = cli.invoke(app, ["run", str(TINY), "--no-progress", "--no-report"])
    assert result.exit_code == 1
    assert "4 of 4 cells did not finish" in result.output and "Traceback" not in result.output


def test_runs_dir_that_is_a_file_is_one_line(workdir):
    (workdir / "runs").write_text("not a folder")
    result = cli.invoke(app, ["run", str(TINY), "--no-progress"])
    assert result.exit_code == 1 and "--runs-dir runs: is a file" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_report_on_an_empty_folder_creates_nothing(workdir):
    result = cli.invoke(app, ["report", "paper11"])
    assert result.exit_code == 1 and "no MLflow store" in result.output
    assert list(workdir.iterdir()) == []


def test_a_log_gets_one_line_per_cell_and_the_ui_link(workdir):
    result = cli.invoke(app, ["run", str(TINY)])  # CliRunner's stderr is not a terminal
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split("] ")[0] for line in lines if line.startswith("[")] == [
        f"[{i}/4 done, 0 failed" for i in range(1, 5)]
    assert "\r" not in result.output  # no progress-bar redraws
    assert "mlflow: http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning" in result.output
    client = mlflow.tracking.MlflowClient(f"sqlite:///{Path('mlflow.db').resolve()}")
    exp = client.get_experiment_by_name("synthetic-tiny")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.search_runs([exp.experiment_id], "tags.variant = 'baseline'")[0]
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == "synthetic" and len(inputs[0].dataset.digest) == 16



# What a tracking server relayed when two workers logged the same new dataset at once (CI, sqlite backend)
DATASET_RACE = ("BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                "datasets.name, datasets.digest")


def test_a_dataset_logged_by_a_racing_worker_first_is_not_a_failed_cell(workdir, monkeypatch):
    """The loser of MLflow's dataset get-or-create race tries again and finds the row: before, its
    cell failed (and was trained again by the next worker to start)."""
    real, calls = mlflow.tracking.MlflowClient.log_inputs, []

    def racing(self, run_id, datasets=None, *args, **kwargs):
        calls.append(run_id)
        if len(calls) == 1:  # the other worker's row lands between our lookup and our insert
            real(self, run_id, datasets, *args, **kwargs)
            raise mlflow.exceptions.RestException({"error_code": "BAD_REQUEST", "message": DATASET_RACE})
        return real(self, run_id, datasets, *args, **kwargs)
    monkeypatch.setattr(mlflow.tracking.MlflowClient, "log_inputs", racing)
    result = cli.invoke(app, ["run", str(TINY), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "did not finish" not in result.output
    assert calls[0] == calls[1] and len(calls) == 5  # the first cell's call was repeated, once
    client = mlflow.tracking.MlflowClient(f"sqlite:///{Path('mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("synthetic-tiny").experiment_id], "tags.`chae.role` = 'cell'")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert all(len(r.inputs.dataset_inputs) == 1 for r in runs)


def test_only_a_unique_key_race_is_tried_again():
    from chae_ablate.errors import retrying
    from chae_ablate.tracking import lost_insert_race
    assert lost_insert_race(Exception(DATASET_RACE))
    assert lost_insert_race(Exception('(psycopg2.errors.UniqueViolation) duplicate key value violates unique '
                                      'constraint "uq_dataset"'))
    calls = []

    def refused():
        calls.append(1)
        raise mlflow.exceptions.RestException({"error_code": "BAD_REQUEST", "message": "Invalid dataset digest"})
    with pytest.raises(mlflow.exceptions.RestException, match="digest"):
        retrying(refused, transient=lost_insert_race)
    assert len(calls) == 1


@pytest.mark.slow
def test_run_and_worker_started_together_on_a_fresh_folder(tmp_path):
    """Both create the MLflow and Optuna schemas at the same moment: both must exit 0, with one
    parent run, every cell once and the report written. Two tries, each in a folder of its own,
    side by side: one pair computes while the other waits."""
    tries = {}
    for attempt in range(2):
        folder = tmp_path / f"try{attempt}"
        folder.mkdir()
        tries[folder] = [_cli(command, str(TINY), "--no-progress", "--threads", "1", cwd=folder)
                         for command in ("run", "worker")]
    for folder, procs in tries.items():
        outputs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        client = mlflow.tracking.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
        exp = client.get_experiment_by_name("synthetic-tiny")
        runs = client.search_runs([exp.experiment_id])
        assert len([r for r in runs if r.data.tags.get("chae.role") == "study"]) == 1
        cells = [r for r in runs if r.data.tags.get("chae.role") == "cell"]
        assert len(cells) == 4 and len({r.data.tags["cell_hash"] for r in cells}) == 4
        assert all(r.info.status == "FINISHED" for r in cells)
        assert (folder / "reports" / "synthetic-tiny" / "report.html").exists()


def test_cell_runs_carry_mlflow_system_metrics(workdir, monkeypatch):
    monkeypatch.setattr("chae_ablate.tracking.SYSTEM_METRICS_S", 0.2)  # the cell trains for about a second
    raw = yaml.safe_load(slow_study("sysmetrics"))
    raw["variants"], raw["protocol"]["epochs"] = {}, 2
    run_study(study_from_dict(raw, {}), RunOptions(progress=False), report=False)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{Path('mlflow.db').resolve()}")
    exp = client.get_experiment_by_name("sysmetrics")
    run = client.search_runs([exp.experiment_id], "tags.variant = 'baseline'")[0]
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)

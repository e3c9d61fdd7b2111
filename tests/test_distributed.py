"""Many machines: real PostgreSQL (the Optuna ledger) and a real MLflow tracking server on 127.0.0.1.

Each worker is a separate `chae-ablate` process with its own working directory and runs dir, so
the processes share nothing but the two servers, as on separate machines (a machine that only
follows the others, a report's or a kill's survivor, is the CLI in the test process, in a folder of
its own). Skipped, with the reason, where the PostgreSQL binaries are missing. The servers and the
processes are tests/servers.py's; the chaos test (outage and kills) is tests/test_chaos.py.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from typer.testing import CliRunner

import chae_ablate
from chae_ablate.cli import app

from conftest import STUDIES, chae_here, slow_study
from servers import (cell_runs, cli, finish, free_port, ledger_trials, optuna_storage, start_mlflow, stop_mlflow,
                     study_file)

pytestmark = pytest.mark.slow
DONE_ROW = re.compile(r"^\S+\s+\d+\s+done\s", re.M)  # a row of the cells table `run` prints

SLOW_STUDY = slow_study("dist-kill")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A tracking server for the session; yields its URL."""
    server, url = start_mlflow(tmp_path_factory.mktemp("mlflow"), free_port())
    try:
        yield url
    finally:
        stop_mlflow(server)


def as_elsewhere(storage: str, name: str, trial) -> None:
    """Rewrite a running trial's holder as a process of another machine (whose death this machine
    cannot see), as a worker on another node would have left it."""
    from chae_ablate.ledger.claims import HOLDER
    study = optuna.load_study(study_name=name, storage=optuna_storage(storage))
    _, pid, token = trial.user_attrs[HOLDER].split("/")
    study._storage.set_trial_user_attr(trial._trial_id, HOLDER, f"another-machine/{pid}/{token}")


def test_three_machines_share_one_ledger_and_one_tracking_server(postgres, mlflow_server, tmp_path,
                                                                 monkeypatch):
    name = "dist-tiny"
    study = study_file(tmp_path, (STUDIES / "synthetic-tiny.yaml").read_text(), name)
    common = (str(study), "--seeds", "0,1,2", "--storage", postgres, "--threads", "1")  # 3 workers, 2 cores
    first = cli("run", *common, "--no-report", cwd=tmp_path / "m1", tracking=mlflow_server)
    others = [cli("worker", *common, cwd=tmp_path / m, tracking=mlflow_server) for m in ("m2", "m3")]
    outputs = [finish(p) for p in (first, *others)]
    assert len(DONE_ROW.findall(outputs[0])) == 6, outputs[0]

    trials = ledger_trials(postgres, name)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6 and len({t.user_attrs["cell_hash"] for t in complete}) == 6
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    parents, cells = cell_runs(mlflow_server, name)
    assert len(parents) == 1
    assert len(cells) == 6 and all(r.info.status == "FINISHED" for r in cells)
    assert len({r.data.tags["cell_hash"] for r in cells}) == 6
    assert {r.data.tags["mlflow.parentRunId"] for r in cells} == {parents[0].info.run_id}
    assert {r.data.tags["cell_hash"] for r in cells} == {t.user_attrs["cell_hash"] for t in complete}

    # the report, from two more machines that ran nothing, lists every cell and is the same on both
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    tables = []
    for machine in ("r1", "r2"):
        (tmp_path / machine).mkdir()
        monkeypatch.chdir(tmp_path / machine)
        result = CliRunner().invoke(app, ["report", name])
        assert result.exit_code == 0, result.output
        tables.append(pd.read_csv(Path("reports") / name / "results.csv"))
    assert len(tables[0]) == 6
    assert set(zip(tables[0]["variant"], tables[0]["seed"])) == {
        (v, s) for v in ("baseline", "depth2") for s in (0, 1, 2)}
    pd.testing.assert_frame_equal(tables[0], tables[1])

    # a notebook on a machine that ran nothing: the API reads the server and the PostgreSQL ledger
    results = chae_ablate.load(study, folder=tmp_path / "r1", tracking_uri=mlflow_server, storage=postgres,
                               overrides={"protocol.seeds": [0, 1, 2]})  # as the workers' --seeds
    pd.testing.assert_frame_equal(results.results().replace("", float("nan")), tables[0], check_dtype=False)
    assert len(results.curves()) == 6 * 2 and set(results.status()["state"]) == {"done"}


def test_killed_worker_cell_is_finished_by_another(postgres, mlflow_server, tmp_path, monkeypatch):
    name = "dist-kill"
    study = study_file(tmp_path, SLOW_STUDY, name)
    common = (str(study), "--storage", postgres)  # one worker at a time: default threads (one under -n 2)
    victim = cli("worker", *common, "--heartbeat", "1", "--grace", "3", cwd=tmp_path / "m2", tracking=mlflow_server)
    checkpoints = tmp_path / "m2" / "runs" / "checkpoints" / name
    deadline = time.time() + 120
    while time.time() < deadline and not any(checkpoints.glob("*/last.pt")) and victim.poll() is None:
        time.sleep(0.2)
    assert any(checkpoints.glob("*/last.pt")), "the victim finished no epoch: " + (
        victim.communicate()[0] if victim.poll() is not None else "timed out")
    time.sleep(0.3)  # mid-cell: after a checkpoint and its MLflow epoch
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    running = [t for t in ledger_trials(postgres, name) if t.state == optuna.trial.TrialState.RUNNING]
    assert len(running) == 1, "the victim was not mid-cell when killed"
    killed_cell = running[0].user_attrs["cell_hash"]
    as_elsewhere(postgres, name, running[0])  # so the survivor cannot see the process is gone: it must watch

    # another machine joins after the kill (started earlier, it could finish both cells before the
    # victim claims one): it trains the other cell, then the killed one once it has watched its
    # heartbeat stand still for the study's grace period (3 s, set by the victim's start). It runs
    # in this process (no interpreter to start), in a folder of its own, as the report machines above do
    (tmp_path / "m1").mkdir()
    monkeypatch.chdir(tmp_path / "m1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    survivor = chae_here("run", *common, "--no-report", "--no-progress", "--device", "cpu")
    out = survivor.output
    assert survivor.exit_code == 0 and "Traceback" not in out, out
    assert len(DONE_ROW.findall(out)) == 2, out
    trials = ledger_trials(postgres, name)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["variant"] for t in complete) == ["baseline", "depth2"]
    stale = [t.state for t in trials if t.user_attrs["cell_hash"] == killed_cell and t not in complete]
    assert stale == [optuna.trial.TrialState.FAIL], [  # the killed attempt, retried once
        (t.number, t.state, t.user_attrs) for t in trials]

    _, cells = cell_runs(mlflow_server, name)
    assert not [r for r in cells if r.info.status == "RUNNING"]
    finished = [r for r in cells if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["variant"] for r in finished) == ["baseline", "depth2"]
    failed = [r for r in cells if r.info.status == "FAILED"]
    assert all(r.data.tags["cell_hash"] == killed_cell and "worker lost" in r.data.tags["failure_reason"]
               for r in failed)
    assert len(failed) == 1  # the killed attempt had logged an epoch the new one does not resume from


def one_clear_line(process: subprocess.Popen, *expected: str) -> None:
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 1, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert "Traceback" not in out
    for text in expected:
        assert text in lines[0], out


def test_unreachable_servers_fail_in_one_clear_line(postgres, tmp_path):
    tiny = str(STUDIES / "synthetic-tiny.yaml")
    closed = f"127.0.0.1:{free_port()}"
    no_database = postgres.rsplit("/", 1)[0] + "/nosuchdb"
    checks = [
        (cli("run", tiny, "--storage", f"postgresql://chae:secret@{closed}/chae", cwd=tmp_path / "a",
             tracking=None), (f"postgresql://chae:***@{closed}/chae", "cannot open")),
        (cli("worker", tiny, "--storage", no_database, cwd=tmp_path / "b", tracking=None),
         ("nosuchdb", "does not exist")),
        (cli("worker", tiny, "--storage", "postgersql://x@h/db", cwd=tmp_path / "c", tracking=None),
         ("postgersql://x@h/db",)),
        (cli("run", tiny, cwd=tmp_path / "d", tracking=f"http://{closed}"),
         (f"MLflow tracking server http://{closed} is not reachable",)),
        (cli("worker", tiny, "--storage", postgres, cwd=tmp_path / "e", tracking=f"http://{closed}"),
         (f"MLflow tracking server http://{closed} is not reachable",)),
    ]
    for process, expected in checks:
        one_clear_line(process, *expected)


def _open_at(url: str, start, failures) -> None:
    from chae_ablate.ledger.storage import open_study
    start.wait()
    try:
        open_study("race", url)
    except BaseException as err:  # noqa: BLE001 - every failure is the finding
        failures.put(str(err))


def test_workers_creating_the_ledger_schema_at_once_all_open_it(postgres):
    """Workers started together on an empty PostgreSQL database all create Optuna's schema: the
    losers of that race get 'type/relation ... already exists' (a ProgrammingError, not an
    IntegrityError) and must retry, not exit. Six processes per fresh database, released by a
    barrier, five databases; CI saw `type "studydirection" already exists` end a worker."""
    import multiprocessing

    import psycopg2

    fork = multiprocessing.get_context("fork")
    failures = fork.Queue()
    admin = psycopg2.connect(postgres.rsplit("/", 1)[0] + "/postgres")
    admin.autocommit = True
    for round_ in range(5):
        admin.cursor().execute(f"CREATE DATABASE race{round_}")
        url, start = postgres.rsplit("/", 1)[0] + f"/race{round_}", fork.Barrier(6)
        processes = [fork.Process(target=_open_at, args=(url, start, failures)) for _ in range(6)]
        for p in processes:
            p.start()
        for p in processes:
            p.join(timeout=120)
        assert [p.exitcode for p in processes] == [0] * 6
    admin.close()
    errors = [failures.get() for _ in range(failures.qsize())]
    assert errors == []

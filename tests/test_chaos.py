"""Chaos: three workers on one ledger (a journal file, or PostgreSQL) and one MLflow tracking server
that stops for a while, then random kill -9 and restarts. Each cell is finished exactly once, with an
undisturbed run's metrics. Its own file so that the README's two test processes share the
multi-machine tests (tests/test_distributed.py is the other half); servers in tests/servers.py.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from conftest import assert_undisturbed_metrics, slow_study, undisturbed_metrics
from servers import cell_runs, cli, finish, free_port, held, ledger_trials, start_mlflow, stop_mlflow, study_file

pytestmark = pytest.mark.slow

DISTURBED = slow_study("disturbed")  # 2 variants; run with --seeds 0,1: 4 cells of 6 epochs
PATIENT = {"CHAE_TRACKING_PATIENCE_S": "3", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}  # give a cell back soon
_undisturbed: dict = {}


def undisturbed(tmp_path: Path) -> dict[tuple[str, int], dict[str, float]]:
    """The DISTURBED study's cells trained undisturbed (conftest.undisturbed_metrics), once per session."""
    if not _undisturbed:
        _undisturbed.update(undisturbed_metrics(study_file(tmp_path, DISTURBED, "undisturbed"),
                                                tmp_path / "undisturbed-runs", {"protocol.seeds": [0, 1]}))
    return _undisturbed


def assert_each_cell_finished_once(tracking: str, name: str, reference: dict) -> None:
    """Exactly one FINISHED run per cell, nothing RUNNING, every epoch logged once, and the
    undisturbed run's metrics."""
    _, cells = cell_runs(tracking, name)
    assert not [r for r in cells if r.info.status == "RUNNING"]
    finished = [r for r in cells if r.info.status == "FINISHED"]
    assert sorted((r.data.tags["variant"], int(r.data.tags["seed"])) for r in finished) == sorted(reference)
    client = mlflow.tracking.MlflowClient(tracking)
    for run in finished:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss"))
        assert steps == list(range(1, 7)), (run.data.tags["variant"], steps)  # no epoch trained twice
    assert_undisturbed_metrics(finished, reference)


@pytest.mark.parametrize("ledger, outage_s", [("journal", 15), ("postgres", 5)], ids=["journal", "postgres"])
def test_chaos_a_server_outage_and_random_kills_train_each_cell_once(ledger, outage_s, request, tmp_path):
    """Three workers. Once all hold cells, the tracking server stops for 15 s (5 s on PostgreSQL;
    either way past the workers' 3 s of patience, and on the journal long enough for a waiting
    worker to poll it several times; at least as long as the undisturbed reference takes to train) and
    comes back: that used to fail the cell being finished and end the worker (a SLURM array lost
    its tasks); now each worker hands its cell back, waits for the server and goes on. Then every
    few seconds a random worker is killed -9 and started again. Every cell ends FINISHED exactly
    once, no epoch is trained twice, and the metrics are those of an undisturbed run."""
    import random
    storage = (request.getfixturevalue("postgres").rsplit("/", 1)[0] + "/chaos" if ledger == "postgres"
               else f"journal:{tmp_path / 'ledger.journal'}")
    if ledger == "postgres":
        import psycopg2
        admin = psycopg2.connect(storage.rsplit("/", 1)[0] + "/postgres")
        admin.autocommit = True
        admin.cursor().execute("CREATE DATABASE chaos")
        admin.close()
    server, url = start_mlflow(tmp_path / "server", port := free_port())
    name = f"chaos-{ledger}"
    study = study_file(tmp_path, DISTURBED, name)
    common = (str(study), "--seeds", "0,1", "--storage", storage, "--threads", "1")
    start = lambda: cli("worker", *common, cwd=tmp_path / "shared", tracking=url, env=PATIENT)  # noqa: E731
    workers, rng, kills, outputs = [start() for _ in range(3)], random.Random(0), 0, []
    try:
        deadline = time.time() + 400
        # the server goes away once every worker is past its start (a worker that starts while the
        # server is down stops at once with one line, by design), so while they hold cells
        while time.time() < deadline and held(storage, name) < 3:
            time.sleep(0.5)
        stop_mlflow(server)
        stopped = time.time()
        reference = undisturbed(tmp_path)  # while the workers wait
        time.sleep(max(0.0, outage_s - (time.time() - stopped)))
        server, _ = start_mlflow(tmp_path / "server", port)
        while any(w.poll() is None for w in workers) and time.time() < deadline and kills < 3:
            time.sleep(rng.uniform(2, 4))
            i = rng.randrange(len(workers))
            if workers[i].poll() is None:  # one that already ended is not started again
                os.killpg(workers[i].pid, signal.SIGKILL)
                outputs.append(workers[i].communicate()[0])
                kills += 1
                workers[i] = start()
        outputs += [finish(w, timeout=max(1.0, deadline - time.time())) for w in workers]
        assert kills >= 2  # the study may end before the third
        assert any("handed back to the queue" in out for out in outputs), outputs
        assert any("answers again; going on" in out for out in outputs), outputs
        assert_each_cell_finished_once(url, name, reference)
        complete = [t for t in ledger_trials(storage, name) if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(complete) == 4 == len({t.user_attrs["cell_hash"] for t in complete})
    finally:
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
        stop_mlflow(server)

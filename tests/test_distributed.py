"""Many machines: real PostgreSQL (the Optuna ledger) and a real MLflow tracking server on 127.0.0.1.

Each worker is a separate `chae-ablate` process with its own working directory and runs dir, so
the processes share nothing but the two servers, as on separate machines (a machine that only
follows the others, a report's or a kill's survivor, is the CLI in the test process, in a folder of
its own). Skipped, with the reason, where the PostgreSQL binaries are missing.
"""
from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from typer.testing import CliRunner

import chae_ablate
from chae_ablate.cli import app

from conftest import STUDIES, assert_undisturbed_metrics, chae_here, slow_study, undisturbed_metrics

pytestmark = pytest.mark.slow
DONE_ROW = re.compile(r"^\S+\s+\d+\s+done\s", re.M)  # a row of the cells table `run` prints

SLOW_STUDY = slow_study("dist-kill")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        time.sleep(0.3)
    tail = log.read_text()[-2000:] if log and log.exists() else ""
    pytest.skip(f"{what} did not start within {timeout:.0f} s\n{tail}")


def _pg_bin() -> Path | None:
    for candidate in [shutil.which("initdb"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[::-1]]:
        if candidate and Path(candidate).with_name("postgres").exists():
            return Path(candidate).resolve().parent
    return None


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A throw-away PostgreSQL cluster; yields the URL of an empty database `chae`."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, postgres) not found on PATH or in /usr/lib/postgresql/*/bin; "
                    "install postgresql to run the multi-machine tests")
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 missing: pip install -e '.[dev]'")
    user = {}
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the `postgres` user
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
        user = {"user": pw.pw_uid, "group": pw.pw_gid}
        # pytest's tmp root is private to root, so the cluster lives in its own folder
        base = Path(tempfile.mkdtemp(prefix="chae-pg-"))
        os.chown(base, pw.pw_uid, pw.pw_gid)
    else:
        base = tmp_path_factory.mktemp("pg")
    data, port, log = base / "data", free_port(), base / "postgres.log"
    initdb = subprocess.run([bindir / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync",
                             "-E", "UTF8"], cwd=base, capture_output=True, text=True, **user)
    if initdb.returncode:
        pytest.skip(f"initdb failed: {initdb.stderr.strip()[-500:]}")
    with open(log, "w") as out:
        os.chown(log, *(user.values() or (os.getuid(), os.getgid())))
        server = subprocess.Popen([bindir / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(port),
                                   "-k", base, "-c", "fsync=off"], cwd=base, stdout=out,
                                  stderr=subprocess.STDOUT, **user)

    def accepting() -> bool:
        try:
            psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres").close()
            return True
        except psycopg2.OperationalError:
            return False
    try:
        wait_until(accepting, 30, "PostgreSQL", log)
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE chae")
        conn.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/chae"
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown
        server.wait(timeout=30)
        if user:
            shutil.rmtree(base, ignore_errors=True)


def start_mlflow(base: Path, port: int) -> tuple[subprocess.Popen, str]:
    """`mlflow server` with a sqlite backend and its own artifact store in `base`, once it answers.
    Its job execution (a job runner and its huey consumers, about nine more processes that each
    import MLflow, for GenAI jobs) is off: chae-ablate uses the tracking API only, and the server
    starts in about half the time."""
    base.mkdir(parents=True, exist_ok=True)
    log = base / "mlflow.log"
    with open(log, "a") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server",
                                   "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}",
                                   "--artifacts-destination", str(base / "artifacts"),
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  cwd=base, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
        except OSError:
            return server.poll() is not None  # died: stop waiting
    wait_until(healthy, 90, "mlflow server", log)
    if server.poll() is not None:
        pytest.skip(f"mlflow server exited:\n{log.read_text()[-2000:]}")
    return server, url


def stop_mlflow(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A tracking server for the session; yields its URL."""
    server, url = start_mlflow(tmp_path_factory.mktemp("mlflow"), free_port())
    try:
        yield url
    finally:
        stop_mlflow(server)


def cli(*args: str, cwd: Path, tracking: str | None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`chae-ablate ARGS` in its own process group, working directory and runs dir (env: more variables)."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking:
        env["MLFLOW_TRACKING_URI"] = tracking
    return subprocess.Popen([sys.executable, "-m", "chae_ablate", *args, "--no-progress", "--device", "cpu"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        pytest.fail(f"timed out:\n{out}")
    assert process.returncode == 0, out
    assert "Traceback" not in out, out
    return out


def study_file(tmp_path: Path, text: str, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text.replace(text.split("name: ", 1)[1].split("\n", 1)[0], name, 1))
    return path


def optuna_storage(url: str):
    """What optuna.load_study takes for a --storage URL (a journal file, or PostgreSQL through psycopg2)."""
    if url.startswith("journal:"):
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url[len("journal:"):]))
    return url.replace("postgresql://", "postgresql+psycopg2://")


def ledger_trials(storage: str, name: str) -> list:
    return optuna.load_study(study_name=name, storage=optuna_storage(storage)).get_trials()


def held(storage: str, name: str) -> int:
    """How many of the study's cells workers hold now (0 before the study exists)."""
    try:
        return sum(t.state == optuna.trial.TrialState.RUNNING for t in ledger_trials(storage, name))
    except KeyError:
        return 0


def as_elsewhere(storage: str, name: str, trial) -> None:
    """Rewrite a running trial's holder as a process of another machine (whose death this machine
    cannot see), as a worker on another node would have left it."""
    from chae_ablate.ledger.claims import HOLDER
    study = optuna.load_study(study_name=name, storage=optuna_storage(storage))
    _, pid, token = trial.user_attrs[HOLDER].split("/")
    study._storage.set_trial_user_attr(trial._trial_id, HOLDER, f"another-machine/{pid}/{token}")


def cell_runs(tracking: str, name: str) -> tuple[list, list]:
    client = mlflow.tracking.MlflowClient(tracking)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return ([r for r in runs if r.data.tags.get("chae.role") == "study"],
            [r for r in runs if r.data.tags.get("chae.role") == "cell"])


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
    common = (str(study), "--storage", postgres, "--threads", "2")  # one worker at a time: both cores
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


# --- disturbed studies: each cell finished exactly once, with an undisturbed run's metrics ---------

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

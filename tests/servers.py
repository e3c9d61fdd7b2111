"""Real servers for the multi-machine tests: a throw-away PostgreSQL cluster (the Optuna ledger) and
an MLflow tracking server on free ports of 127.0.0.1, and `chae-ablate` processes that share
nothing but them, as separate machines would (tests/test_distributed.py, tests/test_chaos.py)."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import optuna
import pytest


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


@contextmanager
def postgres_cluster(tmp_path_factory) -> Iterator[str]:
    """A throw-away PostgreSQL cluster; yields the URL of an empty database `chae`. Skips the test,
    with the reason, where the PostgreSQL binaries or psycopg2 are missing."""
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


def cell_runs(tracking: str, name: str) -> tuple[list, list]:
    client = mlflow.tracking.MlflowClient(tracking)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return ([r for r in runs if r.data.tags.get("chae.role") == "study"],
            [r for r in runs if r.data.tags.get("chae.role") == "cell"])

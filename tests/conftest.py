"""Shared fixtures: paths, a tiny synthetic study, an isolated working directory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "studies"
ARTISTS11 = REPO.parent / "shared" / "data" / "artists11"
# The files of the longest end-to-end runs (measured: ~40-170 s each under -n 2), started first so
# that the README's two test processes (pytest -n 2 --dist loadfile) end together; the other files
# follow in the order collected. A stale list costs only balance.
LONGEST_FIRST = ("test_chaos.py", "test_search.py", "test_distributed.py", "test_cluster.py", "test_runner.py",
                 "test_decisive.py", "test_hardening.py", "test_gpu.py", "test_claims.py", "test_fuzz.py",
                 "test_user_model.py", "test_versions.py")


def pytest_configure(config):
    """Under pytest-xdist every process, each test process and those its tests start, trains on one
    torch thread (OMP_NUM_THREADS, which runner.set_threads honours): two tests with two threads
    each on two cores made each other's threads wait (a search test took 290 s, not 73 s). Whole
    files go in the order of pytest_collection_modifyitems, not xdist's (most tests first)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # gw0, gw1, ...
        os.environ["OMP_NUM_THREADS"] = "1"
        if "torch" in sys.modules:  # read at its import
            sys.modules["torch"].set_num_threads(1)
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as collected


def slow_study(name: str) -> str:
    """A synthetic study whose cells last long enough (a few seconds) to be killed mid-way."""
    return f"""
name: {name}
data: {{source: synthetic, synthetic_classes: 3, synthetic_per_class: 100}}
protocol: {{epochs: 6, batch_size: 16, lr: 0.003, seeds: [0], augment: {{copies: 1}}}}
model:
  resolution: 32
  conv: {{stages: [{{channels: 16}}, {{channels: 16}}, {{channels: 32}}]}}
  transformer: {{depth: 1, heads: 2, dim: 32, mlp_hidden: [64]}}
variants:
  depth2: {{set: {{model.transformer.depth: 2}}}}
"""


@pytest.fixture(autouse=True)
def _no_parent_settle_in_process(monkeypatch):
    """A worker that creates a study's parent run pauses (tracking.PARENT_SETTLE_S, 2 s) so that a
    racing worker's parent becomes visible. In the test process one worker at a time ever creates
    one, so the pause waits for nothing: skipped here, 2 s per study started in-process. Processes
    the tests start keep it; the tests of workers that race (test_hardening's run and worker
    started together, test_distributed, test_claims) run that way."""
    tracking = sys.modules.get("chae_ablate.tracking")  # imported by the test modules that need it
    if tracking is not None:
        monkeypatch.setattr(tracking, "PARENT_SETTLE_S", 0.0)


@pytest.fixture(scope="session", autouse=True)
def _mlflow_schema_built_once(tmp_path_factory):
    """Each study the tests run in this process with a local store of its own has MLflow create its
    sqlite schema, 68 migrations (~1 s). MLflow builds it once, into an empty file, the first
    time a store needs it, and each new store gets a copy of those pages (SQLite's backup API): the
    same tables, indexes and schema version. Processes the tests start build their own."""
    if "mlflow" not in sys.modules:  # imported by the test modules that need it
        yield
        return
    import sqlite3

    import sqlalchemy
    from mlflow.store.db import utils

    build = getattr(utils, "_initialize_tables", None)
    if build is None:  # another MLflow: every store builds its own schema, as before
        yield
        return
    template = tmp_path_factory.mktemp("mlflow-schema") / "schema.db"

    def copy_of_template(engine: sqlalchemy.engine.Engine) -> None:
        if engine.dialect.name != "sqlite":
            return build(engine)
        if not template.exists():
            empty = sqlalchemy.create_engine(f"sqlite:///{template}")
            build(empty)
            empty.dispose()
        source, connection = sqlite3.connect(template), engine.raw_connection()
        try:
            source.backup(connection.driver_connection)
        finally:
            connection.close()
            source.close()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils, "_initialize_tables", copy_of_template)
        yield


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A throw-away PostgreSQL cluster for the session (servers.postgres_cluster); yields the URL of
    an empty database `chae`. Skips, with the reason, where PostgreSQL is missing."""
    from servers import postgres_cluster
    with postgres_cluster(tmp_path_factory) as url:
        yield url


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty folder with its own MLflow store, as a user would."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    os.environ.setdefault("TQDM_DISABLE", "1")
    return tmp_path


def chae(*args: str, cwd: Path, env: dict[str, str] | None = None, prefix: tuple[str, ...] = (),
         **kwargs) -> subprocess.Popen:
    """`python -m chae_ablate ARGS` started in `cwd` as a user would: its own local MLflow store (no
    MLFLOW_TRACKING_URI), no progress bars, unbuffered, stderr merged into stdout. env: variables
    to set as well; prefix: a command to run it under (e.g. faketime)."""
    full = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    full.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([*prefix, sys.executable, "-m", "chae_ablate", *args], cwd=cwd, env={**full, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def chae_here(*args: str):
    """`chae-ablate ARGS` through the CLI in this process and its working directory (typer's
    CliRunner: no interpreter to start, which costs ~6 s of imports, torch and MLflow, per command);
    torch's thread count is put back afterwards, since --threads sets it for the process."""
    import torch
    from typer.testing import CliRunner

    from chae_ablate.cli import app
    threads = torch.get_num_threads()
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        torch.set_num_threads(threads)


def undisturbed_metrics(study_path: Path, runs_dir: Path, overrides: dict | None = None) -> dict:
    """(variant, seed) -> summary metrics of each cell of the study trained here, undisturbed, on one
    thread (as the tests' workers run), to hold a disturbed run's metrics against."""
    import torch

    from chae_ablate.data import load_dataset
    from chae_ablate.study import load_study
    from chae_ablate.train import train_cell
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for cell in load_study(study_path, overrides or {}).cells():
            data = load_dataset(cell.config.data, cell.config.model.resolution, runs_dir)
            out[(cell.variant.name, cell.seed)] = train_cell(config=cell.config, seed=cell.seed, data=data,
                                                             device=torch.device("cpu")).summary()
        return out
    finally:
        torch.set_num_threads(threads)


def assert_undisturbed_metrics(runs: list, reference: dict) -> None:
    """Each MLflow cell run's summary metrics equal the undisturbed run's of its (variant, seed)."""
    for run in runs:
        expected = reference[(run.data.tags["variant"], int(run.data.tags["seed"]))]
        for key in ("best_val_loss", "test_loss", "test_acc"):
            assert run.data.metrics[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key

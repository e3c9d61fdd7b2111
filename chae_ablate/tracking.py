"""MLflow: the study's permanent record, and the report's source of truth.

One experiment per study, one parent run per study and one nested run per cell. Per-epoch metrics
carry their epoch as the step. A cell that resumes after a crash continues its own run, so MLflow
ends with one run per cell; an attempt that cannot be continued is marked FAILED, never left RUNNING.
Only this module imports mlflow. It uses MlflowClient throughout (no global active run), so worker
processes and threads never share state. Every call is retried with backoff while the store is
unavailable for a moment (a busy sqlite file, a tracking server restarting or answering 5xx), for
up to patience_s(); past that the error says the server was lost (lost_server), and the runner
hands the cell back to the queue and waits for the server (wait_for_server).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import pandas as pd
import requests
import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient

from .analysis import Plan
from .config import dotted, to_dict
from .errors import ChaeError, retrying
from .files import file_lock, sqlite_file
from .metrics import EPOCH_METRICS, SUMMARY_METRICS, Metric as MetricName
from .provenance import git_state
from .records import BASELINE, CellRecord, CellState
from .sources import SOURCES
from .study import Cell
from .versions import Version

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ROLE = "chae.role"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI's runs table, not GenAI traces
UI_VIEW = "?workflowType=machine_learning"  # opens the runs table whatever the browser last chose
SYSTEM_METRICS_S = 10.0  # seconds between system-metrics samples of a training cell
PARENT_SETTLE_S = 2.0  # how long a worker that created a parent run waits for racing ones
PATIENCE_S = 60  # how long one call is retried while the store is unavailable (CHAE_TRACKING_PATIENCE_S)
OUTAGE_WAIT_S = 1800  # how long a worker waits for a lost store to come back (CHAE_TRACKING_OUTAGE_WAIT_S)


_STORE: ContextVar[str | None] = ContextVar("chae_ablate_tracking_uri", default=None)  # set by using_store


def tracking_uri() -> str:
    """The store of a `using_store` block, else MLFLOW_TRACKING_URI when set (a tracking server),
    else ./mlflow.db, what bare `mlflow ui` reads.

    The default is made absolute: MLflow caches stores by URI, and a relative one would follow
    the first working directory it saw."""
    uri = _STORE.get() or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


@contextmanager
def using_store(uri: str) -> Iterator[None]:
    """Read (and write) the MLflow store at `uri` within the block, whatever the environment says:
    chae_ablate.api reads a study of another folder or server without changing os.environ."""
    token = _STORE.set(uri)
    try:
        yield
    finally:
        _STORE.reset(token)


def patience_s() -> float:
    return float(os.environ.get("CHAE_TRACKING_PATIENCE_S", PATIENCE_S))


def transient(err: BaseException) -> bool:
    """An error of a store that is unavailable for now: sqlite's busy timeout (TEMPORARILY_UNAVAILABLE),
    a server that refuses connections, times out or keeps answering 5xx."""
    if isinstance(err, MlflowException) and err.error_code == "TEMPORARILY_UNAVAILABLE":
        return True
    if isinstance(err, MlflowException) and re.search(r"failed with error code 5\d\d ", str(err)):
        return True  # a bare 5xx (a proxy's, a restarting server's), after MLflow's own retries
    cause = err.__cause__ or err.__context__
    return isinstance(cause, (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError))


def patiently(call, *args, **kwargs):
    """call(*args, **kwargs), retried after 1, 2, 4, 8, 10, 10 ... s while the store is unavailable,
    for up to patience_s()."""
    return retrying(call, *args, transient=transient, within_s=patience_s(), max_delay_s=10.0, **kwargs)


class PatientClient:
    """An MlflowClient whose every call is retried while the store is unavailable (patiently)."""

    def __init__(self, client: MlflowClient):
        self._client = client

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        return partial(patiently, attr) if callable(attr) else attr


def _client(create: bool = True) -> MlflowClient:
    """An MlflowClient on tracking_uri(), patient with a store that is unavailable for a moment. A
    local sqlite store is created (tables included) under a file lock, so any number of processes
    starting at once on a fresh folder take turns instead of racing in MLflow's schema migration;
    with create=False a missing store is a ChaeError."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # fail within seconds, not minutes
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = tracking_uri()
    database = sqlite_file(uri)
    if database is not None and not create and not database.exists():
        raise ChaeError(f"no MLflow store at {database}; run a study here first (chae-ablate run STUDY.yaml) "
                        "or set MLFLOW_TRACKING_URI")
    if database is None:
        return PatientClient(MlflowClient(tracking_uri=uri))
    with file_lock(database.with_name(f".{database.name}.lock")):
        return PatientClient(patiently(MlflowClient, tracking_uri=uri))  # creates the store: tables, migrations


def check_tracking_server() -> None:
    """Fail fast, in one line, when a remote tracking server does not answer."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
    except OSError as err:
        raise ChaeError(f"MLflow tracking server {uri} is not reachable ({err}); "
                        "start it (mlflow server ...) or unset MLFLOW_TRACKING_URI") from None


def lost_server(err: Exception) -> str | None:
    """What a store that stayed unavailable past our patience says, else None."""
    if not transient(err):
        return None
    cause = err.__cause__ or err.__context__
    return (f"lost the MLflow store {tracking_uri()} for over {patience_s():g} s "
            f"({type(cause).__name__ if cause else str(err).splitlines()[0][:120]})")


def wait_for_server(say) -> None:
    """Wait, retrying with backoff, until the MLflow store answers again; ChaeError after
    OUTAGE_WAIT_S (CHAE_TRACKING_OUTAGE_WAIT_S). say(line) tells the person waiting."""
    limit = float(os.environ.get("CHAE_TRACKING_OUTAGE_WAIT_S", OUTAGE_WAIT_S))
    say(f"waiting for the MLflow store {tracking_uri()} to answer again (up to {limit:g} s)")
    try:
        retrying(lambda: MlflowClient(tracking_uri=tracking_uri()).search_experiments(max_results=1),
                 transient=transient, within_s=limit, max_delay_s=5.0)
    except Exception:
        raise ChaeError(f"the MLflow store {tracking_uri()} did not come back within {limit:g} s; "
                        "restart it, then rerun (every checkpoint is kept)") from None
    say(f"the MLflow store {tracking_uri()} answers again; going on")


@cache
def lost_insert_race(err: Exception) -> bool:
    """MLflow's store inserts a dataset row after finding none, so workers that log the same dataset
    at once race: the loser's insert breaks the unique key (sqlite or PostgreSQL wording, raw or
    relayed by a server as BAD_REQUEST). Trying again finds the row."""
    text = str(err)
    return "UNIQUE constraint failed" in text or "duplicate key value violates unique constraint" in text


def source_tags() -> dict[str, str]:
    """git commit and dirty flag of the working directory, torch/CUDA versions."""
    commit, dirty = git_state(Path.cwd())
    return {"git_commit": commit, "git_dirty": str(dirty).lower(), "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda or "none"}


def cell_tags(cell: Cell, device: str) -> dict[str, str]:
    """What identifies a cell's run in MLflow: variant, seed, cell hash, device, provenance."""
    return {"variant": cell.variant.name, "seed": str(cell.seed), "cell_hash": cell.cell_hash,
            "description": cell.variant.description, "device": device, **source_tags()}


def cell_params(cell: Cell) -> dict[str, str]:
    """The cell's resolved config and seed as flat MLflow params (the dotted paths overrides use)."""
    return {k: json.dumps(v) if isinstance(v, list) else str(v)
            for k, v in dotted({**to_dict(cell.config), "seed": cell.seed}).items()}


class StudyLog:
    """The MLflow experiment and parent run of one study; the parent run keeps the study's current
    plan (plan.json) and every recorded version (versions/FINGERPRINT.json)."""

    def __init__(self, plan: Plan, artifact_root: Path):
        self.client = _client()
        self.study_name = plan.study
        self.experiment_id = self._experiment(artifact_root)
        self.parent_id = self._parent_run(plan.to_json())

    def _experiment(self, artifact_root: Path) -> str:
        exp = self.client.get_experiment_by_name(self.study_name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            if exp.tags.get("mlflow.experimentKind") is None:
                self.client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
            return exp.experiment_id
        local = not tracking_uri().startswith(("http://", "https://"))
        location = (artifact_root / "mlartifacts").resolve().as_uri() if local else None
        try:
            return self.client.create_experiment(self.study_name, artifact_location=location, tags=EXPERIMENT_KIND)
        except Exception:  # another worker created it first
            return self.client.get_experiment_by_name(self.study_name).experiment_id

    def _parent_run(self, plan: dict) -> str:
        """The study's one parent run. Workers that start together may each create one: after a
        pause every creator sees them all, the same one wins (oldest, then lowest id), losers delete theirs."""
        found = self._parents()
        if not found:
            mine = self.client.create_run(self.experiment_id, run_name=self.study_name,
                                          tags={ROLE: "study", **source_tags()}).info.run_id
            self.client.log_dict(mine, plan, "plan.json")
            time.sleep(PARENT_SETTLE_S)  # lets a racing worker's parent become visible
            found = self._parents()
            if found[0].info.run_id != mine:
                self.client.delete_run(mine)
        return found[0].info.run_id

    def _parents(self) -> list:
        return _parent_runs(self.client, self.experiment_id)

    def record_plan(self, plan: Plan) -> None:
        """Rewrite plan.json: the study file may have changed since the parent run was created."""
        self.client.log_dict(self.parent_id, plan.to_json(), "plan.json")

    def record_version(self, version: Version) -> None:
        """Keep a version of the study (versions.py) with the parent run."""
        _log_version(self.client, self.parent_id, version)

    def cell_run(self, cell: Cell, device: str, start_epoch: int) -> "CellRun":
        """The cell's run: the interrupted one continued when its history fits `start_epoch`, else new."""
        for run in self.client.search_runs([self.experiment_id], f"tags.cell_hash = '{cell.cell_hash}'"):
            if run.info.status == "FINISHED":
                continue
            logged = [m.step for m in self.client.get_metric_history(run.info.run_id, MetricName.VAL_LOSS)]
            if max(logged, default=0) <= start_epoch and run.info.status != "FAILED":
                self.client.update_run(run.info.run_id, status="RUNNING")
                return CellRun(self.client, run.info.run_id, set(logged))
            if run.info.status == "RUNNING":
                self.client.set_tag(run.info.run_id, "failure_reason", "worker lost; cell restarted elsewhere")
                self.client.set_terminated(run.info.run_id, "FAILED")
        run = self.client.create_run(self.experiment_id, run_name=cell.label,
                                     tags={"mlflow.parentRunId": self.parent_id, ROLE: "cell",
                                           **cell_tags(cell, device)})
        items = [Param(k, v[:6000]) for k, v in cell_params(cell).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run.info.run_id, params=items[i:i + 100])
        return CellRun(self.client, run.info.run_id, set())

    def finished_summary(self, cell: Cell) -> dict[str, float] | None:
        """The summary of a FINISHED run of the cell, if MLflow has one: its worker finished the run
        and was stopped (kill -9) before the ledger heard, so the cell is done, not to train again.
        Non-finite values, which finish() leaves out, come back as they were: inf for a loss of a cell
        that diverged at once, NaN for anything else."""
        for run in self.client.search_runs([self.experiment_id], f"tags.cell_hash = '{cell.cell_hash}' "
                                           "and attributes.status = 'FINISHED'", max_results=1):
            left_out = {name: math.inf if name in (MetricName.BEST_VAL_LOSS, MetricName.TEST_LOSS) else math.nan
                        for name in SUMMARY_METRICS if name != MetricName.DIVERGED_EPOCH}
            return {**left_out, **_record(run).metrics}
        return None

    def fail_cell(self, cell_hash: str, reason: str) -> None:
        """Mark the cell's unfinished runs FAILED with `reason` (a cell given up on: its workers kept dying)."""
        for run in self.client.search_runs([self.experiment_id], f"tags.cell_hash = '{cell_hash}'"):
            if run.info.status in ("RUNNING", "SCHEDULED"):
                CellRun(self.client, run.info.run_id, set()).fail(reason)

    def finish(self, ok: bool = True) -> None:
        """End the parent run, FINISHED or FAILED (best effort when failed: the server may be what was lost)."""
        try:
            self.client.set_terminated(self.parent_id, "FINISHED" if ok else "FAILED")
        except Exception:
            if ok:
                raise


def _parent_runs(client, experiment_id: str) -> list:
    """The study's parent runs, the one in use first (oldest, then lowest id, as every worker picks)."""
    runs = client.search_runs([experiment_id], f"tags.`{ROLE}` = 'study'")
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


class CellRun:
    """Tracker for one cell's training: what train_cell calls each epoch."""

    def __init__(self, client, run_id: str, logged_epochs: set[int]):
        self.client, self.run_id, self.logged = client, run_id, logged_epochs

    def log_missed_epochs(self, history: list[dict[str, float]]) -> None:
        """Log checkpointed epochs that the crash kept from reaching MLflow."""
        for epoch, metrics in enumerate(history, start=1):
            if epoch not in self.logged:
                self.log_epoch(epoch, metrics)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._metrics({k: metrics[k] for k in EPOCH_METRICS}, step=epoch)
        self.logged.add(epoch)

    def log_cell_inputs(self, cell: Cell, data) -> None:
        """The resolved config and the split manifest as artifacts, and the dataset as the run's
        MLflow input (name, digest of the split manifest, source), so the UI's Dataset column shows it."""
        self.client.log_dict(self.run_id, to_dict(cell.config), "config.json")
        self.client.log_artifact(self.run_id, str(data.manifest))
        name, where, kind = SOURCES[cell.config.data.source].origin(cell.config.data)
        digest = hashlib.sha256(Path(data.manifest).read_bytes()).hexdigest()[:16]
        dataset = Dataset(name=name, digest=digest, source_type=kind, source=where)
        retrying(self.client.log_inputs, self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "train")])],
                 transient=lost_insert_race, attempts=4)

    @contextmanager
    def system_metrics(self, interval_s: float | None = None) -> Iterator[None]:
        """MLflow's own system-metrics sampler (CPU, memory and, with an NVIDIA GPU, its utilisation
        and memory) logging to this run while the block runs, so `mlflow ui` shows a starved GPU."""
        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)  # its failed samples during an outage
        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s or SYSTEM_METRICS_S,
                                       resume_logging=bool(self.logged),
                                       tracking_uri=tracking_uri())
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def log_dict(self, data: dict, name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def finish(self, summary: dict[str, float], resumed_from: int = 0) -> None:
        """The finite summary metrics (step 0), and when the cell resumed after an interruption, from
        which epoch's checkpoint (tag resumed_from_epoch). A diverged cell's inf is left out, since
        MLflow's SQL store would keep it as 1.8e308; its diverged_epoch says what happened."""
        self._metrics({k: v for k, v in summary.items() if math.isfinite(v)}, step=0)
        if resumed_from:
            self.client.set_tag(self.run_id, "resumed_from_epoch", str(resumed_from))
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, reason: str) -> None:
        self.client.set_tag(self.run_id, "failure_reason", reason[:5000])
        self.client.set_terminated(self.run_id, "FAILED")

    def prune(self, epoch: int) -> None:
        """A search trial stopped by its pruner: KILLED, with the epoch it stopped after."""
        self.client.set_tag(self.run_id, "pruned_at_epoch", str(epoch))
        self.client.set_terminated(self.run_id, "KILLED")

    def _metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


# --- reading: the study's records, curves, plan and versions ------------------------------------

STATES = {"FINISHED": CellState.DONE, "FAILED": CellState.FAILED, "RUNNING": CellState.RUNNING,
          "SCHEDULED": CellState.QUEUED, "KILLED": CellState.PRUNED}  # MLflow run status -> cell state
VERSIONS = "versions"  # the parent run's artifact folder of version records


@dataclass(frozen=True)
class StudyRuns:
    """What MLflow holds of a study."""

    records: list[CellRecord]  # one per cell hash: its finished attempt if any, else its newest
    epochs: pd.DataFrame  # one row per cell-epoch: run_id, variant, seed, epoch, EPOCH_METRICS
    plan: Plan | None  # the plan of the study's latest run (None before any)
    versions: list[Version]  # every recorded version, oldest first


def load_study_runs(study_name: str) -> StudyRuns:
    """Everything MLflow holds of a study (ChaeError when it has no experiment)."""
    client = _client(create=False)
    exp = client.get_experiment_by_name(study_name)
    if exp is None:
        raise ChaeError(f"no MLflow experiment named {study_name!r} at {tracking_uri()}; "
                        f"run the study first (chae-ablate run STUDY.yaml) or set MLFLOW_TRACKING_URI")
    runs = client.search_runs([exp.experiment_id], f"tags.`{ROLE}` = 'cell'", max_results=50000,
                              order_by=["attributes.start_time ASC"])
    latest: dict[str, Any] = {}
    for run in runs:  # prefer a finished attempt, else the newest
        prev = latest.get(run.data.tags.get("cell_hash"))
        if prev is None or prev.info.status != "FINISHED":
            latest[run.data.tags.get("cell_hash")] = run
    epochs = pd.DataFrame([row for r in latest.values() for row in _epoch_rows(client, r)],
                          columns=["run_id", "variant", "seed", "epoch", *EPOCH_METRICS])
    parent = _parent_runs(client, exp.experiment_id)
    plan_data = _artifact_json(client, parent[0].info.run_id, "plan.json") if parent else None
    plan = Plan.from_json(plan_data, study_name) if plan_data else None
    return StudyRuns([_record(r) for r in latest.values()], epochs, plan, _versions(client, parent))


def recorded_versions(study_name: str) -> list[Version]:
    """The study's recorded versions, oldest first ([] when the store or the study does not exist;
    creates nothing)."""
    try:
        client = _client(create=False)
    except ChaeError:
        return []
    exp = client.get_experiment_by_name(study_name)
    return _versions(client, _parent_runs(client, exp.experiment_id)) if exp is not None else []


def _versions(client, parents: list) -> list[Version]:
    if not parents:
        return []
    run_id = parents[0].info.run_id
    found = [_artifact_json(client, run_id, f.path) for f in client.list_artifacts(run_id, VERSIONS)]
    return sorted((Version.from_json(v) for v in found if v), key=lambda v: v.recorded_at)


def _log_version(client, parent_id: str, version: Version) -> None:
    client.log_dict(parent_id, version.to_json(), f"{VERSIONS}/{version.fingerprint}.json")


def _artifact_json(client, run_id: str, path: str) -> Any:
    """A JSON artifact of a run (None when it is missing or unreadable)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())
        except Exception:
            return None


def _record(run) -> CellRecord:
    tags, status = run.data.tags, STATES.get(run.info.status, CellState.FAILED)
    metrics = {k: run.data.metrics[k] for k in SUMMARY_METRICS if k in run.data.metrics}
    return CellRecord(cell_hash=tags.get("cell_hash", ""), variant=tags.get("variant", ""),
                      seed=int(tags.get("seed", -1)), state=status,
                      metrics=metrics if status == CellState.DONE else {}, source=f"mlflow run {run.info.run_id}",
                      run_id=run.info.run_id, failure_reason=tags.get("failure_reason", ""))


def _epoch_rows(client, run) -> list[dict[str, Any]]:
    by_epoch: dict[int, dict[str, Any]] = {}
    for key in EPOCH_METRICS:
        for m in client.get_metric_history(run.info.run_id, key):
            by_epoch.setdefault(m.step, {})[key] = m.value
    return [{"run_id": run.info.run_id, "variant": run.data.tags.get("variant"),
             "seed": int(run.data.tags.get("seed", -1)), "epoch": step, **values}
            for step, values in sorted(by_epoch.items())]


def record_version(study_name: str, version: Version) -> None:
    """Keep a version of the study with its parent run (for a report of a plan that was never run)."""
    client = _client()
    exp = client.get_experiment_by_name(study_name)
    parents = exp and _parent_runs(client, exp.experiment_id)
    if parents:
        _log_version(client, parents[0].info.run_id, version)


def log_report(study_name: str, report_dir: Path, files: list[Path], summary: pd.DataFrame) -> None:
    """The report's files become artifacts of the study's parent run, under report/ (only the files
    the report wrote: never a whole folder, which might hold anything), and each variant's verdict
    and interval become tags and metrics of that run, so `mlflow ui` shows them."""
    client = _client()
    exp = client.get_experiment_by_name(study_name)
    parents = exp and _parent_runs(client, exp.experiment_id)
    if not parents:
        return
    parent = parents[0].info.run_id
    for path in files:
        folder = Path("report", Path(path).relative_to(report_dir).parent).as_posix().rstrip("/.")
        client.log_artifact(parent, str(path), folder)
    now, metrics, tags = int(time.time() * 1000), [], []
    for r in summary[summary["variant"] != BASELINE].itertuples():
        tags.append(RunTag(f"verdict.{r.variant}", str(r.verdict)[:5000]))
        for key in ("diff", "diff_low", "diff_high", "n_pairs"):
            value = float(getattr(r, key))
            if value == value:  # MLflow stores NaN, but a missing metric reads better than NaN
                metrics.append(Metric(f"{key}.{r.variant}", value, now, 0))
    for i in range(0, max(len(metrics), len(tags)), 100):
        client.log_batch(parent, metrics=metrics[i:i + 100], tags=tags[i:i + 100])


def experiment_link(study_name: str) -> str | None:
    """The study's runs table in the MLflow UI: the tracking server's address, or what a bare
    `mlflow ui` serves locally; None when the study has no experiment."""
    uri = tracking_uri()
    try:
        exp = _client(create=False).get_experiment_by_name(study_name)
    except ChaeError:
        return None
    if exp is None:
        return None
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{exp.experiment_id}{UI_VIEW}"


def delete_study_runs(study_name: str) -> int:
    """Soft-delete every run of a study (for --fresh); returns how many."""
    client = _client()
    exp = client.get_experiment_by_name(study_name)
    if exp is None:
        return 0
    runs = client.search_runs([exp.experiment_id], max_results=50000)
    for run in runs:
        client.delete_run(run.info.run_id)
    return len(runs)

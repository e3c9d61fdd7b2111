"""Opening an Optuna storage: a database URL (sqlite, PostgreSQL) or `journal:PATH`, created with
its tables when new, with one-line errors for a missing driver or an unreachable server; and what
every worker holding a trial needs from it (heartbeats or leases, recovery of dead workers' trials).

The journal storage (a file on a shared filesystem, for clusters without a database server) has no
heartbeats, so a claimed trial there carries a lease instead: the time its worker last wrote (user
attribute LEASE), renewed as often as a heartbeat and judged with the same grace period.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages import (BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback,
                             fail_stale_trials)
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, Trial, TrialState
from sqlalchemy.engine import URL, make_url

from ..errors import ChaeError
from ..errors import retrying as _retrying
from ..files import file_lock, sqlite_file

JOURNAL = "journal:"  # --storage journal:PATH, Optuna's journal file
LEASE = "lease_at"  # journal storage: when the worker holding a trial last proved itself alive
ACTIVE = (TrialState.WAITING, TrialState.RUNNING)
optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # TPE's group=True
# our own threads record heartbeats for trials run outside Study.optimize (Claim, SearchLedger)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def internals(study: optuna.Study, trial: Trial | FrozenTrial | None = None) -> tuple[BaseStorage, int | None]:
    """The storage behind `study` and the storage id of `trial`, which Optuna keeps private
    (`Study._storage`, `Trial._trial_id`, `FrozenTrial._trial_id`; checked against optuna 5.0.0).
    Claiming a WAITING trial without sampling a new one and recording heartbeats need them;
    tests/test_ledger.py fails loudly if a new Optuna renames them."""
    return study._storage, (trial._trial_id if trial is not None else None)


def journal_file(url: str) -> Path | None:
    """The file of a `journal:PATH` storage (relative to the working directory), else None."""
    if not url.startswith(JOURNAL):
        return None
    path = url[len(JOURNAL):]
    if not path or path.endswith("/"):
        raise ChaeError(f"--storage {url}: expected a file after journal:, e.g. journal:runs/ledger.journal")
    return Path(path).expanduser().resolve()


def storage_url(url: str) -> URL:
    """The parsed storage URL; a bare postgresql:// gets the psycopg2 driver when that is the one
    installed (chae-ablate[postgres]): SQLAlchemy >= 2.1 maps it to psycopg 3."""
    try:
        parsed = make_url(url)
    except Exception:
        raise ChaeError(f"--storage {url.split('@')[-1]}: not a database URL; use e.g. "
                        "sqlite:///runs/optuna.db or postgresql://user:pass@host/db") from None
    if (parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None
            and importlib.util.find_spec("psycopg2") is not None):
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed


def masked(url: str | URL) -> str:
    """The storage URL with its password masked, for messages."""
    if isinstance(url, str) and url.startswith(JOURNAL):
        return url
    try:
        return (url if isinstance(url, URL) else make_url(url)).render_as_string(hide_password=True)
    except Exception:
        return "<storage URL>"


def lost_connection(err: BaseException) -> sqlalchemy.exc.OperationalError | None:
    """The database connection error behind err (raw, or wrapped in optuna's StorageInternalError)."""
    for e in (err, err.__cause__):
        if isinstance(e, sqlalchemy.exc.OperationalError):
            return e
    return None


def lost_ledger(err: BaseException) -> str | None:
    """What a lost connection to the ledger's database says, or None for any other error."""
    lost = lost_connection(err)
    if lost is None:
        return None
    return f"lost the connection to the Optuna storage ({str(lost.orig).strip().splitlines()[0][:200]})"


def retrying(call, *args, transient=lost_connection, attempts: int = 5, **kwargs):
    """errors.retrying, by default while the database connection is lost for a moment."""
    return _retrying(call, *args, transient=transient, attempts=attempts, **kwargs)


def open_study(name: str, url: str, heartbeat_s: int, grace_s: int, **kwargs) -> optuna.Study:
    """The Optuna study `name` in the storage at `url` (created if new). With an RDB storage a
    trial whose worker died is failed after `grace_s` (Optuna's heartbeats) and re-queued with the
    same params and attributes; with a journal, recover_stale does the same from leases.
    kwargs go to optuna.create_study (sampler, pruner)."""
    return opening(url, lambda storage: optuna.create_study(study_name=name, storage=storage, direction="minimize",
                                                            load_if_exists=True, **kwargs),
                   heartbeat_s, grace_s)


def opening(url: str, use, heartbeat_s: int | None = None, grace_s: int | None = None):
    """use(storage) on the storage at `url`: created with its tables if new (under a file lock for
    sqlite, retried on a schema race for a server); driver and connection errors are one line.
    Without heartbeat_s the storage records no heartbeats (a reader's)."""
    journal = journal_file(url)
    if journal is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        # the open lock (O_EXCL) is atomic on NFS v3+, where a cluster's shared folders live
        return use(JournalStorage(JournalFileBackend(str(journal), lock_obj=JournalFileOpenLock(str(journal)))))
    parsed = storage_url(url)
    engine_kwargs: dict = {"pool_pre_ping": True}  # a dropped connection is replaced, not reused
    if (database := sqlite_file(url)) is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    elif parsed.get_backend_name() == "postgresql":
        engine_kwargs["connect_args"] = {"connect_timeout": 10}  # an unreachable host fails in seconds
    beats = {} if heartbeat_s is None else {"heartbeat_interval": heartbeat_s, "grace_period": grace_s,
                                            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback()}
    try:
        with writer_lock(url):  # sqlite: processes create tables in turn
            storage = retrying(RDBStorage, parsed.render_as_string(hide_password=False), engine_kwargs=engine_kwargs,
                               transient=_schema_race, **beats)
            return retrying(use, storage, transient=_schema_race)
    except ImportError as err:  # optuna re-raises the driver's ModuleNotFoundError as ImportError
        driver = getattr(err.__cause__, "name", None) or err.name or "database"
        raise ChaeError(f"--storage {masked(url)}: needs the {driver} driver; "
                        "pip install 'chae-ablate[postgres]'") from None
    except Exception as err:  # sqlalchemy's connection and URL errors
        reason = str(err).strip().splitlines()[0][:200]
        raise ChaeError(f"--storage {masked(url)}: cannot open the Optuna storage ({reason})") from None


def study_names(url: str) -> set[str]:
    """The studies the storage at `url` holds (creating nothing: a missing sqlite or journal file
    holds none)."""
    local = journal_file(url) or sqlite_file(url)
    if local is not None and not local.exists():
        return set()
    return opening(url, lambda storage: {s.study_name for s in optuna.get_all_study_summaries(
        storage, include_best_trial=False)})


def study_exists(name: str, url: str) -> bool:
    """Whether the storage at `url` holds the study `name` (creating nothing)."""
    return name in study_names(url)


def study_attrs(name: str, url: str) -> dict:
    """The user attributes of study `name` ({} when the storage or the study does not exist; creating
    nothing)."""
    if not study_exists(name, url):
        return {}
    return opening(url, lambda storage: dict(optuna.load_study(study_name=name, storage=storage).user_attrs))


def delete_study(name: str, url: str) -> None:
    """Forget study `name`, if the storage holds it."""
    if study_exists(name, url):
        opening(url, lambda storage: optuna.delete_study(study_name=name, storage=storage))


def writer_lock(url: str):
    """A context manager that makes a read-check-write on the storage atomic across processes.
    Optuna claims a WAITING trial with SELECT ... FOR UPDATE, which PostgreSQL honours and sqlite
    ignores (two processes both read WAITING and both won the same trial: one cell trained twice);
    for sqlite this is an exclusive lock on a file beside the database, else nothing (PostgreSQL,
    and a journal, whose log order decides a claim)."""
    database = sqlite_file(url)
    return file_lock(database.with_name(f".{database.name}.lock")) if database is not None else nullcontext()


def _schema_race(err: BaseException) -> bool:
    """Processes starting together on a new database, where one's CREATE lost to another's: a
    duplicate row, sqlite's 'database is locked', or PostgreSQL's 'relation/type ... already
    exists' (DuplicateTable/DuplicateObject, which SQLAlchemy raises as ProgrammingError)."""
    text = str(err).lower()
    return isinstance(err, sqlalchemy.exc.IntegrityError) or (
        isinstance(err, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError))
        and ("locked" in text or "already exists" in text))


# --- holding a trial: heartbeats, leases, recovery ----------------------------------------------

def recover_stale(study: optuna.Study, grace_s: float) -> None:
    """Fail and re-queue (same params and attributes) every RUNNING trial whose worker went silent
    for more than grace_s: Optuna's heartbeats on an RDB storage, leases on a journal."""
    storage, _ = internals(study)
    if isinstance(storage, RDBStorage):
        fail_stale_trials(study)
        return
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        last = trial.user_attrs.get(LEASE) or trial.datetime_start.timestamp()  # killed before its first lease
        if now - last <= grace_s:
            continue
        _, trial_id = internals(study, trial)
        try:
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first, and re-queues it
        RetryHeartbeatStaleTrialCallback()(study, storage.get_trial(trial_id))


def heartbeat(study: optuna.Study, trial_id: int, interval: float) -> Heartbeat:
    """A thread that proves this worker alive while it holds a trial: a heartbeat or a lease."""
    storage, _ = internals(study)
    if isinstance(storage, RDBStorage):
        return Heartbeat(lambda: storage.record_heartbeat(trial_id), interval)
    return Heartbeat(lambda: storage.set_trial_user_attr(trial_id, LEASE, time.time()), interval)


def worker_name() -> str:
    """Who holds a claimed cell, for `chae-ablate status`: host, process and SLURM task if any."""
    name = f"{socket.gethostname()}:{os.getpid()}"
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{name} slurm {array}_{task}"
    return f"{name} slurm {os.environ['SLURM_JOB_ID']}" if os.environ.get("SLURM_JOB_ID") else name


class Heartbeat:
    """Calls beat() from a thread every `interval` seconds while the cell trains."""

    def __init__(self, beat, interval: float):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(beat, interval), daemon=True)

    def _run(self, beat, interval: float) -> None:
        while True:
            try:
                beat()
            except Exception:  # a lost connection: keep trying; the grace period decides
                pass
            if self._stop.wait(interval):
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

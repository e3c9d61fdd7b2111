"""Opening an Optuna storage: a database URL (sqlite, PostgreSQL) or `journal:PATH`, created with
its tables when new, with one-line errors for a missing driver, an unreachable server or a damaged
journal. How workers hold trials on it is claims.py.

A journal is a log file that every process appends to under a lock file and replays. A writer
killed mid-append (a node lost, a full disk) leaves a torn last record; the next append cuts it
off first (JournalBackend), where Optuna would append after it and make the file unreadable for
good. A lock file left by a killed writer is broken after LOCK_BREAK_S of the waiter's own clock.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.storages.journal._file import get_lock_file
from optuna.trial import FrozenTrial, Trial, TrialState
from sqlalchemy.engine import URL, make_url

from ..errors import ChaeError
from ..errors import retrying as _retrying
from ..files import file_lock, sqlite_file

JOURNAL = "journal:"  # --storage journal:PATH, Optuna's journal file
LOCK_BREAK_S = 5  # a journal's lock file unchanged this long (by the waiter's own clock) was left by a dead writer
ACTIVE = (TrialState.WAITING, TrialState.RUNNING)
optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # TPE's group=True


def internals(study: optuna.Study, trial: Trial | FrozenTrial | None = None) -> tuple[BaseStorage, int | None]:
    """The storage behind `study` and the storage id of `trial`, which Optuna keeps private
    (`Study._storage`, `Trial._trial_id`, `FrozenTrial._trial_id`; checked against optuna 5.1.0).
    Claiming a WAITING trial without sampling a new one and recording heartbeats need them;
    tests/test_ledger.py fails loudly if a new Optuna renames them."""
    return study._storage, (trial_id_of(trial) if trial is not None else None)


def trial_id_of(trial: Trial | FrozenTrial) -> int:
    return trial._trial_id


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


def kind(url: str) -> str:
    """'journal' or 'database': what the claim settings' defaults depend on."""
    return "journal" if url.startswith(JOURNAL) else "database"


def open_study(name: str, url: str, **kwargs) -> optuna.Study:
    """The Optuna study `name` in the storage at `url` (created if new); kwargs go to
    optuna.create_study (sampler, pruner)."""
    return opening(url, lambda storage: optuna.create_study(study_name=name, storage=storage, direction="minimize",
                                                            load_if_exists=True, **kwargs))


def opening(url: str, use):
    """use(storage) on the storage at `url`: created with its tables if new (under a file lock for
    sqlite, retried on a schema race for a server); driver and connection errors are one line."""
    journal = journal_file(url)
    if journal is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        return use(JournalStorage(JournalBackend(journal)))
    parsed = storage_url(url)
    engine_kwargs: dict = {"pool_pre_ping": True}  # a dropped connection is replaced, not reused
    if (database := sqlite_file(url)) is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    elif parsed.get_backend_name() == "postgresql":
        engine_kwargs["connect_args"] = {"connect_timeout": 10}  # an unreachable host fails in seconds
    try:
        with writer_lock(url):  # sqlite: processes create tables in turn
            storage = retrying(RDBStorage, parsed.render_as_string(hide_password=False), engine_kwargs=engine_kwargs,
                               transient=_schema_race)
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


class JournalRepaired(UserWarning):
    """A journal's torn last record was cut off."""


class JournalBackend(JournalFileBackend):
    """Optuna's journal file, which cuts off a torn last record before appending (Optuna would
    append after it and leave a line no process can read again) and reports any other damage in
    one line naming the file. The open lock (O_EXCL) is atomic on NFS v3+, where a cluster's
    shared folders live."""

    def __init__(self, path: Path):
        super().__init__(str(path), lock_obj=JournalFileOpenLock(str(path), grace_period=LOCK_BREAK_S))
        self.path = path

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        try:
            yield from super().read_logs(log_number_from)
        except ValueError as err:  # json.JSONDecodeError too
            raise ChaeError(f"ledger journal {self.path}: a record inside it is damaged ({str(err)[:80]}); a record "
                            "cut short at the end is repaired by itself, this is not; restore a copy, or move the "
                            "file aside and rerun with --fresh") from None

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        with get_lock_file(self._lock):
            _cut_torn_tail(self.path)
            with open(self.path, "ab") as f:
                f.write(("".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs)).encode())
                f.flush()
                os.fsync(f.fileno())


def _cut_torn_tail(path: Path) -> None:
    """Under the journal's lock: a file that does not end with a newline ends with the part of a record
    its writer wrote before it died. Nobody has read it (readers stop at an unfinished line): cut it off."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        keep = size
        while keep > 0:
            step = min(keep, 65536)
            f.seek(keep - step)
            chunk = f.read(step)
            at = chunk.rfind(b"\n")
            if at >= 0:
                keep = keep - step + at + 1
                break
            keep -= step
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    warnings.warn(f"ledger journal {path}: cut off a torn last record ({size - keep} bytes) that a killed "
                  "writer left; the study goes on", JournalRepaired, stacklevel=2)


# --- who holds a trial -----------------------------------------------------------------------

def worker_name() -> str:
    """Who holds a claimed cell, for `chae-ablate status`: host, process and SLURM task if any."""
    name = f"{socket.gethostname()}:{os.getpid()}"
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{name} slurm {array}_{task}"
    return f"{name} slurm {os.environ['SLURM_JOB_ID']}" if os.environ.get("SLURM_JOB_ID") else name

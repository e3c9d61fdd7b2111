"""The ledger: an Optuna storage as the queue and record of a study's cells.

One Optuna study per ablation study and one enqueued trial per cell (user attributes variant,
seed, cell_hash, and the worker that holds it). Workers — in this process, in child processes or on
other machines — claim WAITING trials atomically, so no cell runs twice. A claimed trial carries a
heartbeat: a worker killed mid-cell goes stale, its trial is failed and re-queued
(RetryHeartbeatStaleTrialCallback), and the next worker resumes the cell from its checkpoint.

Storages: an RDB URL (sqlite, PostgreSQL), whose heartbeats Optuna keeps, or `journal:PATH`,
Optuna's journal file on a shared filesystem (a cluster without a database server). The journal
storage has no heartbeats, so a claimed trial there carries a lease instead: the time its worker
last wrote (user attribute LEASE), renewed as often as a heartbeat and judged with the same grace
period, by the wall clock of the worker that looks (cluster nodes keep theirs in step with NTP).
Only this module imports optuna.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages import (BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback,
                             fail_stale_trials)
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, Trial, TrialState
from sqlalchemy.engine import URL, make_url

from .errors import ChaeError
from .errors import retrying as _retrying
from .files import file_lock
from .metrics import SUMMARY_METRICS
from .config import Knob
from .study import Cell

ACTIVE = (TrialState.WAITING, TrialState.RUNNING)
JOURNAL = "journal:"  # --storage journal:PATH, Optuna's journal file
LEASE = "lease_at"  # journal storage: when the worker holding a trial last proved itself alive
optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # TPE's group=True
# our own threads record heartbeats for trials run outside Study.optimize (Claim, SearchLedger)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def _internals(study: optuna.Study, trial: Trial | FrozenTrial | None = None) -> tuple[BaseStorage, int | None]:
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


def sqlite_file(url: str) -> Path | None:
    """The database file of a sqlite storage URL, else None (a server, a journal, sqlite in memory)."""
    if journal_file(url) is not None:
        return None
    parsed = storage_url(url)
    return Path(parsed.database) if parsed.get_backend_name() == "sqlite" and parsed.database else None


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


def shown(url: str | URL) -> str:
    """The URL with its password masked, for messages."""
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


@dataclass(frozen=True)
class CellState:
    """A cell as the ledger sees it."""

    variant: str
    seed: int
    cell_hash: str
    state: str  # COMPLETE | RUNNING | WAITING | FAIL | MISSING
    metrics: dict[str, float]  # the summary metrics of a COMPLETE cell, else {}
    failure_reason: str
    worker: str = ""  # who holds (RUNNING) or last held the cell: host:pid, and its SLURM task

    @property
    def best_val_loss(self) -> float | None:
        return self.metrics.get("best_val_loss")

    @property
    def test_acc(self) -> float | None:
        return self.metrics.get("test_acc")


def open_study(name: str, url: str, heartbeat_s: int, grace_s: int, **kwargs) -> optuna.Study:
    """The Optuna study `name` in the storage at `url` (created if new). With an RDB storage a
    trial whose worker died is failed after `grace_s` (Optuna's heartbeats) and re-queued with the
    same params and attributes; with a journal, recover_stale does the same from leases.
    kwargs go to optuna.create_study (sampler, pruner)."""
    return _opening(url, lambda storage: optuna.create_study(study_name=name, storage=storage, direction="minimize",
                                                             load_if_exists=True, **kwargs),
                    heartbeat_s, grace_s)


def _opening(url: str, use, heartbeat_s: int = 5, grace_s: int = 15):
    """use(storage) on the storage at `url`: created with its tables if new (under a file lock for
    sqlite, retried on a schema race for a server); driver and connection errors are one line."""
    journal = journal_file(url)
    if journal is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        # the open lock (O_EXCL) is atomic on NFS v3+, where a cluster's shared folders live
        return use(JournalStorage(JournalFileBackend(str(journal), lock_obj=JournalFileOpenLock(str(journal)))))
    parsed = storage_url(url)
    engine_kwargs: dict = {"pool_pre_ping": True}  # a dropped connection is replaced, not reused
    lock = writer_lock(url)  # sqlite: processes create tables in turn
    if (database := sqlite_file(url)) is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    elif parsed.get_backend_name() == "postgresql":
        engine_kwargs["connect_args"] = {"connect_timeout": 10}  # an unreachable host fails in seconds
    try:
        schema_race = lambda e: isinstance(e, sqlalchemy.exc.IntegrityError) or _locked(e)  # noqa: E731
        with lock:
            storage = retrying(RDBStorage, parsed.render_as_string(hide_password=False),
                               heartbeat_interval=heartbeat_s, grace_period=grace_s,
                               heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
                               engine_kwargs=engine_kwargs, transient=schema_race)
            return retrying(use, storage, transient=schema_race)
    except ImportError as err:  # optuna re-raises the driver's ModuleNotFoundError as ImportError
        driver = getattr(err.__cause__, "name", None) or err.name or "database"
        raise ChaeError(f"--storage {shown(url)}: needs the {driver} driver; "
                        "pip install 'chae-ablate[postgres]'") from None
    except Exception as err:  # sqlalchemy's connection and URL errors
        reason = str(err).strip().splitlines()[0][:200]
        raise ChaeError(f"--storage {shown(url)}: cannot open the Optuna storage ({reason})") from None


def study_exists(name: str, url: str) -> bool:
    """Whether the storage at `url` holds the study `name` (creating nothing: a missing sqlite or
    journal file is False)."""
    local = journal_file(url) or sqlite_file(url)
    if local is not None and not local.exists():
        return False
    names = _opening(url, lambda storage: {s.study_name for s in optuna.get_all_study_summaries(
        storage, include_best_trial=False)})
    return name in names


def recover_stale(study: optuna.Study, grace_s: float) -> None:
    """Fail and re-queue (same params and attributes) every RUNNING trial whose worker went silent
    for more than grace_s: Optuna's heartbeats on an RDB storage, leases on a journal."""
    storage, _ = _internals(study)
    if isinstance(storage, RDBStorage):
        fail_stale_trials(study)
        return
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        last = trial.user_attrs.get(LEASE) or trial.datetime_start.timestamp()  # killed before its first lease
        if now - last <= grace_s:
            continue
        _, trial_id = _internals(study, trial)
        try:
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first, and re-queues it
        RetryHeartbeatStaleTrialCallback()(study, storage.get_trial(trial_id))


def heartbeat(study: optuna.Study, trial: Trial, interval: float) -> Heartbeat:
    """A thread that proves this worker alive while it holds `trial`: a heartbeat or a lease."""
    storage, trial_id = _internals(study, trial)
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


def writer_lock(url: str):
    """A context manager that makes a read-check-write on the storage atomic across processes.
    Optuna claims a WAITING trial with SELECT ... FOR UPDATE, which PostgreSQL honours and sqlite
    ignores (two processes both read WAITING and both won the same trial: one cell trained twice);
    for sqlite this is an exclusive lock on a file beside the database, else nothing (PostgreSQL,
    and a journal, whose log order decides a claim)."""
    database = sqlite_file(url)
    return file_lock(database.with_name(f".{database.name}.lock")) if database is not None else nullcontext()


class Ledger:
    """The Optuna study that queues one ablation study's cells."""

    def __init__(self, study_name: str, url: str, heartbeat_s: int = 5, grace_s: int = 15):
        self.study = open_study(study_name, url, heartbeat_s, grace_s)
        self.name, self.url, self.grace_s = study_name, url, grace_s

    def trials(self, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=states)

    def queue(self, cells: list[Cell], retry_failed: bool = True) -> int:
        """Enqueue every cell that is neither finished, queued nor running (nor failed, unless
        retry_failed: a rerun retries failed cells, a running study does not); returns how many."""
        recover_stale(self.study, self.grace_s)  # dead workers' cells go back to the queue
        done = (TrialState.COMPLETE, *ACTIVE) + (() if retry_failed else (TrialState.FAIL,))
        covered = {t.user_attrs.get("cell_hash") for t in self.trials() if t.state in done}
        missing = [c for c in cells if c.hash not in covered]
        for cell in missing:
            self.study.enqueue_trial({}, user_attrs={"variant": cell.variant.name, "seed": cell.seed,
                                                     "cell_hash": cell.hash})
        return len(missing)

    def claim(self) -> Claim | None:
        """Atomically move one WAITING trial to RUNNING (as Study.ask does, but never samples a
        new one); stale trials of dead workers are re-queued first. The claim names its worker."""
        recover_stale(self.study, self.grace_s)
        with writer_lock(self.url):
            for frozen in self.trials(states=(TrialState.WAITING,)):
                storage, trial_id = _internals(self.study, frozen)
                try:
                    if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                        storage.set_trial_user_attr(trial_id, "worker", worker_name())
                        return Claim(self, Trial(self.study, trial_id))
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue
        return None

    def others_active(self) -> bool:
        """Whether any trial is still queued or running (possibly another worker's)."""
        return bool(self.trials(states=ACTIVE))

    def is_duplicate(self, claim: Claim) -> bool:
        """Another trial of the same cell is finished, or queued/running with a lower number."""
        for other in self.trials():
            if other.number == claim.trial.number or other.user_attrs.get("cell_hash") != claim.cell_hash:
                continue
            if other.state == TrialState.COMPLETE or (other.state in ACTIVE and other.number < claim.trial.number):
                return True
        return False

    def progress(self, hashes: set[str]) -> tuple[int, int, int]:
        """(cells finished, cells whose latest attempt failed, cells queued so far) among `hashes`,
        over all workers."""
        states = [t.state for h, t in self._current_trials().items() if h in hashes]
        return states.count(TrialState.COMPLETE), states.count(TrialState.FAIL), len(states)

    def _current_trials(self) -> dict[str, FrozenTrial]:
        """Per cell hash, the trial that says where the cell stands: its finished trial if any, else
        a queued or running one, else its latest failed attempt (so a racing worker's duplicate,
        failed at once, never hides a live trial)."""
        rank = {TrialState.COMPLETE: 3, TrialState.RUNNING: 2, TrialState.WAITING: 2}
        by_hash: dict[str, FrozenTrial] = {}
        for t in self.trials():
            h = t.user_attrs.get("cell_hash")
            if h and (h not in by_hash or rank.get(t.state, 1) >= rank.get(by_hash[h].state, 1)):
                by_hash[h] = t
        return by_hash

    def cell_states(self, cells: list[Cell]) -> list[CellState]:
        """One row per cell, from its current trial (see _current_trials), else MISSING."""
        by_hash = self._current_trials()
        rows = []
        for cell in cells:
            t = by_hash.get(cell.hash)
            done = t is not None and t.state == TrialState.COMPLETE
            metrics = {k: float(t.user_attrs[k]) for k in SUMMARY_METRICS if k in t.user_attrs} if done else {}
            rows.append(CellState(cell.variant.name, cell.seed, cell.hash, t.state.name if t else "MISSING",
                                  metrics, t.user_attrs.get("failure_reason", "") if t else "",
                                  t.user_attrs.get("worker", "") if t else ""))
        return rows

    def mean_curve(self, cells: list[Cell]) -> dict[int, float]:
        """Per epoch, the mean validation loss the finished `cells` reported (a baseline's curve)."""
        current = self._current_trials()
        curves = [current[c.hash].intermediate_values for c in cells
                  if c.hash in current and current[c.hash].state == TrialState.COMPLETE]
        epochs = sorted(set().union(*curves)) if curves else []
        return {e: sum(c[e] for c in curves if e in c) / sum(e in c for c in curves) for e in epochs}

    def delete(self) -> None:
        """Forget the whole study (for --fresh)."""
        storage, _ = _internals(self.study)
        optuna.delete_study(study_name=self.name, storage=storage)


class Claim:
    """A cell this worker holds: heartbeats, per-epoch reports, and its one outcome."""

    def __init__(self, ledger: Ledger, trial: Trial):
        self.ledger, self.trial = ledger, trial
        self.cell_hash = trial.user_attrs.get("cell_hash")

    def heartbeat(self, interval: float) -> Heartbeat:
        return heartbeat(self.ledger.study, self.trial, interval)

    def reported_epochs(self) -> set[int]:
        storage, trial_id = _internals(self.ledger.study, self.trial)
        return set(storage.get_trial(trial_id).intermediate_values)

    # A worker whose heartbeats were late (a machine under heavy load) may find its trial already
    # failed as stale and re-queued: the cell is someone else's now (resuming from the same
    # checkpoint, to the same result), so these calls then record nothing instead of raising.

    def report(self, epoch: int, val_loss: float) -> None:
        with _unless_taken_over():
            retrying(self.trial.report, val_loss, epoch)

    def complete(self, summary: dict[str, float]) -> None:
        with _unless_taken_over():
            for key, value in summary.items():
                retrying(self.trial.set_user_attr, key, value)
            retrying(self.ledger.study.tell, self.trial, summary["best_val_loss"])

    def fail(self, reason: str) -> None:
        with _unless_taken_over():
            retrying(self.trial.set_user_attr, "failure_reason", reason[:2000])
            retrying(self.ledger.study.tell, self.trial, state=TrialState.FAIL)


@contextmanager
def _unless_taken_over() -> Iterator[None]:
    try:
        yield
    except optuna.exceptions.UpdateFinishedTrialError:
        pass


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


def _locked(err: BaseException) -> bool:
    """sqlite's 'database is locked' / schema-creation race between processes starting together."""
    text = str(err).lower()
    return isinstance(err, sqlalchemy.exc.OperationalError) and ("locked" in text or "already exists" in text)


# --- search: Optuna samples the knobs --------------------------------------------------------

REJECTED, OVER_BUDGET, TRAINED = "rejected", "over_budget", "trained"  # a search trial's outcome attribute


class BaselinePruner(optuna.pruners.BasePruner):
    """Prunes a trial whose validation loss at epoch e is worse than the baseline's mean curve at e
    by more than `margin` (the study's smallest difference that matters)."""

    def __init__(self, curve: dict[int, float], margin: float):
        self.curve, self.margin = curve, margin

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step not in self.curve:
            return False
        return trial.intermediate_values[step] > self.curve[step] + self.margin


def make_sampler(kind: str, seed: int | None, trials: int) -> optuna.samplers.BaseSampler:
    """TPE (multivariate, grouped for conditional knobs), GP or random; seeded (None: fresh entropy,
    for workers that must not all propose the same trials)."""
    startup = max(2, min(10, trials // 3))
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, group=True,
                                      constant_liar=True)


def make_pruner(kind: str, curve: dict[int, float], margin: float, epochs: int) -> optuna.pruners.BasePruner:
    if kind == "baseline":
        return BaselinePruner(curve, margin)
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    return optuna.pruners.NopPruner()


class SearchLedger:
    """The Optuna study of a search: trials asked from a sampler, a budget of trained trials kept
    exactly across workers and restarts, pruned against the baseline."""

    def __init__(self, name: str, url: str, sampler: optuna.samplers.BaseSampler,
                 pruner: optuna.pruners.BasePruner, heartbeat_s: int = 5, grace_s: int = 15):
        self.study = open_study(name, url, heartbeat_s, grace_s, sampler=sampler, pruner=pruner)
        self.heartbeat_s, self.grace_s, self.url = heartbeat_s, grace_s, url

    def ask(self, knobs: tuple[Knob, ...]) -> tuple[Trial, dict]:
        """A new trial (a dead worker's trial, re-queued with its params, comes first) and its knobs."""
        with writer_lock(self.url):  # ask pops a re-queued trial: the same race as Ledger.claim
            trial = retrying(self.study.ask)
        params = {}
        for knob in knobs:
            if knob.choices:
                params[knob.path] = trial.suggest_categorical(knob.path, list(knob.choices))
            elif knob.integer:
                params[knob.path] = trial.suggest_int(knob.path, int(knob.low), int(knob.high),
                                                      step=int(knob.step or 1), log=knob.log)
            else:
                params[knob.path] = trial.suggest_float(knob.path, knob.low, knob.high, step=knob.step, log=knob.log)
        return trial, params

    def is_retry(self, trial: Trial) -> bool:
        """Whether this trial re-runs one whose worker died (it keeps that trial's budget slot)."""
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(self.frozen(trial)) is not None

    def frozen(self, trial: Trial) -> FrozenTrial:
        storage, trial_id = _internals(self.study, trial)
        return storage.get_trial(trial_id)

    def used(self, before: int | None = None) -> int:
        """Budget slots taken (by trials numbered below `before`): trained, pruned, running or re-queued
        trials that were not rejected. A running trial not yet judged counts, so two workers asking
        at once can never both take the last slot."""
        recover_stale(self.study, self.grace_s)
        holding = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
        return sum(1 for t in self.study.get_trials(deepcopy=False)
                   if (before is None or t.number < before) and t.user_attrs.get("outcome") in (None, TRAINED)
                   and (t.state in holding or (t.state == TrialState.FAIL and "reason" in t.user_attrs)
                        or (t.state == TrialState.WAITING and t.user_attrs.get("outcome") == TRAINED)))
        # a FAIL with a reason is a trial whose cell failed: it used its slot. A FAIL without one is a
        # dead worker's trial: its re-queued copy (WAITING, then RUNNING) holds the slot instead.

    def pending(self) -> tuple[int, int]:
        """(queued, running) trials: a finished budget still waits for these."""
        recover_stale(self.study, self.grace_s)
        trials = self.study.get_trials(deepcopy=False, states=ACTIVE)
        return (sum(t.state == TrialState.WAITING for t in trials), sum(t.state == TrialState.RUNNING for t in trials))

    def skip(self, trial: Trial, outcome: str, reason: str) -> None:
        """A trial that trains nothing, with why. A combination the builder rejected is told PRUNED
        without values, which TPE ranks worst (a FAIL it would ignore, and propose again); one over
        the budget is FAIL."""
        retrying(trial.set_user_attr, "outcome", outcome)
        retrying(trial.set_user_attr, "reason", reason[:2000])
        retrying(self.study.tell, trial, state=TrialState.PRUNED if outcome == REJECTED else TrialState.FAIL)

    def propose(self, params: dict) -> None:
        """Queue a combination for the next ask (after a rejection, so that any sampler moves on)."""
        retrying(self.study.enqueue_trial, params, skip_if_exists=True)

    def accept(self, trial: Trial) -> None:
        retrying(trial.set_user_attr, "outcome", TRAINED)

    def heartbeat(self, trial: Trial) -> Heartbeat:
        return heartbeat(self.study, trial, self.heartbeat_s)

    def report(self, trial: Trial, epoch: int, value: float) -> bool:
        """Report an epoch's validation loss; True when the pruner says stop."""
        retrying(trial.report, value, epoch)
        return retrying(trial.should_prune)

    def finish(self, trial: Trial, value: float | None, pruned_at: int | None = None) -> None:
        if pruned_at is not None:
            retrying(trial.set_user_attr, "pruned_at_epoch", pruned_at)
            retrying(self.study.tell, trial, state=TrialState.PRUNED)
        else:
            retrying(self.study.tell, trial, value)

    def fail(self, trial: Trial, reason: str) -> None:
        retrying(trial.set_user_attr, "reason", reason[:2000])
        retrying(self.study.tell, trial, state=TrialState.FAIL)

    def trials(self) -> list[dict]:
        """One plain row per trial: number, state, value, outcome, reason, pruned epoch, params."""
        rows = []
        for t in self.study.get_trials(deepcopy=False):
            outcome = t.user_attrs.get("outcome")
            state = outcome.upper() if outcome in (REJECTED, OVER_BUDGET) else t.state.name
            rows.append({"number": t.number, "state": state, "value": t.value, "reason": t.user_attrs.get("reason", ""),
                         "pruned_at_epoch": t.user_attrs.get("pruned_at_epoch"), "params": dict(t.params),
                         "retry_of": RetryHeartbeatStaleTrialCallback.retried_trial_number(t)})
        return rows

    def importances(self) -> dict[str, float]:
        """fANOVA parameter importances over the finished trials ({} with fewer than two, or when
        every finished trial has the same value)."""
        done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(done) < 2 or len({t.value for t in done}) < 2:
            return {}
        try:
            return dict(optuna.importance.get_param_importances(
                self.study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)))
        except (RuntimeError, ValueError):  # e.g. a single distinct value of every knob
            return {}

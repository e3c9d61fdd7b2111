"""Running a study: Optuna is the ledger and the queue, MLflow the record.

One Optuna study per ablation study and one enqueued trial per cell (user attributes variant,
seed, cell_hash). Workers — in this process, in child processes (`--workers N`) or on other
machines (`chae-ablate worker`) — claim WAITING trials atomically, so no cell runs twice. Trials
carry a heartbeat: a worker killed mid-cell goes stale, its trial is failed and re-queued
(RetryHeartbeatStaleTrialCallback), and the next worker resumes the cell from its last checkpoint.
Only this module imports optuna.
"""
from __future__ import annotations

import importlib.util
import multiprocessing
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import sqlalchemy.exc
import torch
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import Trial, TrialState
from tqdm.auto import tqdm

from . import tracking
from .config import DataConfig, to_dict
from .data import Dataset, load_dataset
from .errors import ChaeError
from .figures import learning_curve
from .study import Cell, Study
from .train import CellFailed, pick_device, train_cell

ACTIVE = (TrialState.WAITING, TrialState.RUNNING)


@dataclass(frozen=True)
class RunOptions:
    storage: str | None = None  # Optuna RDB URL; default sqlite under runs_dir
    workers: int = 1  # cells trained at once on this machine
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    runs_dir: Path = Path("runs")  # caches, checkpoints, the default ledger, MLflow artifacts
    fresh: bool = False  # forget earlier results of this study and start over
    progress: bool = True  # progress bars
    compile: bool = False  # torch.compile the model
    threads: int | None = None  # torch CPU threads per worker (default: cores / workers)
    heartbeat_s: int = 5  # how often a running trial proves its worker alive
    grace_s: int = 15  # silence after which a running trial is failed and re-queued

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.runs_dir / 'optuna.db').resolve()}"


def _safe_url(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]+@", r"//\1:***@", url)


def _with_driver(url: str) -> str:
    """postgresql:// with the psycopg2 driver when that is the one installed (chae-ablate[postgres]):
    SQLAlchemy >= 2.1 maps a bare postgresql:// to psycopg 3."""
    if (url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None
            and importlib.util.find_spec("psycopg2") is not None):
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def open_ledger(study: Study, options: RunOptions) -> optuna.Study:
    """The Optuna study that queues this ablation study's cells."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    url, shown = _with_driver(options.storage_url), _safe_url(options.storage_url)
    engine_kwargs: dict = {"pool_pre_ping": True}  # a dropped connection is replaced, not reused
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    elif url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}  # an unreachable host fails in seconds
    try:
        racing_worker = lambda e: isinstance(e, sqlalchemy.exc.IntegrityError)  # noqa: E731 (it created the tables)
        storage = _retrying(RDBStorage, url, heartbeat_interval=options.heartbeat_s, grace_period=options.grace_s,
                            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
                            engine_kwargs=engine_kwargs, transient=racing_worker)
        return optuna.create_study(study_name=study.name, storage=storage, direction="minimize",
                                   load_if_exists=True)
    except ImportError as err:  # optuna re-raises the driver's ModuleNotFoundError as ImportError
        driver = getattr(err.__cause__, "name", None) or err.name or "database"
        raise ChaeError(f"--storage {shown}: needs the {driver} driver; "
                        "pip install 'chae-ablate[postgres]'") from None
    except Exception as err:  # sqlalchemy's connection and URL errors
        reason = str(err).strip().splitlines()[0][:200]
        raise ChaeError(f"--storage {shown}: cannot open the Optuna storage ({reason})") from None


def _lost_connection(err: BaseException) -> sqlalchemy.exc.OperationalError | None:
    """The database connection error behind err (raw, or wrapped in optuna's StorageInternalError)."""
    for e in (err, err.__cause__):
        if isinstance(e, sqlalchemy.exc.OperationalError):
            return e
    return None


def _retrying(call, *args, transient=_lost_connection, attempts: int = 5, **kwargs):
    """call(*args, **kwargs), retried after 1, 2, 4, 8 s while transient(error): by default a
    database connection lost for a moment."""
    for attempt in range(attempts):
        try:
            return call(*args, **kwargs)
        except Exception as err:
            if attempt == attempts - 1 or not transient(err):
                raise
            time.sleep(2 ** attempt)


def sync_queue(ledger: optuna.Study, cells: list[Cell]) -> int:
    """Enqueue every cell that is neither finished, queued nor running; returns how many."""
    fail_stale_trials(ledger)  # dead workers' cells go back to the queue
    trials = ledger.get_trials(deepcopy=False)
    covered = {t.user_attrs.get("cell_hash") for t in trials if t.state in (TrialState.COMPLETE, *ACTIVE)}
    missing = [c for c in cells if c.hash not in covered]
    for cell in missing:
        ledger.enqueue_trial({}, user_attrs={"variant": cell.variant.name, "seed": cell.seed,
                                             "cell_hash": cell.hash})
    return len(missing)


def claim_next(ledger: optuna.Study) -> Trial | None:
    """Atomically move one WAITING trial to RUNNING (as Study.ask does, but never samples a new one)."""
    storage = ledger._storage
    for frozen in ledger.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING):
                return Trial(ledger, frozen._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def _is_duplicate(ledger: optuna.Study, trial: Trial, cell_hash: str) -> bool:
    """Another trial of the same cell is finished, or queued/running with a lower number."""
    for other in ledger.get_trials(deepcopy=False):
        if other.number == trial.number or other.user_attrs.get("cell_hash") != cell_hash:
            continue
        if other.state == TrialState.COMPLETE or (other.state in ACTIVE and other.number < trial.number):
            return True
    return False


class Heartbeat:
    """Records the trial's heartbeat from a thread while the cell trains."""

    def __init__(self, ledger: optuna.Study, trial: Trial, interval: float):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(ledger._storage, trial._trial_id, interval),
                                        daemon=True)

    def _beat(self, storage, trial_id: int, interval: float) -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
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


class DataCache:
    """Datasets loaded once per process, per data config and resolution."""

    def __init__(self, runs_dir: Path, progress: bool):
        self.runs_dir, self.progress, self._loaded = runs_dir, progress, {}

    def get(self, data: DataConfig, resolution: int) -> Dataset:
        key = (replace(data, augment=None), resolution)  # augmentation does not change the images
        if key not in self._loaded:
            self._loaded[key] = load_dataset(data, resolution, self.runs_dir, progress=self.progress)
        return self._loaded[key]


@dataclass
class Connection:
    """What a process needs to work on a study: the ledger, the MLflow record, the loaded data."""

    ledger: optuna.Study
    log: tracking.StudyLog
    data: DataCache


def connect(study: Study, options: RunOptions, data: DataCache | None = None) -> Connection:
    return Connection(open_ledger(study, options), tracking.StudyLog(study.name, plan(study), options.runs_dir),
                      data or DataCache(options.runs_dir, options.progress))


class Worker:
    """Claims and trains cells until the study's queue is empty and nothing else is running."""

    def __init__(self, study: Study, options: RunOptions, device: torch.device, connection: Connection):
        self.study, self.options, self.device = study, options, device
        self.cells = {c.hash: c for c in study.cells()}
        self.ledger, self.log, self.data = connection.ledger, connection.log, connection.data

    def run(self, poll_s: float = 2.0, on_cell_done=lambda: None) -> int:
        """Returns the number of cells this worker trained."""
        done = 0
        while True:
            trial, others_running = _retrying(self._next)
            if trial is None:
                if not others_running:
                    return done
                time.sleep(poll_s)  # others are running: wait, in case one of them dies
                continue
            cell = self.cells.get(trial.user_attrs.get("cell_hash"))
            if cell is None or _is_duplicate(self.ledger, trial, cell.hash):
                trial.set_user_attr("failure_reason", "duplicate or unknown cell; skipped")
                self.ledger.tell(trial, state=TrialState.FAIL)
                continue
            with Heartbeat(self.ledger, trial, self.options.heartbeat_s):
                self.run_cell(cell, trial)
            done += 1
            on_cell_done()

    def _next(self) -> tuple[Trial | None, bool]:
        """(a claimed trial or None, whether other workers' trials are still active)."""
        fail_stale_trials(self.ledger)
        trial = claim_next(self.ledger)
        return trial, trial is None and bool(self.ledger.get_trials(deepcopy=False, states=ACTIVE))

    def run_cell(self, cell: Cell, trial: Trial) -> None:
        checkpoints = self.options.runs_dir / "checkpoints" / self.study.name / cell.hash
        resumable = _checkpoint_epochs(checkpoints)
        config = cell.config
        tags = {"variant": cell.variant.name, "seed": str(cell.seed), "cell_hash": cell.hash,
                "description": cell.variant.description, "device": str(self.device),
                **tracking.source_tags()}
        params = tracking.flatten({**to_dict(config), "seed": cell.seed})
        run = self.log.cell_run(cell.label, tags, params, resumable)
        try:
            data = self.data.get(config.data, config.model.resolution)
            run.log_dict(to_dict(config), "config.json")
            run.log_artifact(data.manifest)
            result = train_cell(config, cell.seed, data, self.device, checkpoints, _Reporter(run, trial),
                                progress=self.options.progress, label=cell.label,
                                compile_model=self.options.compile)
        except CellFailed as err:
            self._fail(trial, run, str(err))
            return
        except Exception as err:
            lost = _lost_server(err)
            self._fail(trial, run, lost or f"{type(err).__name__}: {err}")
            if lost:
                raise ChaeError(f"cell {cell.label}: {lost}; its checkpoint is kept, rerun to resume") from None
            raise
        curve = learning_curve(result.history, cell.label, checkpoints / "learning_curve.png")
        run.log_artifact(curve)
        run.finish(result.summary())
        for key, value in result.summary().items():
            _retrying(trial.set_user_attr, key, value)
        _retrying(self.ledger.tell, trial, result.best_val_loss)

    def _fail(self, trial: Trial, run: tracking.CellRun, reason: str) -> None:
        """Best effort on each side, as one of them may be the server that was lost: an MLflow run
        left RUNNING is marked FAILED by the cell's next attempt; a trial left RUNNING goes stale
        and is re-queued."""
        try:
            run.fail(reason)
        except Exception:
            pass
        try:
            _retrying(trial.set_user_attr, "failure_reason", reason[:2000])
            _retrying(self.ledger.tell, trial, state=TrialState.FAIL)
        except Exception:
            pass


def _lost_server(err: Exception) -> str | None:
    """What a lost connection to one of the two servers says about it, or None for any other error."""
    lost = _lost_connection(err)
    if lost is not None:
        return f"lost the connection to the Optuna storage ({str(lost.orig).strip().splitlines()[0][:200]})"
    return tracking.lost_server(err)


class _Reporter:
    """Sends each epoch to MLflow and its validation loss to the Optuna trial."""

    def __init__(self, run: tracking.CellRun, trial: Trial):
        self.run, self.trial = run, trial

    def restore(self, history: list[dict[str, float]]) -> None:
        self.run.restore(history)
        reported = self.trial.storage.get_trial(self.trial._trial_id).intermediate_values
        for epoch, metrics in enumerate(history, start=1):
            if epoch not in reported:
                self.trial.report(metrics["val_loss"], epoch)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.run.log_epoch(epoch, metrics)
        _retrying(self.trial.report, metrics["val_loss"], epoch)


def _checkpoint_epochs(directory: Path) -> int:
    path = directory / "last.pt"
    if not path.exists():
        return 0
    return len(torch.load(path, map_location="cpu", weights_only=False)["state"]["history"])


def plan(study: Study) -> list[dict]:
    return [{"variant": c.variant.name, "seed": c.seed, "cell_hash": c.hash,
             "description": c.variant.description} for c in study.cells()]


# --- the commands ----------------------------------------------------------------------------

def prepare(study: Study, options: RunOptions) -> Connection:
    """Everything that can fail before training: data present and cached, servers reachable;
    then the study's cells queued."""
    data = DataCache(options.runs_dir, options.progress)
    for key in sorted({(v.config.data, v.config.model.resolution) for v in study.variants}, key=str):
        data.get(*key)  # builds each resolution's decode-once cache before any worker starts
    tracking.check_tracking_server()
    if options.fresh:
        _forget(study, options, open_ledger(study, options))
    connection = connect(study, options, data)
    connection.log.update_plan(plan(study))
    sync_queue(connection.ledger, study.cells())
    return connection


def _forget(study: Study, options: RunOptions, ledger: optuna.Study) -> None:
    import shutil
    optuna.delete_study(study_name=study.name, storage=ledger._storage)
    shutil.rmtree(options.runs_dir / "checkpoints" / study.name, ignore_errors=True)
    tracking.delete_study_runs(study.name)


def run_study(study: Study, options: RunOptions) -> list[dict]:
    """Train every unfinished cell of the study; returns one summary row per cell."""
    device = pick_device(options.device)
    connection = prepare(study, options)
    total = len(study.cells())
    if options.workers <= 1:
        _set_threads(options, 1)
        with _StudyBar(connection.ledger, study, total, options.progress) as bar:
            Worker(study, options, device, connection).run(on_cell_done=bar.refresh)
    else:
        _run_children(study, options, connection.ledger, total)
    connection.log.finish()
    return summary_rows(connection.ledger, study)


def _run_children(study: Study, options: RunOptions, ledger: optuna.Study, total: int) -> None:
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_child_main, args=(study, options, i), daemon=False)
                for i in range(options.workers)]
    for child in children:
        child.start()
    with _StudyBar(ledger, study, total, options.progress) as bar:
        while any(child.is_alive() for child in children):
            time.sleep(2)
            bar.refresh()
    failed = [c.exitcode for c in children if c.exitcode]
    if failed:
        raise ChaeError(f"{len(failed)} worker process(es) exited with an error; rerun to resume")


def _child_main(study: Study, options: RunOptions, index: int) -> None:
    device = pick_device(options.device)
    if device.type == "cuda" and options.device in ("auto", "cuda") and torch.cuda.device_count() > 1:
        device = torch.device(f"cuda:{index % torch.cuda.device_count()}")
    _set_threads(options, options.workers)
    options = replace(options, progress=False)
    Worker(study, options, device, connect(study, options)).run()


def run_worker(study: Study, options: RunOptions) -> int:
    """Join a study (another process or machine) and train cells until none are left.

    It queues missing cells too, so machines may start in any order; a cell queued twice by a
    race runs once (_is_duplicate)."""
    tracking.check_tracking_server()
    _set_threads(options, 1)
    connection = connect(study, options)
    sync_queue(connection.ledger, study.cells())
    return Worker(study, options, pick_device(options.device), connection).run()


def _set_threads(options: RunOptions, workers: int) -> None:
    torch.set_num_threads(options.threads or max(1, (os.cpu_count() or 1) // workers))


class _StudyBar:
    """cells done / total, failures, ETA — read from the ledger, so it counts every worker's cells."""

    def __init__(self, ledger: optuna.Study, study: Study, total: int, enabled: bool):
        self.ledger, self.hashes = ledger, {c.hash for c in study.cells()}
        self.bar = tqdm(total=total, desc=f"study {study.name}", unit="cell", disable=not enabled,
                        dynamic_ncols=True)

    def __enter__(self) -> _StudyBar:
        self.refresh()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.refresh()
        except Exception:  # the ledger is gone: the error that ended the run matters, not the bar
            pass
        self.bar.close()

    def refresh(self) -> None:
        trials = [t for t in self.ledger.get_trials(deepcopy=False) if t.user_attrs.get("cell_hash") in self.hashes]
        done = {t.user_attrs["cell_hash"] for t in trials if t.state == TrialState.COMPLETE}
        failed = {t.user_attrs["cell_hash"] for t in trials if t.state == TrialState.FAIL} - done
        self.bar.n = len(done)
        self.bar.set_postfix(failed=len(failed), refresh=False)
        self.bar.refresh()


def summary_rows(ledger: optuna.Study, study: Study) -> list[dict]:
    """One row per cell from the ledger: variant, seed, state, best val loss, test accuracy."""
    by_hash: dict[str, optuna.trial.FrozenTrial] = {}
    for t in ledger.get_trials(deepcopy=False):
        h = t.user_attrs.get("cell_hash")
        if h and (h not in by_hash or by_hash[h].state != TrialState.COMPLETE):
            by_hash[h] = t
    rows = []
    for cell in study.cells():
        t = by_hash.get(cell.hash)
        rows.append({"variant": cell.variant.name, "seed": cell.seed,
                     "state": t.state.name if t else "MISSING",
                     "best_val_loss": t.value if t and t.state == TrialState.COMPLETE else None,
                     "test_acc": t.user_attrs.get("test_acc") if t else None,
                     "failure_reason": t.user_attrs.get("failure_reason", "") if t else ""})
    return rows

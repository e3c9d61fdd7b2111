"""Running a study: workers and processes over the ledger (ledger/), recorded in MLflow (tracking.py).

A Worker claims cells from the ledger and trains them one at a time — in this process, in child
processes (`--workers N`) or on other machines (`chae-ablate worker`). Every failure of one cell
fails that cell only (reason in the ledger and in MLflow) and the study goes on. A worker that
stops on purpose (Ctrl-C, SIGTERM, SLURM's preemption signal) or loses the MLflow store hands its
cell back to the queue with its checkpoint; after an outage it waits for the store and goes on.
One whose cell was taken over (ledger/claims.py) stops it and writes nothing more. Only a lost
ledger stops a worker, since no cell could be claimed or recorded.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import builders, tracking, versions
from .analysis import Outcome, Plan, outcome
from .config import DataConfig
from .data import Dataset, load_dataset
from .errors import ChaeError
from .figures import learning_curve
from .files import inside
from .ledger import (Claim, Ledger, TakenOver, delete_study, lost_ledger, masked, recorded_versions, retrying,
                     study_exists)
from .metrics import Metric
from .options import RunOptions
from .records import CellRecord, CellState, PlannedCell
from .study import Cell, Study
from .train import CellFailed, checkpoint_epochs, pick_device, train_cell
from .versions import Version


@dataclass
class RunSummary:
    """What `run` did: one record per cell the study needs, and the report when one was written."""

    study: str
    cells: list[CellRecord]
    report: Path | None = None
    verdicts: str = ""  # the report's per-variant table, as text
    link: str | None = None  # the study's runs table in the MLflow UI

    @property
    def unfinished(self) -> list[CellRecord]:
        return [c for c in self.cells if c.state != CellState.DONE]


class LoadedData:
    """Datasets loaded once per process, per data config and resolution."""

    def __init__(self, runs_dir: Path, progress: bool):
        self.runs_dir, self.progress, self._loaded = runs_dir, progress, {}

    def get(self, data: DataConfig, resolution: int) -> Dataset:
        if (data, resolution) not in self._loaded:
            self._loaded[(data, resolution)] = load_dataset(data, resolution, self.runs_dir, progress=self.progress)
        return self._loaded[(data, resolution)]


@dataclass
class StudySession:
    """What a process holds to work on a study: the ledger, the MLflow record, the loaded data."""

    ledger: Ledger
    log: tracking.StudyLog
    data: LoadedData


def open_session(study: Study, options: RunOptions, data: LoadedData | None = None) -> StudySession:
    ledger = Ledger(study.name, options.storage_url, **options.claim_settings)
    return StudySession(ledger, tracking.StudyLog(study.plan(), options.runs_dir),
                        data or LoadedData(options.runs_dir, options.bars))


def checkpoint_dir(options: RunOptions, study: Study, cell: Cell) -> Path:
    return inside(options.runs_dir, "checkpoints", study.name, cell.cell_hash)


class Worker:
    """Claims and trains cells until the study's queue is empty and nothing else is running."""

    def __init__(self, study: Study, options: RunOptions, device: torch.device, session: StudySession):
        self.study, self.options, self.device, self.session = study, options, device, session
        self.cells = {c.cell_hash: c for c in study.cells()}  # this version's cells: the only ones it claims

    def run(self, poll_s: float = 2.0, on_cell_done=lambda cell, result: None) -> int:
        """Returns the number of cells this worker trained."""
        ledger, done = self.session.ledger, 0
        while True:
            claim = retrying(ledger.claim, self.cells)
            self.record_given_up()
            if claim is None:
                if retrying(ledger.active, self.cells):
                    if not self.options.linger:
                        return done  # nothing to claim: leave the rest to the workers training it
                    time.sleep(poll_s)  # others are running: wait, in case one of them dies
                    continue
                if retrying(ledger.queue, needed_cells(self.study, ledger), retry_failed=False):
                    continue  # an adaptive study's next look needs more seeds
                return done
            cell = self.cells[claim.cell_hash]
            if ledger.is_duplicate(claim):
                claim.fail("duplicate of a cell another worker holds or finished; skipped")
                continue
            result = handed_back_on_stop(f"cell {cell.label}", claim.release, claim.heartbeat(), self.run_cell,
                                         cell, claim)
            if result is None:
                continue  # handed back after an MLflow outage
            done += 1
            on_cell_done(cell, result)

    def record_given_up(self) -> None:
        """Cells whose workers died more than --retries times: failed in MLflow too, with the reason."""
        for record in self.session.ledger.given_up():
            best_effort(self.session.log.fail_cell, record.cell_hash, record.failure_reason)
            notify(f"cell {record.variant} seed {record.seed}: failed, {record.failure_reason}")

    def run_cell(self, cell: Cell, claim: Claim) -> str:
        """Train one claimed cell; returns 'done' (with the epoch it diverged at, if so), 'failed: reason'
        or 'taken over'. Raises TrackingLost when the MLflow store stays away, ChaeError when the ledger is lost."""
        try:
            summary = self.train(cell, EpochReporter(claim.report, claim.reported_epochs, claim.confirm_held))
            claim.complete(summary)
        except CellError as err:
            best_effort(claim.fail, err.reason)
            return f"{CellState.FAILED}: {err.reason.splitlines()[0][:200] if err.reason else ''}"
        except TakenOver as err:
            notify(f"cell {cell.label}: {err}; stopped here, writing nothing more")
            return "taken over by another worker"
        if Metric.DIVERGED_EPOCH in summary:
            return f"{CellState.DONE} (diverged at epoch {summary[Metric.DIVERGED_EPOCH]:.0f})"
        return CellState.DONE

    def train(self, cell: Cell, reporter: EpochReporter) -> dict[str, float]:
        """Train a cell with its MLflow run, checkpoints and system metrics; returns its summary
        metrics. A failure is recorded on the run and raised as CellError (ChaeError when the ledger
        was lost, TrackingLost when the MLflow store stayed away); CellPruned when the reporter's
        pruner stops it; TakenOver when another worker holds the cell now."""
        checkpoints = checkpoint_dir(self.options, self.study, cell)
        try:
            finished = self.session.log.finished_summary(cell)
            if finished is not None:
                notify(f"cell {cell.label}: already finished in MLflow (its worker stopped before the ledger "
                       "heard); its result recorded, not trained again")
                return finished
            run = self.session.log.cell_run(cell, str(self.device), checkpoint_epochs(checkpoints))
        except Exception as err:
            if lost := tracking.lost_server(err):
                raise TrackingLost(lost) from None
            raise
        reporter.run = run
        try:
            data = self.session.data.get(cell.config.data, cell.config.model.resolution)
            run.log_cell_inputs(cell, data)
            with run.system_metrics():
                result = train_cell(config=cell.config, seed=cell.seed, data=data, device=self.device,
                                    checkpoint_dir=checkpoints, tracker=reporter, progress=self.options.bars,
                                    label=cell.label, compile_model=self.options.compile)
            reporter.confirm_held()  # a cell taken over is finished by its new holder alone
            run.log_artifact(learning_curve(result.history, cell.label, checkpoints / "learning_curve.png",
                                             result.diverged_epoch))
            run.finish(result.summary(), resumed_from=result.resumed_from)
            return result.summary()
        except CellPruned as pruned:
            best_effort(run.prune, pruned.epoch)
            raise
        except TakenOver:
            raise  # the run and the checkpoint are the new holder's now: write nothing
        except Exception as err:
            if lost := tracking.lost_server(err):
                raise TrackingLost(lost) from None  # the run stays RUNNING; the cell's next holder continues it
            lost = lost_ledger(err)
            reason = lost or (str(err) if isinstance(err, CellFailed) else f"{type(err).__name__}: {err}")
            best_effort(run.fail, reason)
            if lost:
                raise ChaeError(f"cell {cell.label}: {lost}; its checkpoint is kept, rerun to resume") from None
            raise CellError(reason) from None


_stops_said_later: ContextVar[list[str] | None] = ContextVar("stops_said_later", default=None)


@contextmanager
def stops_said_later() -> Iterator[list[str]]:
    """Within it, a cell stopped by Ctrl-C or SIGTERM is not announced on its own line: what became
    of it ('cell baseline/seed0 handed back to the queue') lands in the list, for the caller's one
    last line (a search's)."""
    said: list[str] = []
    token = _stops_said_later.set(said)
    try:
        yield said
    finally:
        _stops_said_later.reset(token)


def handed_back_on_stop(what: str, release, heartbeat, work, *args, quiet: bool = False):
    """work(*args) for a held cell or trial, its heartbeat beating. When the MLflow store stays away,
    stop beating, hand it back (release(why)), wait for the store and return None; on any stop
    (Ctrl-C, SIGTERM or SLURM's signal as SystemExit, a lost ledger) hand it back and re-raise. Its
    checkpoint stays either way. quiet: say nothing on Ctrl-C or SIGTERM (a search says it in its
    own last line; see also stops_said_later)."""
    try:
        with heartbeat:
            return work(*args)
    except TrackingLost as lost:
        best_effort(release, "lost the MLflow store")
        notify(f"{what}: {lost}; handed back to the queue, its checkpoint kept")
        tracking.wait_for_server(notify)
        return None
    except BaseException as stop:
        back = ("handed back to the queue" if best_effort(release, type(stop).__name__) else
                "back in the queue once the grace period has passed")
        said_later = _stops_said_later.get()
        if isinstance(stop, (KeyboardInterrupt, SystemExit)) and (quiet or said_later is not None):
            if not quiet:
                said_later.append(f"{what} {back}")
        else:
            notify(f"{what}: stopped ({type(stop).__name__}); {back}, its checkpoint kept")
        raise


class TrackingLost(Exception):
    """The MLflow store stayed unavailable past tracking.patience_s(): the cell goes back to the queue."""


class CellError(Exception):
    """A cell failed (any error but a lost server); the reason is recorded and the study goes on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class CellPruned(Exception):
    """A pruner stopped the cell after `epoch` (a search trial doing worse than the baseline)."""

    def __init__(self, epoch: int):
        super().__init__(f"pruned after epoch {epoch}")
        self.epoch = epoch


def best_effort(record, *args) -> bool:
    """Record on one side even when the other side's server was lost (a stale trial is re-queued,
    a RUNNING MLflow run is failed by the cell's next attempt); whether it was recorded."""
    try:
        record(*args)
        return True
    except Exception:
        return False


class EpochReporter:
    """Sends each epoch to MLflow and its validation loss to the ledger (for pruners): report(epoch,
    loss) returns True when the cell should stop; reported() lists the epochs the ledger has;
    confirm_held() raises TakenOver when another worker holds the cell now (train_cell asks before
    it writes an epoch's checkpoint)."""

    def __init__(self, report, reported, confirm_held):
        self.report, self.reported, self.confirm_held, self.run = report, reported, confirm_held, None

    def log_missed_epochs(self, history: list[dict[str, float]]) -> None:
        """A resumed cell's epochs from its checkpoint: those MLflow or the ledger lack are logged, and
        the pruner, asked of them, may stop the cell before it trains any further."""
        self.run.log_missed_epochs(history)
        known = self.reported()
        for epoch, metrics in enumerate(history, start=1):
            if epoch not in known and self.report(epoch, metrics[Metric.VAL_LOSS]):
                raise CellPruned(epoch)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.run.log_epoch(epoch, metrics)
        if self.report(epoch, metrics[Metric.VAL_LOSS]):
            raise CellPruned(epoch)


# --- the commands ----------------------------------------------------------------------------

def check_runs_dir(options: RunOptions) -> None:
    if options.runs_dir.exists() and not options.runs_dir.is_dir():
        raise ChaeError(f"--runs-dir {options.runs_dir}: is a file, not a folder; point it at a folder "
                        "(it holds caches, checkpoints and the ledger)")


def start_study(study: Study, options: RunOptions) -> StudySession:
    """Everything that can fail before training: another study file under this name (refused,
    nothing written), servers reachable, data present and cached; then this version of the study
    recorded (saying what changed since the last run) and its cells queued."""
    known = admit(study, options)
    data = LoadedData(options.runs_dir, options.bars)
    for key in sorted({(v.config.data, v.config.model.resolution) for v in study.variants}, key=str):
        data.get(*key)  # builds each resolution's decode-once cache before any worker starts
    for v in study.variants:  # a builder that fails fails here, naming the variant, not in every cell
        builders.check_builds(v.config.model, len(data.get(v.config.data, v.config.model.resolution).classes), v.name)
    if options.fresh:
        forget(study.name, options)
        known = [], []
    return _join(study, options, known, data)


def admit(study: Study, options: RunOptions) -> tuple[list[Version], list[Version]]:
    """Check what can be checked without writing anything: the runs folder, the tracking server, and
    that no other study file uses this name here. Returns the versions the ledger and MLflow hold."""
    check_runs_dir(options)
    tracking.check_tracking_server()
    plan = study.plan()
    known = recorded(study.name, options)
    for store, where in zip(known, stores(options)):
        versions.refuse_other_file(plan, store, where)
    return known


def recorded(study_name: str, options: RunOptions) -> tuple[list[Version], list[Version]]:
    """The versions of a study its ledger and its MLflow record keep (creating nothing)."""
    return ([Version.from_json(v) for v in recorded_versions(study_name, options.storage_url)],
            tracking.recorded_versions(study_name))


def stores(options: RunOptions) -> tuple[str, str]:
    """The ledger and the MLflow store, as messages name them."""
    return f"the ledger {masked(options.storage_url)}", f"the MLflow store {tracking.tracking_uri()}"


def _join(study: Study, options: RunOptions, known: tuple[list[Version], list[Version]],
          data: LoadedData | None = None) -> StudySession:
    """Open the study's ledger and MLflow record, record this version, queue the cells it needs."""
    plan = study.plan()
    session = open_session(study, options, data)
    session.log.record_plan(plan)
    _record_version(session, plan, *known)
    session.ledger.queue(needed_cells(study, session.ledger))  # failed cells of earlier runs retried
    return session


def _record_version(session: StudySession, plan: Plan, in_ledger: list[Version], in_mlflow: list[Version]) -> None:
    """Record this plan as a version of the study in each store that lacks it; on its first run,
    say what changed since the last one."""
    known = versions.merged(in_ledger, in_mlflow)
    version = next((v for v in known if v.fingerprint == plan.fingerprint), None)
    if version is None:
        version, previous = versions.first_run(plan, known, session.ledger.records()), versions.latest(known, plan)
        if previous is not None:
            changed = versions.changes(previous.plan, plan) if previous.plan is not None else []
            planned = {c.cell_hash for c in plan.cells}
            cells = ("" if previous.plan is not None and {c.cell_hash for c in previous.plan.cells} <= planned else
                     " Cells of earlier versions are kept and listed in the report, never counted.")
            notify(f"study {plan.study} changed since the version first run {previous.recorded_at}: "
                   f"{'; '.join(changed) or 'no plan of that run was kept'}.{cells}")
        if version.analysis_changed:
            notify(f"study {plan.study}: {', '.join(version.analysis_changed)} set after {version.results_seen} result(s) were "
                   "seen; the report says so beside the verdicts (their error guarantee assumes settings fixed "
                   "in advance).")
    if not any(v.fingerprint == plan.fingerprint for v in in_mlflow):
        session.log.record_version(version)
    if not any(v.fingerprint == plan.fingerprint for v in in_ledger):
        session.ledger.record_version(plan.fingerprint, version.to_json(with_plan=False))


def notify(message: str) -> None:
    """A line for the person running the command (stderr: stdout carries results)."""
    print(message, file=sys.stderr, flush=True)


def needed_cells(study: Study, ledger: Ledger) -> tuple[PlannedCell, ...]:
    """The cells the study needs now: all of a fixed study; for an adaptive one, the rounds its
    looks have reached (analysis.outcome replays them from the ledger's records)."""
    return outcome(study.plan(), ledger.records()).needed


def study_status(study: Study, options: RunOptions) -> Outcome:
    """Where each cell the study needs now stands in the ledger, who holds the running ones, and
    which cells of other versions the ledger keeps; changes nothing (a dead worker's cell shows
    running until a worker re-queues it)."""
    if not study_exists(study.name, options.storage_url):
        raise ChaeError(f"study {study.name}: not in the ledger {masked(options.storage_url)}; "
                        "start it first, or pass the --storage (and --runs-dir) it runs with")
    ledger = Ledger(study.name, options.storage_url, reading=True)
    return outcome(study.plan(), ledger.records())


def forget(study_name: str, options: RunOptions) -> None:
    """Forget a study's ledger, checkpoints and MLflow runs (--fresh)."""
    delete_study(study_name, options.storage_url)
    shutil.rmtree(inside(options.runs_dir, "checkpoints", study_name), ignore_errors=True)
    tracking.delete_study_runs(study_name)


def run_study(study: Study, options: RunOptions, report: bool = True) -> RunSummary:
    """Train every unfinished cell of the study, then write its report (unless report=False)."""
    device = pick_device(options.device)
    session = start_study(study, options)
    try:
        if options.workers <= 1:
            set_threads(options, 1)
            with StudyProgress(session.ledger, study, options.progress) as bar:
                Worker(study, options, device, session).run(on_cell_done=bar.cell_done)
        else:
            _run_children(study, options, session.ledger)
    except BaseException:
        session.log.finish(ok=False)  # never leave the study's parent run RUNNING
        raise
    session.log.finish()
    standing = outcome(study.plan(), session.ledger.records())
    summary = RunSummary(study.name, list(standing.records.values()), link=tracking.experiment_link(study.name))
    others_training = any(c.state in (CellState.QUEUED, CellState.RUNNING) for c in summary.cells)
    if report and not (others_training and not options.linger):  # the last to finish writes it, whole
        from .report import summary_table_text, write_report  # scipy, seaborn: only where a report is written
        summary.report = write_report(study.name, plan=study.plan())
        summary.verdicts = summary_table_text(summary.report.parent)
    return summary


def _run_children(study: Study, options: RunOptions, ledger: Ledger) -> None:
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_child_main, args=(study, options, i), daemon=False)
                for i in range(options.workers)]
    for child in children:
        child.start()
    with StudyProgress(ledger, study, options.progress) as bar:
        while any(child.is_alive() for child in children):
            time.sleep(2)
            bar.refresh()
    failed = [c.exitcode for c in children if c.exitcode]
    if failed:
        raise ChaeError(f"{len(failed)} worker process(es) exited with an error; rerun to resume")


def child_device(options: RunOptions, index: int) -> torch.device:
    """Worker process `index`'s device: GPU index mod the GPUs visible, when there are several."""
    device = pick_device(options.device)
    if device.type == "cuda" and options.device in ("auto", "cuda") and torch.cuda.device_count() > 1:
        device = torch.device(f"cuda:{index % torch.cuda.device_count()}")
    return device


def _child_main(study: Study, options: RunOptions, index: int) -> None:
    device = child_device(options, index)
    set_threads(options, options.workers)
    options = replace(options, progress=False)
    Worker(study, options, device, open_session(study, options)).run()


def run_worker(study: Study, options: RunOptions) -> int:
    """Join a study (another process or machine) and train cells until none are left.

    It queues missing cells too, so machines may start in any order; a cell queued twice by a
    race runs once (Ledger.is_duplicate)."""
    known = admit(study, options)
    set_threads(options, 1)
    session = _join(study, options, known)
    with StudyProgress(session.ledger, study, options.progress) as bar:
        return Worker(study, options, pick_device(options.device), session).run(on_cell_done=bar.cell_done)


def set_threads(options: RunOptions, workers: int) -> None:
    """--threads, else OMP_NUM_THREADS (as torch reads it: per process), else the usable cores shared."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(options.threads or (int(omp) if omp.isdigit() else 0) or max(1, usable_cores() // workers))


def usable_cores() -> int:
    """The cores this process may run on (taskset and SLURM's task affinity narrow them), where
    os.cpu_count() counts the machine's: more torch threads than cores wait on each other."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class StudyProgress:
    """cells done / total, failures, ETA — read from the ledger, so it counts every worker's cells.
    On a terminal a bar; otherwise (a log file, SLURM, CI) one line per finished cell."""

    def __init__(self, ledger: Ledger, study: Study, enabled: bool):
        self.ledger, self.plan = ledger, study.plan()
        self.interactive = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.bar = tqdm(total=1, desc=f"study {study.name}", unit="cell", disable=not self.interactive,
                        dynamic_ncols=True)

    def __enter__(self) -> StudyProgress:
        self.refresh()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.refresh()
        except Exception:  # the ledger is gone: the error that ended the run matters, not the bar
            pass
        self.bar.close()

    def cell_done(self, cell: Cell, result: str) -> None:
        done, failed = self.refresh()
        if self.enabled and not self.interactive:
            notify(f"[{done}/{self.bar.total} done, {failed} failed] {cell.label}: {result}")

    def refresh(self) -> tuple[int, int]:
        """Counts from the ledger over the cells the study needs now, every worker's (an adaptive
        study's total grows as its looks add seeds)."""
        states = [r.state for r in outcome(self.plan, self.ledger.records()).records.values()]
        done, failed = states.count(CellState.DONE), states.count(CellState.FAILED)
        self.bar.total = max(len(states), 1)
        self.bar.n = done
        self.bar.set_postfix(failed=failed, refresh=False)
        self.bar.refresh()
        return done, failed

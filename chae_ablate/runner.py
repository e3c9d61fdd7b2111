"""Running a study: workers and processes over the ledger (ledger.py), recorded in MLflow (tracking.py).

A Worker claims cells from the ledger and trains them one at a time — in this process, in child
processes (`--workers N`) or on other machines (`chae-ablate worker`). Every failure of one cell
fails that cell only (reason in the ledger and in MLflow) and the study goes on; only a lost
server stops a worker, since no other cell could be recorded either.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import tracking
from .analysis import analyse
from .config import DataConfig
from .data import Dataset, load_dataset
from .errors import ChaeError
from .figures import learning_curve
from .files import inside
from .ledger import CellState, Claim, Ledger, lost_ledger, retrying, shown, study_exists
from .study import Cell, Study
from .train import CellFailed, checkpoint_epochs, pick_device, train_cell


@dataclass(frozen=True)
class RunOptions:
    storage: str | None = None  # Optuna RDB URL; default sqlite under runs_dir
    workers: int = 1  # cells trained at once on this machine
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    runs_dir: Path = Path("runs")  # caches, checkpoints, the default ledger, MLflow artifacts
    fresh: bool = False  # forget earlier results of this study and start over
    progress: bool = True  # progress bars (one line per finished cell when not a terminal)
    compile: bool = False  # torch.compile the model
    threads: int | None = None  # torch CPU threads per worker (default: cores / workers)
    heartbeat_s: int = 5  # how often a running cell proves its worker alive
    grace_s: int = 15  # silence after which a running cell is failed and re-queued

    @property
    def bars(self) -> bool:
        """Progress bars only on a terminal: a log file gets one line per finished cell instead."""
        return self.progress and sys.stderr.isatty()

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.runs_dir / 'optuna.db').resolve()}"


@dataclass
class RunSummary:
    """What `run` did: one row per cell, and the report when one was written."""

    study: str
    cells: list[CellState]
    report: Path | None = None
    verdicts: str = ""  # the report's per-variant table, as text
    link: str | None = None  # the study's runs table in the MLflow UI

    @property
    def unfinished(self) -> list[CellState]:
        return [c for c in self.cells if c.state != "COMPLETE"]


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
    ledger = Ledger(study.name, options.storage_url, options.heartbeat_s, options.grace_s)
    return StudySession(ledger, tracking.StudyLog(study, options.runs_dir),
                        data or LoadedData(options.runs_dir, options.bars))


def checkpoint_dir(options: RunOptions, study: Study, cell: Cell) -> Path:
    return inside(options.runs_dir, "checkpoints", study.name, cell.hash)


class Worker:
    """Claims and trains cells until the study's queue is empty and nothing else is running."""

    def __init__(self, study: Study, options: RunOptions, device: torch.device, session: StudySession):
        self.study, self.options, self.device, self.session = study, options, device, session
        self.cells = {c.hash: c for c in study.cells()}

    def run(self, poll_s: float = 2.0, on_cell_done=lambda cell, outcome: None) -> int:
        """Returns the number of cells this worker trained."""
        ledger, done = self.session.ledger, 0
        while True:
            claim = retrying(ledger.claim)
            if claim is None:
                if retrying(ledger.others_active):
                    time.sleep(poll_s)  # others are running: wait, in case one of them dies
                    continue
                if retrying(ledger.queue, needed_cells(self.study, ledger), retry_failed=False):
                    continue  # an adaptive study's next look needs more seeds
                return done
            cell = self.cells.get(claim.cell_hash)
            if cell is None or ledger.is_duplicate(claim):
                claim.fail("duplicate or unknown cell; skipped")
                continue
            with claim.heartbeat(self.options.heartbeat_s):
                outcome = self.run_cell(cell, claim)
            done += 1
            on_cell_done(cell, outcome)

    def run_cell(self, cell: Cell, claim: Claim) -> str:
        """Train one claimed cell; returns 'COMPLETE' or 'FAIL: reason'. Raises only when a
        server is lost (then no other cell could be recorded either)."""
        try:
            summary = self.train(cell, EpochReporter(claim.report, claim.reported_epochs))
        except CellError as err:
            _best_effort(claim.fail, err.reason)
            return f"FAIL: {err.reason.splitlines()[0][:200] if err.reason else ''}"
        except ChaeError:
            _best_effort(claim.fail, "lost a server; rerun to resume")
            raise
        claim.complete(summary)
        return "COMPLETE"

    def train(self, cell: Cell, reporter: EpochReporter) -> dict[str, float]:
        """Train a cell with its MLflow run, checkpoints and system metrics; returns its summary
        metrics. A failure is recorded on the run and raised as CellError (ChaeError when a server
        was lost); CellPruned when the reporter's pruner stops it."""
        checkpoints = checkpoint_dir(self.options, self.study, cell)
        run = self.session.log.cell_run(cell, str(self.device), checkpoint_epochs(checkpoints))
        reporter.run = run
        try:
            data = self.session.data.get(cell.config.data, cell.config.model.resolution)
            run.log_cell_inputs(cell, data)
            with run.system_metrics():
                result = train_cell(config=cell.config, seed=cell.seed, data=data, device=self.device,
                                    checkpoint_dir=checkpoints, tracker=reporter, progress=self.options.bars,
                                    label=cell.label, compile_model=self.options.compile)
            run.log_artifact(learning_curve(result.history, cell.label, checkpoints / "learning_curve.png"))
            run.finish(result.summary(), resumed_from=result.resumed_from)
            return result.summary()
        except CellPruned as pruned:
            _best_effort(run.prune, pruned.epoch)
            raise
        except Exception as err:
            lost = lost_ledger(err) or tracking.lost_server(err)
            reason = lost or (str(err) if isinstance(err, CellFailed) else f"{type(err).__name__}: {err}")
            _best_effort(run.fail, reason)  # the server may be what was lost: a RUNNING run is failed later
            if lost:
                raise ChaeError(f"cell {cell.label}: {lost}; its checkpoint is kept, rerun to resume") from None
            raise CellError(reason) from None


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


def _best_effort(record, *args) -> None:
    """Record on one side even when the other side's server was lost (a stale trial is re-queued,
    a RUNNING MLflow run is failed by the cell's next attempt)."""
    try:
        record(*args)
    except Exception:
        pass


class EpochReporter:
    """Sends each epoch to MLflow and its validation loss to the ledger (for pruners): report(epoch,
    loss) returns True when the cell should stop; reported() lists the epochs the ledger has."""

    def __init__(self, report, reported):
        self.report, self.reported, self.run = report, reported, None

    def log_missed_epochs(self, history: list[dict[str, float]]) -> None:
        self.run.log_missed_epochs(history)
        known = self.reported()
        for epoch, metrics in enumerate(history, start=1):
            if epoch not in known:
                self.report(epoch, metrics["val_loss"])

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.run.log_epoch(epoch, metrics)
        if self.report(epoch, metrics["val_loss"]):
            raise CellPruned(epoch)


# --- the commands ----------------------------------------------------------------------------

def check_runs_dir(options: RunOptions) -> None:
    if options.runs_dir.exists() and not options.runs_dir.is_dir():
        raise ChaeError(f"--runs-dir {options.runs_dir}: is a file, not a folder; point it at a folder "
                        "(it holds caches, checkpoints and the ledger)")


def start_study(study: Study, options: RunOptions) -> StudySession:
    """Everything that can fail before training: data present and cached, servers reachable;
    then the study's cells queued."""
    check_runs_dir(options)
    data = LoadedData(options.runs_dir, options.bars)
    for key in sorted({(v.config.data, v.config.model.resolution) for v in study.variants}, key=str):
        data.get(*key)  # builds each resolution's decode-once cache before any worker starts
    tracking.check_tracking_server()
    if options.fresh:
        _forget(study, options)
    session = open_session(study, options, data)
    session.log.record_plan(study)
    session.ledger.queue(needed_cells(study, session.ledger))  # failed cells of earlier runs retried
    return session


def needed_cells(study: Study, ledger: Ledger) -> list[Cell]:
    """The cells the study needs now: all of a fixed study; for an adaptive one, the rounds its
    looks have reached (analysis.analyse replays them from the ledger's finished cells)."""
    cells = {(c.variant.name, c.seed): c for c in study.cells()}
    states = ledger.cell_states(list(cells.values()))
    metric = study.analysis.metric
    values: dict[str, dict[int, float]] = {}
    for c in states:
        if c.state == "COMPLETE" and c.metrics.get(metric) is not None:
            values.setdefault(c.variant, {})[c.seed] = c.metrics[metric]
    settled = {(c.variant, c.seed) for c in states if c.state in ("COMPLETE", "FAIL")}
    outcome = analyse(values, lambda v, s: (v, s) in settled, [v.name for v in study.variants],
                      {v.name: study.seeds(v) for v in study.variants}, study.analysis)
    return [cells[(v, s)] for v, seeds in outcome.seeds.items() for s in seeds]


def study_status(study: Study, options: RunOptions) -> list[CellState]:
    """Where each cell the study needs now stands in the ledger, and who holds the running ones;
    changes nothing (a dead worker's cell shows RUNNING until a worker re-queues it)."""
    if not study_exists(study.name, options.storage_url):
        raise ChaeError(f"study {study.name}: not in the ledger {shown(options.storage_url)}; "
                        "start it first, or pass the --storage (and --runs-dir) it runs with")
    ledger = Ledger(study.name, options.storage_url, options.heartbeat_s, options.grace_s)
    return ledger.cell_states(needed_cells(study, ledger))


def _forget(study: Study, options: RunOptions) -> None:
    import shutil
    Ledger(study.name, options.storage_url, options.heartbeat_s, options.grace_s).delete()
    shutil.rmtree(inside(options.runs_dir, "checkpoints", study.name), ignore_errors=True)
    tracking.delete_study_runs(study.name)


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
        session.log.finish("FAILED")  # never leave the study's parent run RUNNING
        raise
    session.log.finish()
    summary = RunSummary(study.name, session.ledger.cell_states(needed_cells(study, session.ledger)),
                         link=tracking.experiment_link(study.name))
    if report:
        from .report import summary_table_text, write_report
        summary.report = write_report(study.name)
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
    check_runs_dir(options)
    tracking.check_tracking_server()
    set_threads(options, 1)
    session = open_session(study, options)
    session.ledger.queue(needed_cells(study, session.ledger))
    with StudyProgress(session.ledger, study, options.progress) as bar:
        return Worker(study, options, pick_device(options.device), session).run(on_cell_done=bar.cell_done)


def set_threads(options: RunOptions, workers: int) -> None:
    torch.set_num_threads(options.threads or max(1, (os.cpu_count() or 1) // workers))


class StudyProgress:
    """cells done / total, failures, ETA — read from the ledger, so it counts every worker's cells.
    On a terminal a bar; otherwise (a log file, SLURM, CI) one line per finished cell."""

    def __init__(self, ledger: Ledger, study: Study, enabled: bool):
        self.ledger, self.hashes = ledger, {c.hash for c in study.cells()}
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

    def cell_done(self, cell: Cell, outcome: str) -> None:
        done, failed = self.refresh()
        if self.enabled and not self.interactive:
            print(f"[{done}/{self.bar.total} done, {failed} failed] {cell.label}: {outcome}", file=sys.stderr,
                  flush=True)

    def refresh(self) -> tuple[int, int]:
        """Counts from the ledger; an adaptive study's total grows as its looks add seeds."""
        done, failed, queued = self.ledger.progress(self.hashes)
        self.bar.total = max(queued, 1)
        self.bar.n = done
        self.bar.set_postfix(failed=failed, refresh=False)
        self.bar.refresh()
        return done, failed

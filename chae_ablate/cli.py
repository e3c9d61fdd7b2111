"""The `chae-ablate` command: each command parses its arguments and calls one library function.

A ChaeError (bad input, missing data, unreachable server) becomes one red line and exit code 1.
Commands import the library when they run, so `--help` starts without loading torch, Optuna or MLflow.
"""
from __future__ import annotations

import functools
import json
import math
import os
import signal
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import ChaeError, exit_on_signal
from .metrics import RANKING, Metric
from .options import RUN_DEFAULTS, SLURM_DEFAULTS, RunOptions, SlurmOptions
from .records import CellState

app = typer.Typer(help="Reproducible architecture ablation studies of the CHAE classifier.",
                  no_args_is_help=True, pretty_exceptions_enable=False)  # --install-completion: bash, zsh, fish
data_app = typer.Typer(help="Prepare and inspect image datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

StudyArg = Annotated[Path, typer.Argument(help="Study YAML file, e.g. studies/paper11.yaml")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override, e.g. model.transformer.depth=3")]
EpochsOpt = Annotated[Optional[int], typer.Option(help="Override protocol.epochs")]
SeedsOpt = Annotated[Optional[str], typer.Option(help="Override protocol.seeds, e.g. 0,1,2")]
StorageOpt = Annotated[Optional[str], typer.Option(help="Optuna storage URL (default: sqlite under runs/)")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps")]
RunsOpt = Annotated[Path, typer.Option(help="Caches, checkpoints, ledger and MLflow artifacts")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the data as JSON on stdout (messages go to stderr)")]


def clean_errors(command):
    """Turn the domain exception into one red line (plain with NO_COLOR set) and exit code 1."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ChaeError as err:
            line = f"error: {err}"
            typer.echo(line if os.environ.get("NO_COLOR") else typer.style(line, fg=typer.colors.RED), err=True)
            raise typer.Exit(1) from None
    return wrapper


def echo_json(data: dict) -> None:
    """One JSON document on stdout, strict (NaN is null), for `jq` and json.loads."""
    typer.echo(json.dumps(data, indent=2, allow_nan=False, default=str))


AdaptiveOpt = Annotated[bool, typer.Option("--adaptive", help="Add seeds only where verdicts are undecided "
                                            "(analysis.adaptive)")]


def _load(study: Path, set_: list[str] | None, epochs: int | None, seeds: str | None, adaptive: bool = False):
    from .config import short
    from .study import load_study, parse_assignments
    overrides = parse_assignments(set_ or [])
    if adaptive:
        overrides["analysis.adaptive"] = True
    if epochs is not None:
        overrides["protocol.epochs"] = epochs
    if seeds is not None:
        try:
            overrides["protocol.seeds"] = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise ChaeError(f"--seeds {short(seeds)}: expected integers separated by commas, e.g. 0,1,2") from None
    return load_study(study, overrides)


@app.command()
@clean_errors
def plan(study: StudyArg, set_: SetOpt = None, epochs: EpochsOpt = None, seeds: SeedsOpt = None,
         spread_from: Annotated[Optional[str], typer.Option(
             help="An earlier study's name in MLflow: say how many seeds each variant would likely need at its spread")]
         = None, as_json: JsonOpt = False) -> None:
    """Show every variant's shape and cost (params, MFLOPs, training memory, tokens) without training."""
    from .plan import format_plan, seeds_from_earlier, study_plan
    loaded = _load(study, set_, epochs, seeds)
    planned = study_plan(loaded)
    earlier = seeds_from_earlier(loaded, spread_from) if spread_from else None
    if as_json:
        echo_json({**planned.to_json(), "spread_from": earlier.to_json() if earlier else None})
        return
    typer.echo(format_plan(planned.table))
    typer.echo(planned.footer)
    if earlier:
        typer.echo("\n".join(earlier.lines()))


ThreadsOpt = Annotated[Optional[int], typer.Option(min=1, help="torch CPU threads per worker (default: OMP_NUM_THREADS, else usable cores / workers)")]
HeartbeatOpt = Annotated[Optional[int], typer.Option(
    min=1, help="Seconds between a running cell's heartbeats, for a new study (default: 5; 20 on a journal)")]
GraceOpt = Annotated[Optional[int], typer.Option(
    min=3, help="Seconds a worker watches a cell's heartbeat stand still before it re-queues the cell, for a new "
    "study (default: 15; 60 on a journal; at least 3 x --heartbeat)")]
RetriesOpt = Annotated[Optional[int], typer.Option(
    min=0, help="Times a cell whose worker died is re-queued before it fails, for a new study (default: 3)")]
FreshOpt = Annotated[bool, typer.Option(help="Forget earlier results of this study and start over")]
CompileOpt = Annotated[bool, typer.Option(help="torch.compile the model")]
ProgressOpt = Annotated[bool, typer.Option(help="Progress bars (one line per cell when not a terminal)")]


@app.command()
@clean_errors
def run(study: StudyArg, set_: SetOpt = None, epochs: EpochsOpt = None, seeds: SeedsOpt = None,
        adaptive: AdaptiveOpt = False, storage: StorageOpt = None,
        workers: Annotated[int, typer.Option(min=1, help="Cells trained at once on this machine")
                           ] = RUN_DEFAULTS.workers,
        device: DeviceOpt = RUN_DEFAULTS.device, runs_dir: RunsOpt = RUN_DEFAULTS.runs_dir,
        fresh: FreshOpt = RUN_DEFAULTS.fresh, compile: CompileOpt = RUN_DEFAULTS.compile,
        report: Annotated[bool, typer.Option(help="Write the report at the end")] = True,
        progress: ProgressOpt = RUN_DEFAULTS.progress, threads: ThreadsOpt = RUN_DEFAULTS.threads,
        heartbeat: HeartbeatOpt = RUN_DEFAULTS.heartbeat_s, grace: GraceOpt = RUN_DEFAULTS.grace_s,
        retries: RetriesOpt = RUN_DEFAULTS.retries) -> None:
    """Train every cell (variant x seed) of a study; a rerun resumes where it stopped."""
    from .runner import run_study
    options = RunOptions(storage=storage, workers=workers, device=device, runs_dir=runs_dir, fresh=fresh,
                         progress=progress, compile=compile, threads=threads, heartbeat_s=heartbeat,
                         grace_s=grace, retries=retries)
    summary = run_study(_load(study, set_, epochs, seeds, adaptive), options, report=report)
    typer.echo(summary.verdicts or _cells_text(summary.cells))
    if summary.report:
        typer.echo(f"report: {summary.report}")
    if summary.link:
        typer.echo(f"mlflow: {summary.link}  (run `mlflow ui` here first for a local store)")
    for c in summary.unfinished:
        typer.echo(f"not finished: {c.label} {c.state} {c.failure_reason}")
    if summary.unfinished:
        raise ChaeError(f"{len(summary.unfinished)} of {len(summary.cells)} cells did not finish; rerun the same "
                        "command to retry (a cell whose worker kept dying: with a higher --retries)")


def _diverged(cell) -> str:
    """'diverged (epoch 2)' for a cell whose loss turned non-finite before any finite best, else ''."""
    epoch = cell.metrics.get(Metric.DIVERGED_EPOCH)
    best = cell.metrics.get(RANKING, math.nan)
    return f"diverged (epoch {epoch:.0f})" if epoch is not None and not math.isfinite(best) else ""


def _cells_text(cells, worker: bool = False) -> str:
    """Per cell record: variant, seed, state, best validation loss, test accuracy (and who holds it)."""
    def num(v, spec):
        return "" if v is None or v != v else format(v, spec)
    rows = [("variant", "seed", "state", RANKING, Metric.TEST_ACC) + (("worker",) if worker else ())]
    rows += [(c.variant, str(c.seed), c.state, _diverged(c) or num(c.metrics.get(RANKING), ".4f"),
              num(c.metrics.get(Metric.TEST_ACC), ".3f"))
             + ((c.worker if c.state == CellState.RUNNING else "",) if worker else ()) for c in cells]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


@app.command()
@clean_errors
def worker(study: StudyArg, storage: StorageOpt = None, set_: SetOpt = None, epochs: EpochsOpt = None,
           seeds: SeedsOpt = None, adaptive: AdaptiveOpt = False, device: DeviceOpt = RUN_DEFAULTS.device,
           runs_dir: RunsOpt = RUN_DEFAULTS.runs_dir, compile: CompileOpt = RUN_DEFAULTS.compile,
           progress: ProgressOpt = RUN_DEFAULTS.progress, threads: ThreadsOpt = RUN_DEFAULTS.threads,
           heartbeat: HeartbeatOpt = RUN_DEFAULTS.heartbeat_s, grace: GraceOpt = RUN_DEFAULTS.grace_s,
           retries: RetriesOpt = RUN_DEFAULTS.retries,
           join_search: Annotated[bool, typer.Option("--search", help="Join the study's search instead")] = False,
           trials: Annotated[Optional[int], typer.Option(
               min=1, help="With --search: the budget the search was started with (its --trials)")] = None,
           ) -> None:
    """Join a running study or search (shared --storage) and train cells until none are left."""
    from .runner import run_worker
    options = RunOptions(storage=storage, device=device, runs_dir=runs_dir, progress=progress, compile=compile,
                         threads=threads, heartbeat_s=heartbeat, grace_s=grace, retries=retries)
    loaded = _load(study, set_, epochs, seeds, adaptive)
    if trials is not None and not join_search:
        raise ChaeError("worker --trials: only with --search (a study has no trial budget)")
    if join_search:
        from .search import run_search
        summary = run_search(loaded, options, trials, report=False, joining=True)
        typer.echo(f"worker finished: the search has {len(summary.trials)} trial(s)")
        return
    done = run_worker(loaded, options)
    typer.echo(f"worker finished: trained {done} cell(s)")


@app.command()
@clean_errors
def search(study: StudyArg, trials: Annotated[Optional[int], typer.Option(min=1, help="Override search.trials")] = None,
           set_: SetOpt = None, epochs: EpochsOpt = None, storage: StorageOpt = None,
           workers: Annotated[int, typer.Option(min=1, help="Trials trained at once on this machine")
                              ] = RUN_DEFAULTS.workers,
           device: DeviceOpt = RUN_DEFAULTS.device, runs_dir: RunsOpt = RUN_DEFAULTS.runs_dir,
           fresh: Annotated[bool, typer.Option(help="Forget this search's trials, baseline and confirmation "
                                                    "and start over")] = RUN_DEFAULTS.fresh,
           compile: CompileOpt = RUN_DEFAULTS.compile, progress: ProgressOpt = RUN_DEFAULTS.progress,
           threads: ThreadsOpt = RUN_DEFAULTS.threads, heartbeat: HeartbeatOpt = RUN_DEFAULTS.heartbeat_s,
           grace: GraceOpt = RUN_DEFAULTS.grace_s, retries: RetriesOpt = RUN_DEFAULTS.retries) -> None:
    """Search the study's knobs (its search: section), then re-test the best on fresh seeds."""
    from .search import run_search
    options = RunOptions(storage=storage, workers=workers, device=device, runs_dir=runs_dir, fresh=fresh,
                         progress=progress, compile=compile, threads=threads, heartbeat_s=heartbeat, grace_s=grace,
                         retries=retries)
    try:
        summary = run_search(_load(study, set_, epochs, None), options, trials)
    except KeyboardInterrupt:  # run_search said what it stopped and left; SIGTERM exits 143 as SystemExit
        raise typer.Exit(130) from None
    confirm = summary.confirmation
    if confirm is None:
        typer.echo("no configuration to confirm: no trial finished, or the best was the baseline itself")
    else:
        typer.echo(confirm.verdicts)
        typer.echo(f"confirmation report: {confirm.report}")
    typer.echo(f"search report: {summary.report}")


@app.command()
@clean_errors
def status(study: StudyArg, storage: StorageOpt = None, set_: SetOpt = None, epochs: EpochsOpt = None,
           seeds: SeedsOpt = None, adaptive: AdaptiveOpt = False, runs_dir: RunsOpt = RUN_DEFAULTS.runs_dir,
           as_json: JsonOpt = False) -> None:
    """Cells done / running / queued / failed, and which worker holds each running cell."""
    from .api import ledger_status
    standing = ledger_status(_load(study, set_, epochs, seeds, adaptive), RunOptions(storage=storage, runs_dir=runs_dir))
    if as_json:
        echo_json(standing.to_json())
        return
    typer.echo(_cells_text(list(standing.standing.records.values()), worker=True))
    count = standing.counts
    typer.echo(f"{count[CellState.DONE]} done, {count[CellState.RUNNING]} running, {count[CellState.QUEUED]} queued, "
               f"{count[CellState.FAILED]} failed, {count[CellState.MISSING]} not queued yet, of {len(standing.cells)} "
               "cells")
    for text in standing.undecided["text"]:
        typer.echo(f"undecided: {text}")
    if kept := standing.kept_apart:
        typer.echo(f"kept apart: {sum(kept.values())} cells of other versions of this study "
                   f"({', '.join(f'{n} {state}' for state, n in kept.items())}), not counted")


@app.command()
@clean_errors
def submit(study: StudyArg,
           slurm: Annotated[bool, typer.Option("--slurm", help="Submit to SLURM (the one scheduler supported)")] = False,
           array: Annotated[int, typer.Option(min=1, help="Tasks (workers) in the job array")] = SLURM_DEFAULTS.array,
           partition: Annotated[Optional[str], typer.Option(help="sbatch --partition")] = SLURM_DEFAULTS.partition,
           gpus_per_task: Annotated[int, typer.Option(min=0, help="sbatch --gpus-per-task (0: CPU tasks)")
                                    ] = SLURM_DEFAULTS.gpus_per_task,
           cpus_per_task: Annotated[int, typer.Option(min=1, help="sbatch --cpus-per-task; the worker's torch threads")
                                    ] = SLURM_DEFAULTS.cpus_per_task,
           time: Annotated[str, typer.Option(help="sbatch --time per task (requeued on timeout), e.g. 4:00:00")
                           ] = SLURM_DEFAULTS.time,
           account: Annotated[Optional[str], typer.Option(help="sbatch --account")] = SLURM_DEFAULTS.account,
           mem_gb: Annotated[Optional[int], typer.Option(min=1, help="sbatch --mem, in GB")] = SLURM_DEFAULTS.mem_gb,
           setup: Annotated[Optional[list[str]], typer.Option(help="Shell line run before each task, "
                                                                    "e.g. 'module load cuda'")] = None,
           join_search: Annotated[bool, typer.Option("--search", help="Submit the study's search instead")] = False,
           storage: Annotated[Optional[str], typer.Option(help="Ledger shared by the tasks (default: "
                                                          "journal:RUNS_DIR/ledger.journal)")] = None,
           set_: SetOpt = None, epochs: EpochsOpt = None, seeds: SeedsOpt = None, adaptive: AdaptiveOpt = False,
           runs_dir: Annotated[Path, typer.Option(help="Shared by every node: checkpoints, ledger, logs")
                               ] = RUN_DEFAULTS.runs_dir,
           compile: CompileOpt = RUN_DEFAULTS.compile, heartbeat: HeartbeatOpt = RUN_DEFAULTS.heartbeat_s,
           grace: GraceOpt = RUN_DEFAULTS.grace_s, retries: RetriesOpt = RUN_DEFAULTS.retries,
           local_tracking: Annotated[bool, typer.Option(
               help="Let the tasks write to a local MLflow store (sqlite) in spite of the risk; without a tracking "
                    "server that is refused for arrays of more than one task")] = SLURM_DEFAULTS.local_tracking,
           ) -> None:
    """Train a study (or its search) on a SLURM job array of workers sharing one ledger."""
    from .cluster import submit as submit_array
    if not slurm:
        raise ChaeError("submit: say where, e.g. --slurm (the one scheduler supported)")
    loaded = _load(study, set_, epochs, seeds, adaptive)
    options = RunOptions(storage=storage, runs_dir=runs_dir, compile=compile, heartbeat_s=heartbeat, grace_s=grace,
                         retries=retries)
    job = submit_array(loaded, options, SlurmOptions(array=array, partition=partition, gpus_per_task=gpus_per_task,
                                                     cpus_per_task=cpus_per_task, time=time, account=account,
                                                     mem_gb=mem_gb, setup=tuple(setup or ()),
                                                     local_tracking=local_tracking), join_search)
    typer.echo(f"submitted job array {job.job_id} ({job.tasks} tasks, {job.job_id}_0 .. {job.job_id}_{job.tasks - 1})")
    typer.echo(f"watch:  squeue -j {job.job_id}   and   chae-ablate status {study} --storage {job.storage}")
    typer.echo(f"logs:   {job.logs}/{job.job_id}_*/   stop: scancel {job.job_id}")


@app.command()
@clean_errors
def report(study: Annotated[str, typer.Argument(help="Study name or YAML file")],
           out: Annotated[Optional[Path], typer.Option(help="Output folder (default reports/<study>)")] = None,
           as_json: JsonOpt = False) -> None:
    """Build the comparison report of a study from its MLflow runs (a YAML file: of that version of it)."""
    from .report import read_summary, write_report
    from .study import check_name
    from .tracking import experiment_link
    if study.endswith((".yaml", ".yml")):
        loaded = _load(Path(study), None, None, None)
        name, plan = loaded.name, loaded.plan()
    else:
        name, plan = check_name(study), None
    md, link = write_report(name, out, plan), experiment_link(name)
    if as_json:
        from .render import json_rows
        echo_json({"study": name, "report": str(md), "html": str(md.with_suffix(".html")), "mlflow": link,
                   "variants": json_rows(read_summary(md.parent))})
        return
    typer.echo(f"report: {md}")
    typer.echo(f"mlflow: {link}  (run `mlflow ui` here first for a local store)")


@data_app.command("prepare")
@clean_errors
def data_prepare(kind: Annotated[str, typer.Argument(help="Dataset kind: best-artworks")],
                 source: Annotated[Path, typer.Argument(help="The Kaggle archive (zip) or its extracted folder")],
                 out: Annotated[Path, typer.Option(help="Where to write the class-per-folder tree")] = Path("data/artworks"),
                 min_paintings: Annotated[int, typer.Option(help="Keep artists with more paintings than this")] = 200) -> None:
    """Turn a downloaded dataset archive into a class-per-folder tree."""
    from .prepare import prepare_best_artworks
    if kind != "best-artworks":
        raise ChaeError(f"data prepare {kind}: unknown kind; the one supported is best-artworks")
    result = prepare_best_artworks(source, out, min_paintings)
    typer.echo(str(result))


@data_app.command("check")
@clean_errors
def data_check(root: Annotated[Path, typer.Argument(help="A class-per-folder image directory")]) -> None:
    """Count images per class, sizes, modes and unreadable files."""
    from .prepare import check_dataset
    checked = check_dataset(root)
    typer.echo(checked.format())
    if checked.problems:
        raise ChaeError(f"{root}: {len(checked.problems)} problem(s) would stop a study from using it (listed above)")


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """The project's own warnings (a checkpoint moved aside, a journal repaired) as one line."""
    if category.__module__.startswith("chae_ablate."):
        return f"warning: {message}\n"
    return _python_warning(message, category, filename, lineno, line)


_python_warning = warnings.formatwarning


def main() -> None:
    # SIGTERM (kill, a scheduler ending a job) stops like Ctrl-C: a held cell goes back to the queue
    signal.signal(signal.SIGTERM, exit_on_signal)
    warnings.formatwarning = _warning_line
    app()

"""SLURM: a study's workers as one job array, through submitit (the only module that imports it).

Every array task does what `chae-ablate run` does (or `search`; task 0 leads a search, the others
join it): it queues what is missing, claims cells from the shared ledger until none is left, and
each task that finishes writes the report from MLflow; a task with nothing left to claim exits
rather than hold its GPU while others train. SLURM sends SIGUSR2 ahead of a time limit or a
preemption (SIGTERM on clusters without preempt_send_user_signal, handled the same); submitit then
requeues the task (ArrayTask is checkpointable) and exits, and the worker hands the cell it held
back to the queue, where the next free task resumes it from its epoch checkpoint in the shared
runs folder, continuing its MLflow run. A task killed outright (a node lost, host OOM) stops its
heartbeats: a task still running re-queues its cell after the grace period (ledger/claims.py), or
a resubmission does.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from . import tracking
from .errors import ChaeError
from .files import inside
from .ledger import journal_file, storage_url
from .options import RunOptions, SlurmOptions
from .records import CellState
from .runner import run_study, start_study
from .search import baseline_study, run_search
from .study import Study

SIGNAL_DELAY_S = 120  # SIGUSR2 this long before the time limit: time to finish an epoch's checkpoint
MAX_TIMEOUTS = 50  # requeues after a time limit per task (submitit's default, 3, ends long studies early)


@dataclass
class Submission:
    """What `submit` queued: the array's job id, its task count, and where submitit logs."""

    job_id: str
    tasks: int
    logs: Path
    storage: str


def minutes(time: str) -> int:
    """sbatch --time (MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in minutes, seconds rounded
    up as SLURM does, at least 1."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", time.strip())
    if match is None:
        raise ChaeError(f"--time {time}: expected MINUTES, HH:MM:SS or D-HH:MM:SS, e.g. 4:00:00")
    days, a, b, c = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        total = days * 1440 + a * 60 + (b or 0) + (c or 0) / 60
    elif c is not None:  # HH:MM:SS
        total = a * 60 + b + c / 60
    elif b is not None:  # MM:SS
        total = a + b / 60
    else:
        total = a
    return max(1, math.ceil(total))


class ArrayTask:
    """One array task: a whole worker over the shared ledger, then the report. submitit calls it
    with the task's index and, on SIGUSR2, its checkpoint() to requeue it."""

    def __init__(self, study: Study, options: RunOptions, tracking_uri: str, search: bool):
        self.study, self.options, self.tracking_uri, self.search = study, options, tracking_uri, search

    def __call__(self, index: int) -> str:
        os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri  # the submitter's store, from any node
        preempt_on_sigterm()
        if self.search:
            # task 0 waits for every trial and runs the confirmation; the others leave when idle
            summary = run_search(self.study, replace(self.options, linger=index == 0), report=index == 0,
                                 joining=index > 0)
            return f"search task {index}: the search has {len(summary.trials)} trial(s)"
        result = run_study(self.study, self.options, report=True)
        failed = [c for c in result.cells if c.state == CellState.FAILED]
        if failed:
            raise ChaeError(f"{len(failed)} of {len(result.cells)} cells failed; see the report; resubmit to retry")
        left = len(result.unfinished)
        return (f"task {index}: {len(result.cells) - left} of {len(result.cells)} cells done"
                + (f", {left} still with other tasks" if left else "")
                + (f"; report {result.report}" if result.report else "; the last task to finish writes the report"))

    def checkpoint(self, index: int):
        """Requeue this task as it was: the cell it held resumes from its epoch checkpoint."""
        import submitit
        return submitit.helpers.DelayedSubmission(self, index)


def preempt_on_sigterm() -> None:
    """SIGTERM as SLURM's preemption signal where the cluster sends no SIGUSR2 first
    (preempt_send_user_signal unset): submitit's own handler, which requeues the task and exits,
    and the worker hands its cell back (submitit would ignore SIGTERM and die at SIGKILL). Once:
    SLURM sends SIGTERM again as it requeues the task, and a second requeue fails. A requeue that
    fails (the job was cancelled) ends the task too, rather than failing the cell it trains."""
    handler = signal.getsignal(signal.SIGUSR2)
    if not callable(handler) or getattr(handler, "preempts_once", False):
        return

    def once(signum, frame) -> None:
        for ignored in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(ignored, signal.SIG_IGN)
        try:
            handler(signum, frame)
        except Exception as err:
            raise SystemExit(f"{signal.Signals(signum).name}: the task could not be requeued ({err})") from None
    once.preempts_once = True
    signal.signal(signal.SIGUSR2, once)
    signal.signal(signal.SIGTERM, once)


def refuse_local_tracking(slurm: SlurmOptions) -> None:
    """A local MLflow store (a sqlite file on the shared filesystem) cannot take writes from many
    nodes at once: sqlite's locks do not hold over NFS, and its busy timeout fails cells."""
    uri = tracking.tracking_uri()
    if slurm.array <= 1 or uri.startswith(("http://", "https://")):
        return
    fix = ("start a tracking server on a machine every node reaches, e.g. `mlflow server --backend-store-uri "
           f"{uri} --host 0.0.0.0 --port 5000` on the login node, then `export MLFLOW_TRACKING_URI=http://LOGIN:5000` "
           "and submit again")
    if not slurm.local_tracking:
        raise ChaeError(f"submit --array {slurm.array}: the MLflow store {uri} is a local file that many nodes "
                        f"would write at once; {fix} (or pass --local-tracking to accept the risk)")
    print(f"warning: {slurm.array} tasks will write the local MLflow store {uri} at once (--local-tracking); "
          f"busy moments are retried for {tracking.patience_s():g} s; safer: {fix}", file=sys.stderr)


def shared_options(options: RunOptions, slurm: SlurmOptions) -> RunOptions:
    """The run options every task gets: absolute paths (tasks may start in another folder), the
    ledger (a journal file in the runs folder unless --storage names a server), one worker per
    task with the task's CPUs as torch threads."""
    runs_dir = options.runs_dir.resolve()
    storage = options.storage or f"journal:{runs_dir / 'ledger.journal'}"
    journal = journal_file(storage)
    if journal is not None:
        storage = f"journal:{journal}"
    elif storage_url(storage).get_backend_name() == "sqlite":
        raise ChaeError(f"--storage {storage}: sqlite cannot be shared safely by many nodes; leave --storage "
                        "out (a journal file in the shared runs folder) or give postgresql://USER:PASS@HOST/DB")
    return replace(options, runs_dir=runs_dir, storage=storage, workers=1, threads=slurm.cpus_per_task, linger=False)


def submit(study: Study, options: RunOptions, slurm: SlurmOptions, search: bool = False) -> Submission:
    """Check and queue the study here (data present, servers reachable, cells queued), then submit
    its workers as one SLURM job array."""
    refuse_local_tracking(slurm)
    if importlib.util.find_spec("submitit") is None:
        raise ChaeError("submit --slurm needs submitit: pip install 'chae-ablate[slurm]'")
    if shutil.which("sbatch") is None:
        raise ChaeError("submit --slurm: sbatch is not on PATH; run this on the cluster's login node "
                        "(or start `chae-ablate worker` on each machine)")
    if search and study.search is None:
        raise ChaeError(f"{study.source or study.name}: has no search: section; submit it without --search")
    options = shared_options(options, slurm)
    timeout = minutes(slurm.time)
    if search:
        start_study(baseline_study(study), options)
    else:
        start_study(study, options)

    import submitit
    logs = inside(options.runs_dir, "slurm", study.name)
    executor = submitit.AutoExecutor(folder=logs / "%j", cluster="slurm", slurm_max_num_timeout=MAX_TIMEOUTS)
    parameters = {"name": f"chae-{study.name}", "timeout_min": timeout, "nodes": 1, "tasks_per_node": 1,
                  "cpus_per_task": slurm.cpus_per_task, "slurm_array_parallelism": slurm.array,
                  "slurm_signal_delay_s": min(SIGNAL_DELAY_S, timeout * 30),
                  "slurm_setup": list(slurm.setup)}
    if slurm.partition:
        parameters["slurm_partition"] = slurm.partition
    if slurm.account:
        parameters["slurm_account"] = slurm.account
    if slurm.gpus_per_task:
        parameters["slurm_gpus_per_task"] = slurm.gpus_per_task
    if slurm.mem_gb:
        parameters["mem_gb"] = slurm.mem_gb
    executor.update_parameters(**parameters)
    task = ArrayTask(study, options, tracking.tracking_uri(), search)
    try:
        jobs = executor.map_array(task, range(slurm.array))
    except Exception as err:  # sbatch's refusal (bad partition, account, limits): its own words
        lines = str(err).strip().splitlines()
        reason = lines[-1][:300] if lines else type(err).__name__
        hint = "; for CPU tasks pass --gpus-per-task 0" if "gres" in reason.lower() and slurm.gpus_per_task else ""
        raise ChaeError(f"sbatch refused the job array: {reason}{hint}") from None
    return Submission(jobs[0].job_id.split("_")[0], len(jobs), logs, options.storage)

"""What a command may set, with its default, defined once: how a study runs (storage, workers,
device, claim settings) and how a SLURM job array is shaped. Light on purpose: the CLI builds its
options from these defaults without importing torch, Optuna or MLflow."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunOptions:
    storage: str | None = None  # Optuna storage URL or journal:PATH; default sqlite under runs_dir
    workers: int = 1  # cells trained at once on this machine
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    runs_dir: Path = Path("runs")  # caches, checkpoints, the default ledger, MLflow artifacts
    fresh: bool = False  # forget earlier results of this study and start over
    progress: bool = True  # progress bars (one line per finished cell when not a terminal)
    compile: bool = False  # torch.compile the model
    threads: int | None = None  # torch CPU threads per worker (default: OMP_NUM_THREADS, else usable cores / workers)
    # claim settings of a new study (None: ledger.DEFAULTS for its storage); a study keeps its own
    heartbeat_s: int | None = None  # how often a worker holding a cell proves itself alive
    grace_s: int | None = None  # how long a held cell's heartbeat is watched standing still before it is re-queued
    retries: int | None = None  # times a cell whose worker died is re-queued before it fails
    linger: bool = True  # with nothing to claim, wait while others train (to retry their cells if they die)

    @property
    def bars(self) -> bool:
        """Progress bars only on a terminal: a log file gets one line per finished cell instead."""
        return self.progress and sys.stderr.isatty()

    @property
    def claim_settings(self) -> dict[str, int | None]:
        return {"heartbeat_s": self.heartbeat_s, "grace_s": self.grace_s, "retries": self.retries}

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.runs_dir / 'optuna.db').resolve()}"


@dataclass(frozen=True)
class SlurmOptions:
    """One job array, in sbatch's vocabulary."""

    array: int = 2  # tasks (workers) in the array
    partition: str | None = None
    gpus_per_task: int = 1
    cpus_per_task: int = 8  # also the worker's torch threads
    time: str = "4:00:00"  # per task: MINUTES, HH:MM:SS or D-HH:MM:SS
    account: str | None = None
    mem_gb: int | None = None
    setup: tuple[str, ...] = ()  # shell lines before the task starts, e.g. "module load cuda"
    local_tracking: bool = False  # allow a local (sqlite) MLflow store for an array of several tasks


RUN_DEFAULTS, SLURM_DEFAULTS = RunOptions(), SlurmOptions()

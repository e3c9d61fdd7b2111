"""The claim protocol: how a worker holds a trial, and how the others tell that it died.

- A worker claims a WAITING trial by moving it to RUNNING (atomic: SELECT ... FOR UPDATE on
  PostgreSQL, a file lock beside a sqlite file, the log's order on a journal) and writes itself
  into it as its HOLDER: machine, process and a token of this claim.
- While it trains, a thread advances the trial's BEAT counter every heartbeat_s seconds.
- Any other worker of the study (an observer) declares the trial stale only when it has watched
  that counter stand still for grace_s seconds of its own monotonic clock, so no two machines'
  clocks are ever compared; or at once when the holder is a process of the observer's own machine
  that no longer exists. It re-reads the trial just before failing it.
- A stale trial is failed and re-queued as a fresh copy: same cell, no holder, no beat. Its
  holders' deaths are counted, and after `retries` of them the cell fails for good, with its reason.
- A holder that stops on purpose (preemption, Ctrl-C, a lost tracking server) releases its trial:
  re-queued at once, not counted as a death.
- A holder checks that its trial is still RUNNING before it writes an epoch; one whose trial was
  taken over stops and writes nothing more.
- heartbeat, grace and retries are stored with the study when it is created: every worker uses those.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import cache

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..errors import ChaeError
from .storage import LOCK_BREAK_S, internals, kind, open_study, retrying, trial_id_of, worker_name, writer_lock

HOLDER = "holder"  # trial user attribute: MACHINE/PID/TOKEN of the claim that holds it
BEAT = "beat"  # trial user attribute: the holder's heartbeat counter
DEATHS = "deaths"  # trial user attribute: how many holders of this cell died while training it
WORKER = "worker"  # trial user attribute: host, process and SLURM task, for `chae-ablate status`
REASON = "failure_reason"
HOLDING = (HOLDER, BEAT, WORKER, REASON, "lease_at")  # never copied to a re-queued trial (lease_at: an earlier lease)
SETTINGS = "claims"  # study user attribute: the ClaimSettings every worker of the study uses


@dataclass(frozen=True)
class ClaimSettings:
    """How often a holder beats, how long a silent one is trusted, how often a dying cell is retried."""

    heartbeat_s: int
    grace_s: int
    retries: int

    def check(self, kind: str) -> ClaimSettings:
        if self.heartbeat_s < 1:
            raise ChaeError(f"--heartbeat {self.heartbeat_s}: must be at least 1 second")
        if self.grace_s < 3 * self.heartbeat_s:
            raise ChaeError(f"--grace {self.grace_s}: must be at least 3 x --heartbeat ({3 * self.heartbeat_s} s), "
                            "so that a busy holder may miss two beats without losing its cell")
        if kind == "journal" and self.grace_s < 2 * LOCK_BREAK_S:
            raise ChaeError(f"--grace {self.grace_s}: on a journal ledger must be at least {2 * LOCK_BREAK_S} s, since "
                            f"a dead writer's lock file blocks every heartbeat for up to {LOCK_BREAK_S} s")
        if self.retries < 0:
            raise ChaeError(f"--retries {self.retries}: must be 0 or more")
        return self


# heartbeat, grace: a journal appends a record per beat, so it beats less often (~0.5 MB a worker-day)
DEFAULTS = {"database": ClaimSettings(5, 15, 3), "journal": ClaimSettings(20, 60, 3)}


def settle(study: optuna.Study, asked: dict[str, int | None], kind: str, store: bool = True) -> ClaimSettings:
    """The claim settings of `study`: those stored with it; for a new study (or one from before they
    were stored) the asked ones over the defaults of its storage kind, then stored. An asked
    heartbeat or grace that differs from the stored one is refused (every worker of a study must
    judge the others alike); an asked retries replaces the stored one (to give failed cells more)."""
    stored = study.user_attrs.get(SETTINGS)
    if stored:
        settings = ClaimSettings(**json.loads(stored))
        if asked.get("retries") is not None and asked["retries"] != settings.retries:  # not shared: may change
            settings = replace(settings, retries=asked["retries"]).check(kind)
            study.set_user_attr(SETTINGS, json.dumps(asdict(settings)))
        for key, value in asked.items():
            if value is not None and value != getattr(settings, key):
                option = key.removesuffix("_s")
                raise ChaeError(f"--{option} {value}: study {study.study_name} keeps {option} {getattr(settings, key)}, "
                                "set when it was created, and every worker must use the same; leave --"
                                f"{option} out (or start afresh with --fresh)")
        return settings
    settings = ClaimSettings(**{**asdict(DEFAULTS[kind]), **{k: v for k, v in asked.items() if v is not None}}).check(kind)
    if store:
        study.set_user_attr(SETTINGS, json.dumps(asdict(settings)))
    return settings


# --- who holds a trial ---------------------------------------------------------------------------

@cache
def this_machine() -> str:
    """This boot of this machine, in this process namespace ('' where that cannot be told): two
    processes with the same machine know each other's PIDs."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def new_holder() -> str:
    return f"{this_machine()}/{os.getpid()}/{uuid.uuid4().hex[:12]}"


def died_here(holder: str | None) -> bool:
    """Whether `holder` was a process of this machine that no longer exists (or is a zombie)."""
    if not holder or holder.count("/") != 2:
        return False
    machine, pid, _ = holder.split("/")
    if not machine or machine != this_machine() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


class Watch:
    """What this process has seen of each running trial's holder and beat, and since when by its own
    monotonic clock (never another machine's)."""

    def __init__(self, grace_s: float, clock: Callable[[], float] = time.monotonic):
        self.grace_s, self.clock = grace_s, clock
        self._seen: dict[int, tuple[tuple, float]] = {}

    def silent(self, trial: FrozenTrial) -> bool:
        """Whether the trial's beat has stood still for more than the grace period of watching."""
        sign, now, trial_id = signature(trial), self.clock(), trial_id_of(trial)
        seen = self._seen.get(trial_id)
        if seen is None or seen[0] != sign:
            self._seen[trial_id] = (sign, now)
            return False
        return now - seen[1] > self.grace_s

    def forget_others(self, running: set[int]) -> None:
        self._seen = {k: v for k, v in self._seen.items() if k in running}


def signature(trial: FrozenTrial) -> tuple:
    return trial.user_attrs.get(HOLDER), trial.user_attrs.get(BEAT)


# --- failing and re-queueing ---------------------------------------------------------------------

def requeue(study: optuna.Study, trial: FrozenTrial, reason: str, died: bool, retries: int) -> str | None:
    """Fail a running trial with `reason` (and what became of it) and queue a fresh copy of it (no
    holder, no beat): 'requeued'; after more than `retries` deaths no copy: 'failed'. None when the trial was no
    longer running (its holder finished, or another worker failed it first)."""
    storage, trial_id = internals(study, trial)
    deaths = int(trial.user_attrs.get(DEATHS, 0)) + died
    given_up = died and deaths > retries
    reason += (f"; its worker died {deaths} times while training it, not retried again (--retries {retries}; a "
               "rerun with a higher --retries tries again)" if given_up else "; re-queued")
    try:
        storage.set_trial_user_attr(trial_id, DEATHS, deaths)
        storage.set_trial_user_attr(trial_id, REASON, reason[:2000])
        if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
            return None
    except optuna.exceptions.UpdateFinishedTrialError:
        return None
    if given_up:
        return "failed"
    history = [*trial.system_attrs.get("retry_history", []), trial.number]  # as RetryHeartbeatStaleTrialCallback
    study.add_trial(optuna.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={**{k: v for k, v in trial.user_attrs.items() if k not in HOLDING}, DEATHS: deaths},
        system_attrs={**trial.system_attrs, "failed_trial": history[0], "retry_history": history}))
    return "requeued"


def recover_stale(study: optuna.Study, watch: Watch, retries: int, lock, on_given_up=lambda trial: None) -> None:
    """Fail and re-queue every running trial whose holder died: gone from this machine, or silent for
    the grace period as this process watched it. on_given_up(trial) for a cell that will not be retried."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    watch.forget_others({trial_id_of(t) for t in running})
    for trial in running:
        gone = died_here(trial.user_attrs.get(HOLDER))
        if not gone and not watch.silent(trial):
            continue
        storage, trial_id = internals(study, trial)
        with lock():
            fresh = storage.get_trial(trial_id)  # re-read: it may have beaten just now
            if fresh.state != TrialState.RUNNING or signature(fresh) != signature(trial):
                continue
            why = ("its worker process is gone" if gone else
                   f"its worker was silent for {watch.grace_s:g} s (no heartbeat)")
            worker = fresh.user_attrs.get(WORKER)
            reason = f"{why}{f' ({worker})' if worker else ''}"
            if requeue(study, fresh, reason, died=True, retries=retries) == "failed":
                on_given_up(storage.get_trial(trial_id))


# --- holding a trial -----------------------------------------------------------------------------

class ClaimedStudy:
    """An Optuna study whose trials workers claim and hold by this protocol (a study's cells, a
    search's trials). heartbeat_s, grace_s, retries: None for the study's own, or the defaults.
    reading: a reader's (`status`), which stores nothing."""

    def __init__(self, name: str, url: str, *, heartbeat_s: int | None = None, grace_s: int | None = None,
                 retries: int | None = None, reading: bool = False, **study_kwargs):
        self.study = open_study(name, url, **study_kwargs)
        self.name, self.url = name, url
        self.settings = retrying(settle, self.study, {"heartbeat_s": heartbeat_s, "grace_s": grace_s,
                                                      "retries": retries}, kind(url), store=not reading)
        self.watch = Watch(self.settings.grace_s)
        self._given_up: list[FrozenTrial] = []  # trials this worker failed for good (their workers kept dying)

    def recover(self) -> None:
        """Re-queue the trials of workers that died."""
        retrying(recover_stale, self.study, self.watch, self.settings.retries, lambda: writer_lock(self.url),
                 on_given_up=self._given_up.append)

    def hold(self, trial_id: int) -> str:
        """Write this worker into a trial it just moved to RUNNING; returns its holder token."""
        storage, holder = internals(self.study)[0], new_holder()
        storage.set_trial_user_attr(trial_id, HOLDER, holder)
        storage.set_trial_user_attr(trial_id, WORKER, worker_name())
        return holder

    def heartbeat_of(self, trial_id: int) -> Heartbeat:
        return Heartbeat(self.study, trial_id, self.settings.heartbeat_s)

    def still_holds(self, trial_id: int, holder: str) -> bool:
        return retrying(held_trial, self.study, trial_id, holder) is not None

    def release_trial(self, trial_id: int, holder: str, why: str) -> None:
        """Hand a held trial back to the queue at once (its worker stops on purpose: preemption,
        Ctrl-C, a lost server); not counted as a death."""
        if (trial := retrying(held_trial, self.study, trial_id, holder)) is not None:
            requeue(self.study, trial, f"released by its worker ({why})", died=False, retries=self.settings.retries)


class Heartbeat:
    """A thread that advances the held trial's beat every `interval` seconds, until the trial is no
    longer running (another worker took it over: the holder finds out at its next write)."""

    def __init__(self, study: optuna.Study, trial_id: int, interval: float):
        self.study, self.trial_id, self.interval = study, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        count = 0
        while True:
            count += 1
            try:
                internals(self.study)[0].set_trial_user_attr(self.trial_id, BEAT, count)
            except optuna.exceptions.UpdateFinishedTrialError:
                return
            except Exception:  # a lost connection: keep trying; the grace period decides
                pass
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class TakenOver(Exception):
    """This worker's trial was failed as stale and re-queued: another worker holds it now."""


@contextmanager
def taken_over() -> Iterator[None]:
    """Optuna's refusal to write to a finished trial, as TakenOver."""
    try:
        yield
    except optuna.exceptions.UpdateFinishedTrialError:
        raise TakenOver("another worker holds this trial now") from None


def held_trial(study: optuna.Study, trial_id: int, holder: str) -> FrozenTrial | None:
    """The trial, if it is still RUNNING under this holder (read from the storage, not a cache)."""
    trial = internals(study)[0].get_trial(trial_id)
    return trial if trial.state == TrialState.RUNNING and trial.user_attrs.get(HOLDER) == holder else None

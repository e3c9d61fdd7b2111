"""The queue of a study's cells: one Optuna study per ablation study, one enqueued trial per cell.

A trial carries its cell's hash, variant and seed as user attributes, and the worker holding it.
Workers — in this process, in child processes or on other machines — claim WAITING trials
atomically (the protocol: claims.py), and only the cells of their own plan, so no cell runs twice
and a worker of one version of a study never trains another version's cells. Trials are
translated into records.CellRecord here; nothing above this module holds an Optuna object.
"""
from __future__ import annotations

import json
from collections.abc import Collection, Iterable

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from ..metrics import RANKING, SUMMARY_METRICS
from ..records import CellRecord, CellState, PlannedCell
from .claims import DEATHS, REASON, WORKER, ClaimedStudy, Heartbeat, TakenOver, taken_over
from .storage import ACTIVE, internals, retrying, study_attrs, writer_lock

STATES = {TrialState.WAITING: CellState.QUEUED, TrialState.RUNNING: CellState.RUNNING,
          TrialState.COMPLETE: CellState.DONE, TrialState.FAIL: CellState.FAILED,
          TrialState.PRUNED: CellState.PRUNED}
VERSION = "version."  # study user attribute prefix: one light record per version of the study (versions.py)


class Ledger(ClaimedStudy):
    """The Optuna study that queues one ablation study's cells."""

    def given_up(self) -> list[CellRecord]:
        """The cells this worker failed for good since the last call (their workers kept dying)."""
        found, self._given_up = self._given_up, []
        return [_record(t) for t in found]

    def _trials(self, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=states)

    def queue(self, cells: Iterable[PlannedCell], retry_failed: bool = True) -> int:
        """Enqueue every cell that is neither finished, queued nor running (nor failed, unless
        retry_failed: a rerun retries failed cells, a running study does not; never one whose
        workers died more than `retries` times, which would only kill the next); returns how many."""
        self.recover()  # dead workers' cells go back to the queue
        done = (TrialState.COMPLETE, *ACTIVE) + (() if retry_failed else (TrialState.FAIL,))
        trials = self._trials()
        covered = {t.user_attrs.get("cell_hash") for t in trials if t.state in done}
        deaths = {t.user_attrs.get("cell_hash"): int(t.user_attrs.get(DEATHS, 0)) for t in trials
                  if t.state == TrialState.FAIL}  # of each cell's latest failed attempt
        missing = [c for c in cells if c.cell_hash not in covered
                   and deaths.get(c.cell_hash, 0) <= self.settings.retries]  # not a cell given up on
        for cell in missing:
            self.study.enqueue_trial({}, user_attrs={"variant": cell.variant, "seed": cell.seed,
                                                     "cell_hash": cell.cell_hash, DEATHS: deaths.get(cell.cell_hash, 0)})
        return len(missing)

    def claim(self, hashes: Collection[str]) -> Claim | None:
        """Atomically move one WAITING trial of these cells to RUNNING (as Study.ask does, but never
        samples a new one); stale trials of dead workers are re-queued first. The claim names its worker."""
        self.recover()
        with writer_lock(self.url):
            for frozen in self._trials(states=(TrialState.WAITING,)):
                if frozen.user_attrs.get("cell_hash") not in hashes:
                    continue  # another version's cell: its own workers train it
                storage, trial_id = internals(self.study, frozen)
                try:
                    if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                        return Claim(self, Trial(self.study, trial_id), self.hold(trial_id))
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue
        return None

    def active(self, hashes: Collection[str]) -> bool:
        """Whether any of these cells is still queued or running (possibly another worker's)."""
        return any(t.user_attrs.get("cell_hash") in hashes for t in self._trials(states=ACTIVE))

    def is_duplicate(self, claim: Claim) -> bool:
        """Another trial of the same cell is finished, or queued/running with a lower number."""
        for other in self._trials():
            if other.number == claim.number or other.user_attrs.get("cell_hash") != claim.cell_hash:
                continue
            if other.state == TrialState.COMPLETE or (other.state in ACTIVE and other.number < claim.number):
                return True
        return False

    def records(self) -> list[CellRecord]:
        """One record per cell hash the ledger holds, from the trial that says where the cell stands:
        its finished trial if any, else a queued or running one, else its latest failed attempt (so
        a racing worker's duplicate, failed at once, never hides a live trial)."""
        rank = {TrialState.COMPLETE: 3, TrialState.RUNNING: 2, TrialState.WAITING: 2}
        by_hash: dict[str, FrozenTrial] = {}
        for t in self._trials():
            h = t.user_attrs.get("cell_hash")
            if h and (h not in by_hash or rank.get(t.state, 1) >= rank.get(by_hash[h].state, 1)):
                by_hash[h] = t
        return [_record(t) for t in by_hash.values()]

    def mean_curve(self, hashes: Collection[str]) -> dict[int, float]:
        """Per epoch, the mean validation loss the finished cells among `hashes` reported (a baseline's curve)."""
        curves = [t.intermediate_values for t in self._trials(states=(TrialState.COMPLETE,))
                  if t.user_attrs.get("cell_hash") in hashes]
        epochs = sorted(set().union(*curves)) if curves else []
        return {e: sum(c[e] for c in curves if e in c) / sum(e in c for c in curves) for e in epochs}

    def record_version(self, fingerprint: str, record: dict) -> None:
        """Keep a version of the study (versions.py: its fingerprint, source file and time)."""
        retrying(self.study.set_user_attr, VERSION + fingerprint, json.dumps(record, sort_keys=True))

def recorded_versions(study_name: str, url: str) -> list[dict]:
    """The versions of the study its ledger keeps ([] when there is none; creates nothing)."""
    return [json.loads(v) for k, v in study_attrs(study_name, url).items() if k.startswith(VERSION)]


def _record(t: FrozenTrial) -> CellRecord:
    done = t.state == TrialState.COMPLETE
    return CellRecord(
        cell_hash=t.user_attrs["cell_hash"], variant=str(t.user_attrs.get("variant", "")),
        seed=int(t.user_attrs.get("seed", -1)), state=STATES[t.state],
        metrics={k: float(t.user_attrs[k]) for k in SUMMARY_METRICS if k in t.user_attrs} if done else {},
        source=f"ledger trial {t.number}", failure_reason=str(t.user_attrs.get(REASON, "")),
        worker=str(t.user_attrs.get(WORKER, "")))


class Claim:
    """A cell this worker holds: heartbeats, per-epoch reports, and its one outcome. Every write
    first checks that the cell is still this worker's: one that was taken over (its heartbeats went
    unseen for the grace period) raises TakenOver and writes nothing."""

    def __init__(self, ledger: Ledger, trial: Trial, holder: str):
        self.ledger, self._trial, self.holder = ledger, trial, holder
        self.number = trial.number
        self.cell_hash = trial.user_attrs.get("cell_hash")
        self._id = internals(ledger.study, trial)[1]

    def heartbeat(self) -> Heartbeat:
        return self.ledger.heartbeat_of(self._id)

    def confirm_held(self) -> None:
        """Raises TakenOver when another worker holds the cell now."""
        if not self.ledger.still_holds(self._id, self.holder):
            raise TakenOver(f"cell {self.cell_hash[:12]} was re-queued while this worker held it (its heartbeats "
                            f"went unseen for {self.ledger.settings.grace_s} s) and another worker holds it now")

    def reported_epochs(self) -> set[int]:
        storage, trial_id = internals(self.ledger.study, self._trial)
        return set(storage.get_trial(trial_id).intermediate_values)

    def report(self, epoch: int, val_loss: float) -> bool:
        """Record an epoch's validation loss; a cell of a study is never pruned (False)."""
        self.confirm_held()
        with taken_over():
            retrying(self._trial.report, val_loss, epoch)
        return False

    def complete(self, summary: dict[str, float]) -> None:
        self.confirm_held()
        with taken_over():
            for key, value in summary.items():
                retrying(self._trial.set_user_attr, key, value)
            retrying(self.ledger.study.tell, self._trial, summary[RANKING])

    def fail(self, reason: str) -> None:
        """The cell failed (recorded only while this worker holds it)."""
        try:
            with taken_over():
                retrying(self._trial.set_user_attr, REASON, reason[:2000])
                retrying(self.ledger.study.tell, self._trial, state=TrialState.FAIL)
        except TakenOver:
            pass

    def release(self, why: str) -> None:
        """Hand the cell back to the queue at once; its checkpoint stays (ClaimedStudy.release)."""
        self.ledger.release_trial(self._id, self.holder, why)

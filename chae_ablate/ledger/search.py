"""The ledger of a search: Optuna samples the knobs, trials are asked, trained and told, and a
budget of trained trials is kept exactly across workers and restarts.

A search's trials live in their own Optuna study, named by the caller after everything that
shapes the search (search.py), so a changed search never counts an earlier one's trials. Trials
leave this module as SearchTrial records and plain rows; nothing above it holds an Optuna object.
The samplers and pruners a study file may name are the keys of SAMPLERS and PRUNERS.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, Trial, TrialState

from .claims import ClaimedStudy, Heartbeat, TakenOver, taken_over
from .queue import STATES
from .storage import ACTIVE, internals, retrying, study_attrs, writer_lock

REJECTED, OVER_BUDGET, TRAINED = "rejected", "over_budget", "trained"  # a search trial's outcome attribute
SETTINGS = "search"  # trials-study user attribute: what the search was keyed by, for "what changed"
DESCRIBED_AT = "described_at"  # ... and when it was first run


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


def _startup(trials: int) -> int:
    return max(2, min(10, trials // 3))


# name -> sampler(seed, budget); seed None: fresh entropy, for workers that must not all propose the same trials
SAMPLERS = {
    "tpe": lambda seed, trials: optuna.samplers.TPESampler(  # multivariate, grouped for conditional knobs
        seed=seed, n_startup_trials=_startup(trials), multivariate=True, group=True, constant_liar=True),
    "gp": lambda seed, trials: optuna.samplers.GPSampler(seed=seed, n_startup_trials=_startup(trials)),
    "random": lambda seed, trials: optuna.samplers.RandomSampler(seed=seed),
}
@dataclass(frozen=True)
class Pruner:
    make: Callable[[dict[int, float], float, int], optuna.pruners.BasePruner]  # (baseline's mean curve, margin, epochs)
    about: str  # what it does, for the search report: {margin}, {epochs} and {seeds} are filled in


PRUNERS = {
    "baseline": Pruner(lambda curve, margin, epochs: BaselinePruner(curve, margin),
                       "stop a trial whose validation loss at an epoch exceeds the baseline's mean curve there by "
                       "more than the margin ({margin:.4f}; baseline curve over {epochs} epochs, seeds {seeds})"),
    "median": Pruner(lambda curve, margin, epochs: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
                     "Optuna's median pruner"),
    "hyperband": Pruner(lambda curve, margin, epochs: optuna.pruners.HyperbandPruner(
        min_resource=1, max_resource=max(epochs, 1)), "Optuna's Hyperband pruner"),
    "none": Pruner(lambda curve, margin, epochs: optuna.pruners.NopPruner(), "no pruning"),
}


@dataclass(frozen=True)
class SearchTrial:
    """A trial this worker holds: its number and knobs."""

    number: int
    params: dict[str, Any]  # knob path -> value
    retry: bool  # it re-runs a trial whose worker died, and keeps that trial's budget slot


class SearchLedger(ClaimedStudy):
    """The Optuna study of one search: trials asked from a sampler, a budget of trained trials kept
    exactly across workers and restarts, pruned against the baseline. Its trials are held by the
    claim protocol (claims.py): writes to a trial another worker took over raise TakenOver."""

    def __init__(self, name: str, url: str, sampler: str, pruner: str, *, seed: int | None, budget: int,
                 curve: dict[int, float], margin: float, epochs: int, heartbeat_s: int | None = None,
                 grace_s: int | None = None, retries: int | None = None):
        super().__init__(name, url, heartbeat_s=heartbeat_s, grace_s=grace_s, retries=retries,
                         sampler=SAMPLERS[sampler](seed, budget), pruner=PRUNERS[pruner].make(curve, margin, epochs))
        if seed is not None and (asked := len(self.study.get_trials(deepcopy=False))):
            # a resumed seeded search: the same seed would propose the first trials' knobs again
            self.study.sampler = SAMPLERS[sampler](seed + asked, budget)
        self._held: dict[int, tuple[Trial, str]] = {}  # number -> (trial, holder token)

    def describe(self, settings: dict) -> None:
        """Record what this search is keyed by (shown when a later search differs)."""
        if SETTINGS not in self.study.user_attrs:
            stamped = {**settings, DESCRIBED_AT: datetime.now(timezone.utc).isoformat(timespec="seconds")}
            retrying(self.study.set_user_attr, SETTINGS, json.dumps(stamped, sort_keys=True, default=str))

    def ask(self, knobs: Iterable) -> SearchTrial:
        """A new trial (a dead worker's trial, re-queued with its params, comes first) with its knobs
        (config.Knob: path, choices or low/high/step/log) drawn. Dead workers' trials were re-queued
        by the pending() and used() that come before it."""
        with writer_lock(self.url):  # ask pops a re-queued trial: the same race as Ledger.claim
            trial = retrying(self.study.ask)
            holder = self.hold(internals(self.study, trial)[1])
        params = {}
        for knob in knobs:
            if knob.choices:
                params[knob.path] = trial.suggest_categorical(knob.path, list(knob.choices))
            elif knob.integer:
                params[knob.path] = trial.suggest_int(knob.path, int(knob.low), int(knob.high),
                                                      step=int(knob.step or 1), log=knob.log)
            else:
                params[knob.path] = trial.suggest_float(knob.path, knob.low, knob.high, step=knob.step, log=knob.log)
        self._held[trial.number] = (trial, holder)
        retry = RetryHeartbeatStaleTrialCallback.retried_trial_number(self._frozen(trial)) is not None
        return SearchTrial(trial.number, params, retry)

    def _frozen(self, trial: Trial) -> FrozenTrial:
        storage, trial_id = internals(self.study, trial)
        return storage.get_trial(trial_id)

    def used(self, before: int | None = None, finished: bool = False) -> int:
        """Budget slots taken (by trials numbered below `before`): trained, pruned, running or re-queued
        trials that were not rejected. A running trial not yet judged counts, so two workers asking
        at once can never both take the last slot. finished: only the slots spent (trained, pruned or
        failed), not those held by running or re-queued trials: how far the search has come."""
        self.recover()
        spent = (TrialState.COMPLETE, TrialState.PRUNED)
        return sum(1 for t in self.study.get_trials(deepcopy=False)
                   if (before is None or t.number < before) and t.user_attrs.get("outcome") in (None, TRAINED)
                   and (t.state in spent or (t.state == TrialState.FAIL and "reason" in t.user_attrs)
                        or (not finished and (t.state == TrialState.RUNNING or (
                            t.state == TrialState.WAITING and t.user_attrs.get("outcome") == TRAINED)))))
        # a FAIL with a reason is a trial whose cell failed: it used its slot. A FAIL without one is a
        # dead worker's trial: its re-queued copy (WAITING, then RUNNING) holds the slot instead.

    def pending(self) -> tuple[int, int]:
        """(queued, running) trials: a finished budget still waits for these."""
        self.recover()
        trials = self.study.get_trials(deepcopy=False, states=ACTIVE)
        return (sum(t.state == TrialState.WAITING for t in trials), sum(t.state == TrialState.RUNNING for t in trials))

    def skip(self, trial: SearchTrial, outcome: str, reason: str) -> None:
        """A trial that trains nothing, with why. A combination the builder rejected is told PRUNED
        without values, which TPE ranks worst (a FAIL it would ignore, and propose again); one over
        the budget is FAIL."""
        held = self._take(trial)
        with taken_over():
            retrying(held.set_user_attr, "outcome", outcome)
            retrying(held.set_user_attr, "reason", reason[:2000])
            retrying(self.study.tell, held, state=TrialState.PRUNED if outcome == REJECTED else TrialState.FAIL)

    def propose(self, params: dict) -> None:
        """Queue a combination for the next ask (after a rejection, so that any sampler moves on)."""
        retrying(self.study.enqueue_trial, params, skip_if_exists=True)

    def accept(self, trial: SearchTrial) -> None:
        with taken_over():
            retrying(self._held[trial.number][0].set_user_attr, "outcome", TRAINED)

    def heartbeat(self, trial: SearchTrial) -> Heartbeat:
        held, _ = self._held[trial.number]
        return self.heartbeat_of(internals(self.study, held)[1])

    def confirm_held(self, trial: SearchTrial) -> None:
        """Raises TakenOver (and forgets the trial) when another worker holds it now."""
        held, holder = self._held[trial.number]
        if not self.still_holds(internals(self.study, held)[1], holder):
            self._held.pop(trial.number)
            raise TakenOver(f"trial {trial.number} was re-queued while this worker held it, and another worker "
                            "holds it now")

    def release(self, trial: SearchTrial, why: str) -> None:
        """Hand a held trial back to the queue at once (ClaimedStudy.release_trial)."""
        self._release_held(trial.number, why)

    def release_all(self, why: str) -> list[int]:
        """Hand back every trial this worker still holds (one asked but not yet training when the
        worker was stopped); the numbers handed back."""
        numbers = list(self._held)
        for number in numbers:
            self._release_held(number, why)
        return numbers

    def _release_held(self, number: int, why: str) -> None:
        held, holder = self._held.pop(number)
        self.release_trial(internals(self.study, held)[1], holder, why)

    def reported_epochs(self, trial: SearchTrial) -> set[int]:
        return set(self._frozen(self._held[trial.number][0]).intermediate_values)

    def report(self, trial: SearchTrial, epoch: int, value: float) -> bool:
        """Report an epoch's validation loss; True when the pruner says stop."""
        self.confirm_held(trial)
        held, _ = self._held[trial.number]
        with taken_over():
            retrying(held.report, value, epoch)
        return retrying(held.should_prune)

    def finish(self, trial: SearchTrial, value: float | None, pruned_at: int | None = None) -> None:
        held = self._take(trial)
        with taken_over():
            if pruned_at is not None:
                retrying(held.set_user_attr, "pruned_at_epoch", pruned_at)
                retrying(self.study.tell, held, state=TrialState.PRUNED)
            else:
                retrying(self.study.tell, held, value)

    def fail(self, trial: SearchTrial, reason: str) -> None:
        held = self._take(trial)
        with taken_over():
            retrying(held.set_user_attr, "reason", reason[:2000])
            retrying(self.study.tell, held, state=TrialState.FAIL)

    def _take(self, trial: SearchTrial) -> Trial:
        """The held trial, to be told its outcome: TakenOver when it is another worker's now."""
        self.confirm_held(trial)
        return self._held.pop(trial.number)[0]

    def trials(self) -> list[dict]:
        """One plain row per trial: number, state (a CellState's name, or rejected / over_budget for
        a trial that trained nothing), value (a finished trial's only), reason, pruned epoch and the
        first seed's validation loss there (a pruned trial's), params."""
        rows = []
        for t in self.study.get_trials(deepcopy=False):
            outcome = t.user_attrs.get("outcome")
            state = outcome if outcome in (REJECTED, OVER_BUDGET) else str(STATES[t.state])
            pruned_at = t.user_attrs.get("pruned_at_epoch") if t.state == TrialState.PRUNED else None
            rows.append({"number": t.number, "state": state,
                         "value": t.value if t.state == TrialState.COMPLETE else None,  # Optuna gives a pruned
                         "reason": t.user_attrs.get("reason", ""),  # trial its last partial loss as a value
                         "pruned_at_epoch": pruned_at, "loss_when_pruned": t.intermediate_values.get(pruned_at),
                         "params": dict(t.params), "retry_of": RetryHeartbeatStaleTrialCallback.retried_trial_number(t)})
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


def search_settings(name: str, url: str) -> dict:
    """What the search `name` in this storage was keyed by ({} if unknown)."""
    raw = study_attrs(name, url).get(SETTINGS)
    return json.loads(raw) if raw else {}

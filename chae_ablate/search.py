"""`chae-ablate search`: explore a study's knobs with Optuna, then re-test the best on fresh seeds.

Three phases, each shared through the ledger so that `worker` processes on any machine join in
and a rerun after kill -9 resumes: (1) the baseline is trained with the search's seeds (its curve
is what the baseline pruner compares against); (2) trials are asked from the sampler until the
budget of trained trials is used — combinations the builder rejects are recorded with their reason
and do not count; a trial whose worker died is re-queued with the same knobs and resumes from its
checkpoint; (3) the top-k configurations become variants of a confirmation study against the
baseline, on fresh seeds, decided with adaptive seeds (analysis.py), so a search never reports its
luckiest trial as a finding.

A search says what it does: a line per phase, and one per trial (a bar over the budget on a
terminal). Stopped (Ctrl-C, SIGTERM), it hands its trial back to the queue, writes the report of
the trials done and says so in one line; the same command resumes it.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import random
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import versions
from . import stats
from .analysis import outcome
from .config import to_dict
from .errors import ChaeError, ConfigError, exit_on_signal
from .ledger import (DESCRIBED_AT, OVER_BUDGET, REJECTED, SearchLedger, SearchTrial, TakenOver, delete_study,
                     search_settings, study_names)
from .metrics import RANKING
from .options import RunOptions
from .records import CellState
from .runner import (CellError, CellPruned, EpochReporter, RunSummary, StudySession, Worker, admit, check_runs_dir,
                     child_device, forget, handed_back_on_stop, notify, open_session, recorded, run_study, set_threads,
                     stops_said_later, stores)
from .search_report import knobs_text, loss_text, value_text, without_trial, write_search_report
from .space import Knob
from .study import Study, Variant, cell_hash, config_key
from .train import pick_device


@dataclass
class SearchSummary:
    """What a search did: its trials, the confirmation study's run and the search report."""

    name: str
    trials: list[dict]
    confirmation: RunSummary | None
    budget: int  # trained trials, as run (search.trials, or --trials)
    report: Path | None = None
    interrupted: str = ""  # what stopped it before the end (e.g. SIGINT): its report is partial


def search_name(study: Study) -> str:
    return f"{study.name}-search"


def search_settings_of(study: Study, budget: int) -> dict:
    """Everything that shapes a search's trials: its space, seeds, sampler, pruner and budget, and
    the baseline they train from (epochs included). A search with other settings is another search."""
    s, analysis = study.search, to_dict(study.analysis)
    return {"space": [asdict(k) for k in study.space], "seeds": list(s.seeds), "sampler": s.sampler,
            "pruner": s.pruner, "trials": budget, "baseline": config_key(study.baseline.config),
            **{k: analysis[k] for k in ("margin", "relative", "vary_split")}}  # the pruner's margin; each trial's split


def trials_name(study: Study, budget: int) -> str:
    """The Optuna study of this search's trials: named by a hash of its settings, so a changed search
    starts a new one and never counts, or ranks, an earlier search's trials."""
    key = json.dumps(search_settings_of(study, budget), sort_keys=True, default=str)
    return f"{search_name(study)}-trials-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def baseline_study(study: Study) -> Study:
    """The search's baseline cells: the study's baseline with the search's seeds."""
    config = replace(study.baseline.config, protocol=replace(study.baseline.config.protocol, seeds=study.search.seeds))
    return Study(search_name(study), f"baseline of the search of {study.name}",
                 (replace(study.baseline, config=config),), study.source, replace(study.analysis, adaptive=False))


def run_search(study: Study, options: RunOptions, trials: int | None = None, report: bool = True,
               joining: bool = False) -> SearchSummary:
    """All three phases (see the module docstring); returns when the confirmation is decided.
    joining: a `worker --search` process, whose sampler must not repeat the others' proposals."""
    if study.search is None:
        raise ChaeError(f"{study.source or study.name}: has no search: section (see studies/search-quickstart.yaml)")
    check_runs_dir(options)
    budget = trials or study.search.trials
    device = pick_device(options.device)
    base = baseline_study(study)
    admit(base, options)  # another study file under this name is refused before anything is written or forgotten
    for store, where in zip(recorded(confirmation_name(study), options), stores(options)):
        versions.refuse_other_source(confirmation_name(study), study.source_path, store, where)
    if options.fresh:  # forget this search: its trials, its baseline cells, its confirmation
        delete_study(trials_name(study, budget), options.storage_url)
        for name in (base.name, confirmation_name(study)):
            forget(name, options)
        options = replace(options, fresh=False)
    elif not joining:
        say_if_changed(study, options, budget)
    cells = len(base.plan().cells)
    notify(f"search of {study.name}: training the baseline first ({cells} cell{'s' * (cells != 1)})")
    with stops_said_later() as held:  # a stop is said in one line, the search's
        try:
            run_study(base, options, report=False)  # phase 1, shared through the ledger like any study
        except (KeyboardInterrupt, SystemExit) as stop:
            notify(f"search of {study.name} interrupted ({stop_name(stop)}) while training the baseline, before "
                   f"any trial{''.join(f'; {cell}' for cell in held)}; rerun the same command to resume")
            raise
    session = open_session(base, options)
    plan = base.plan()
    curve = session.ledger.mean_curve({c.cell_hash for c in plan.cells})
    margin = stats.absolute_margin(study.analysis.margin, study.analysis.relative,
                                   [r.metrics.get(RANKING, math.nan) for r in outcome(plan, session.ledger.records())
                                    .records.values() if r.state == CellState.DONE])
    alone = options.workers <= 1 and not joining  # one searcher: a seeded, reproducible search
    ledger = search_ledger(study, options, curve, margin, budget, study.search.seeds[0] if alone else None)
    searcher = None if options.workers > 1 else Searcher(study, base, options, device, session, ledger, budget)
    with stops_said_later() as held:  # a confirmation cell handed back is listed in the one last line
        try:
            trained = ledger.used(finished=True)
            notify(f"search of {study.name}: {budget} trial{'s' * (budget != 1)} ({study.search.sampler} sampler, "
                   f"{study.search.pruner} pruner){f', {trained} trained already' if trained else ''}")
            if searcher is None:
                _search_children(study, options, curve, margin, budget)
            else:
                searcher.run()  # phase 2
            confirm = confirmation_study(study, ledger)
            if confirm is not None:
                notify(f"search of {study.name}: confirming the top {len(confirm.variants) - 1} against the baseline "
                       f"on fresh seeds (study {confirm.name})")
            confirmation = run_study(confirm, options, report=report) if confirm else None  # phase 3
        except (KeyboardInterrupt, SystemExit) as stop:
            summary = SearchSummary(search_name(study), [], None, budget, interrupted=stop_name(stop))
            notify(stopped(study, summary, ledger, searcher, held, report, curve, margin))
            raise
    summary = SearchSummary(search_name(study), ledger.trials(), confirmation, budget)
    if report:
        summary.report = write_search_report(study, summary, ledger.importances(), curve, margin)
    return summary


def stop_name(stop: BaseException) -> str:
    """What stopped a search: SIGINT (Ctrl-C), or the signal whose handler raised SystemExit(128 + signal)."""
    if isinstance(stop, KeyboardInterrupt):
        return "SIGINT"
    if isinstance(stop.code, int) and stop.code > 128:
        try:
            return signal.Signals(stop.code - 128).name
        except ValueError:
            pass
    return f"exit {stop.code}"


def stopped(study: Study, summary: SearchSummary, ledger: SearchLedger, searcher: Searcher | None,
            cells: list[str], report: bool, curve: dict[int, float], margin: float) -> str:
    """After a stop in the trials or the confirmation: hand back what this process still holds, write
    the report of the trials done (no confirmation) and return the one line that says so (with
    `cells`: what became of the confirmation cells it held, from runner.stops_said_later)."""
    parts = []
    try:
        returned = ledger.release_all(summary.interrupted)  # a trial asked but not yet training
        summary.trials = ledger.trials()
        done = ledger.used(finished=True)
    except Exception as err:  # the ledger is gone: say so, and what a rerun does
        return (f"search of {study.name} interrupted ({summary.interrupted}); the ledger could not be read ({err}); "
                "rerun the same command to resume")
    parts.append(f"{done} of {summary.budget} trials trained")
    if searcher is not None:
        returned = searcher.handed_back + returned
        running = {t["number"] for t in summary.trials if t["state"] == CellState.RUNNING}
        if searcher.training in running and searcher.training not in returned:  # not one that just ended
            parts.append(f"trial {searcher.training} goes back to the queue once the grace period has passed")
    if returned:
        parts.append(f"trial{'s' * (len(returned) > 1)} {', '.join(map(str, returned))} returned to the queue")
    parts.extend(cells)
    if report:
        try:
            summary.report = write_search_report(study, summary, ledger.importances(), curve, margin)
            parts.append(f"partial report: {summary.report}")
        except Exception as err:
            parts.append(f"no partial report ({type(err).__name__}: {err})")
    return f"search of {study.name} interrupted ({summary.interrupted}): {'; '.join(parts)}; rerun the same " \
           "command to resume"


def say_if_changed(study: Study, options: RunOptions, budget: int) -> None:
    """When this search is new but an earlier one of the study is in the ledger, say what changed
    (the earlier trials stay readable there, e.g. in optuna-dashboard)."""
    current, names = trials_name(study, budget), study_names(options.storage_url)
    earlier = [n for n in names if n.startswith(f"{search_name(study)}-trials") and n != current]
    if current in names or not earlier:
        return
    settings = {n: search_settings(n, options.storage_url) for n in earlier}
    earlier.sort(key=lambda n: settings[n].get(DESCRIBED_AT, ""))  # the newest last (one from before keys: first)
    before, now = settings[earlier[-1]], search_settings_of(study, budget)
    changed = [key for key in now if json.dumps(before.get(key), sort_keys=True, default=str)
               != json.dumps(now[key], sort_keys=True, default=str)]
    notify(f"search of {study.name} changed ({', '.join(changed) or 'settings'}): its trials start afresh in "
           f"{current}; the earlier search's trials stay readable in the ledger as {', '.join(earlier)}")


def search_ledger(study: Study, options: RunOptions, curve: dict[int, float], margin: float, budget: int,
                  seed: int | None) -> SearchLedger:
    ledger = SearchLedger(trials_name(study, budget), options.storage_url, study.search.sampler, study.search.pruner,
                          seed=seed, budget=budget, curve=curve, margin=margin,
                          epochs=study.baseline.config.protocol.epochs, **options.claim_settings)
    ledger.describe(search_settings_of(study, budget))
    return ledger


def _search_children(study: Study, options: RunOptions, curve: dict[int, float], margin: float, budget: int) -> None:
    """--workers N: N processes search at once (cores or GPUs divided as for `run`)."""
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_search_child, args=(study, options, curve, margin, budget, i))
                for i in range(options.workers)]
    for child in children:
        child.start()
    try:
        for child in children:
            child.join()
    except BaseException:  # Ctrl-C reached the children too; a SIGTERM to this process is passed on
        for child in children:
            child.join(timeout=30)  # each hands its trial back first
            if child.is_alive():
                child.terminate()
        raise
    if any(child.exitcode for child in children):
        raise ChaeError("a search worker process exited with an error; rerun to resume")


def _search_child(study: Study, options: RunOptions, curve: dict[int, float], margin: float, budget: int,
                  index: int) -> None:
    signal.signal(signal.SIGTERM, exit_on_signal)  # a stop hands the held trial back, as in the parent
    device = child_device(options, index)
    set_threads(options, options.workers)
    options = replace(options, progress=False)
    base = baseline_study(study)
    ledger = search_ledger(study, options, curve, margin, budget, None)
    try:
        Searcher(study, base, options, device, open_session(base, options), ledger, budget).run()
    except KeyboardInterrupt:
        raise SystemExit(128 + signal.SIGINT) from None  # the parent says what stopped; no traceback here


class Searcher:
    """Asks, trains and tells trials until the budget of trained trials is used, here and elsewhere."""

    def __init__(self, study: Study, base: Study, options: RunOptions, device: torch.device,
                 session: StudySession, ledger: SearchLedger, budget: int, poll_s: float = 2.0):
        self.study, self.base, self.ledger, self.budget, self.poll_s = study, base, ledger, budget, poll_s
        self.worker = Worker(base, options, device, session)  # MLflow runs and checkpoints under the search
        self.rejected_limit = 20 * budget  # a space that is almost all invalid must still end
        self.rng = random.Random(study.search.seeds[0])
        self.progress: TrialProgress | None = None
        self.training: int | None = None  # the trial being trained now
        self.handed_back: list[int] = []  # trials handed back to the queue on a stop

    def run(self) -> None:
        with TrialProgress(self.study, self.ledger, self.budget, self.worker.options.bars) as self.progress:
            self._run()

    def _run(self) -> None:
        rejected = 0
        while True:
            queued, running = self.ledger.pending()
            if self.ledger.used() >= self.budget and not queued:
                if not running or not self.worker.options.linger:
                    return
                time.sleep(self.poll_s)  # others' trials may die and come back to the queue
                continue
            trial = self.ledger.ask(self.study.space)
            try:
                config = self.study.config_with(trial.params, where=f"trial {trial.number}")
            except ConfigError as err:
                self.ledger.skip(trial, REJECTED, str(err))
                self.progress.ended(trial, f"rejected, not trained nor counted: {without_trial(str(err))}")
                rejected += 1
                if rejected >= self.rejected_limit:
                    raise ChaeError(f"search: {rejected} combinations in a row were rejected by the builder "
                                    "(see the search report); narrow the space") from None
                feasible = self.random_feasible()
                if feasible is not None:
                    self.ledger.propose(feasible)
                continue
            if not trial.retry and self.ledger.used(before=trial.number) >= self.budget:
                self.ledger.skip(trial, OVER_BUDGET, "the budget was used by other workers")
                self.progress.ended(trial, "not trained: the budget was used by other workers")
                continue
            rejected = 0
            try:
                self.ledger.accept(trial)
                self.training = trial.number
                handed_back_on_stop(f"search trial {trial.number}", lambda why: self.hand_back(trial, why),
                                    self.ledger.heartbeat(trial), self.train_trial, trial, config, quiet=True)
            except TakenOver as err:
                notify(f"search trial {trial.number}: {err}; stopped here, writing nothing more")
            self.training = None

    def hand_back(self, trial: SearchTrial, why: str) -> None:
        """A stopped trial back to the queue, at once (the search's last line lists it)."""
        self.ledger.release(trial, why)
        self.handed_back.append(trial.number)

    def random_feasible(self, tries: int = 200) -> dict | None:
        """A uniformly drawn combination the builder accepts (None if none turns up in `tries`)."""
        for _ in range(tries):
            params = {k.path: random_value(k, self.rng) for k in self.study.space}
            try:
                self.study.config_with(params)
                return params
            except ConfigError:
                continue
        return None

    def train_trial(self, trial: SearchTrial, config) -> None:
        """Train the trial's seeds; report the first seed's epochs to the pruner; tell the mean. A
        trial is never pruned after its last epoch when it has one seed: that would save no training
        and lose a finished value."""
        variant = Variant(f"trial{trial.number}", json.dumps(trial.params, default=str), dict(trial.params), config)
        seeds, values = self.study.search.seeds, []
        def saves_training(epoch: int) -> bool:
            return epoch < config.protocol.epochs or len(seeds) > 1
        for i, seed in enumerate(seeds):
            cell = self.base.cell(variant, seed)  # the study's rules (vary_split) apply to trials too
            first = i == 0  # the pruner judges the first seed's curve
            reporter = EpochReporter(lambda epoch, loss: first and self.ledger.report(trial, epoch, loss)
                                     and saves_training(epoch),
                                     lambda: self.ledger.reported_epochs(trial) if first else set(),
                                     lambda: self.ledger.confirm_held(trial))
            try:
                values.append(self.worker.train(cell, reporter)[RANKING])
            except CellPruned as pruned:
                self.ledger.finish(trial, None, pruned_at=pruned.epoch)
                self.progress.ended(trial, f"pruned at epoch {pruned.epoch}")
                return
            except CellError as err:
                self.ledger.fail(trial, f"cell {cell.label}: {err.reason}")
                self.progress.ended(trial, f"failed: cell {cell.label}: {err.reason.splitlines()[0][:200]}")
                return
        value = sum(values) / len(values)
        self.ledger.finish(trial, value)
        seeds = f" (mean of {len(values)} seeds)" if len(values) > 1 else ""
        self.progress.ended(trial, f"best loss {loss_text(value)}{seeds}", value)


class TrialProgress:
    """Where the search stands, counted from the ledger (every worker's trials): on a terminal a bar
    over the budget of trained trials; otherwise (a log, SLURM, --no-progress) one line per trial
    this process ends, e.g. '[3/12 trials] trial 4 depth=2 lr=0.003: best loss 0.1234'."""

    def __init__(self, study: Study, ledger: SearchLedger, budget: int, bar: bool):
        self.ledger, self.budget = ledger, budget
        self.best = min((t["value"] for t in ledger.trials() if t["value"] is not None and math.isfinite(t["value"])),
                        default=math.inf)
        self.bar = tqdm(total=budget, desc=f"search {study.name}", unit="trial", disable=not bar, dynamic_ncols=True)
        self.bar.n = ledger.used(finished=True)
        self.bar.refresh()

    def __enter__(self) -> TrialProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def ended(self, trial: SearchTrial, outcome: str, value: float | None = None) -> None:
        """A trial this process asked has its outcome (a rejected one's too: it used no budget)."""
        done = self.ledger.used(finished=True)
        if value is not None and value < self.best:
            self.best = value
        if self.bar.disable:
            notify(trial_line(trial, outcome, done, self.budget))
            return
        self.bar.n = done
        self.bar.set_postfix_str(f"best {loss_text(self.best if math.isfinite(self.best) else None)}; "
                                 f"trial {trial.number}: {outcome[:40]}", refresh=False)
        self.bar.refresh()


def trial_line(trial: SearchTrial, outcome: str, done: int, budget: int) -> str:
    """A trial's progress line: how much of the budget is used, the trial, its knobs, its outcome."""
    again = " (re-run)" if trial.retry else ""
    return f"[{done}/{budget} trials] trial {trial.number}{again} {knobs_text(trial.params)}: {outcome}"


def random_value(knob: Knob, rng: random.Random):
    """One uniform draw from a knob (log-uniform on a log range, on the step grid when stepped)."""
    if knob.choices:
        return rng.choice(knob.choices)
    if knob.step is not None or knob.integer:
        step = knob.step or 1
        value = knob.low + step * rng.randrange(int((knob.high - knob.low) // step) + 1)
        return int(value) if knob.integer else value
    if knob.log:
        return math.exp(rng.uniform(math.log(knob.low), math.log(knob.high)))
    return rng.uniform(knob.low, knob.high)


def top_configs(study: Study, ledger: SearchLedger) -> list[tuple[int, float, dict]]:
    """(trial number, value, knobs) of the top-k finished trials, best first; ties by trial number.
    A trial with a seed that diverged (value inf) is never one to confirm."""
    done = [t for t in ledger.trials() if t["state"] == CellState.DONE and t["value"] is not None
            and math.isfinite(t["value"])]
    done.sort(key=lambda t: (t["value"], t["number"]))
    out, seen = [], set()
    for t in done:
        key = json.dumps(t["params"], sort_keys=True, default=str)
        if key not in seen:  # a re-run of the same knobs is not a second configuration
            seen.add(key)
            out.append((t["number"], t["value"], t["params"]))
    return out[: study.search.top_k]


def confirmation_study(study: Study, ledger: SearchLedger) -> Study | None:
    """The top-k configurations as variants against the baseline, on fresh seeds, decided adaptively."""
    seeds = (study.search.confirm_seed,)
    def with_seeds(config):
        return replace(config, protocol=replace(config.protocol, seeds=seeds))
    variants = [replace(study.baseline, config=with_seeds(study.baseline.config))]
    seen = {cell_hash(variants[0].config, 0)}
    for rank, (number, value, params) in enumerate(top_configs(study, ledger), start=1):
        config = with_seeds(study.config_with(params))
        if cell_hash(config, 0) in seen:
            continue  # the baseline itself, or a configuration already listed: nothing new to confirm
        seen.add(cell_hash(config, 0))
        knobs = ", ".join(f"{k}={value_text(v)}" for k, v in params.items())
        variants.append(Variant(f"top{rank}", f"trial {number} (search value {value:.4f}): {knobs}", dict(params), config))
    if len(variants) == 1:
        return None  # no finished trial, or only the baseline itself: nothing to confirm
    return Study(confirmation_name(study), f"confirmation of the search of {study.name}", tuple(variants),
                 study.source, replace(study.analysis, adaptive=True))


def confirmation_name(study: Study) -> str:
    return f"{study.name}-confirm"

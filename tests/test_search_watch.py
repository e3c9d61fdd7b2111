"""A search you can watch and stop: one line per trial, and a report (partial or whole) whose numbers
read like the study report's, whose history plots only finished trials' values, and whose parallel
coordinates draw one line per finished trial. The end-to-end stop (SIGINT, kill -9, rerun) is in
test_search.py, on the search that test already trains."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from chae_ablate.ledger import SearchTrial
from chae_ablate.search import SearchSummary, stop_name, trial_line
from chae_ablate.search_report import (fig_history, fig_parallel, fig_slices, knobs_text, short_names, trials_table,
                                       write_search_report)
from chae_ablate.study import load_study

from conftest import STUDIES


def test_a_trial_line_says_the_budget_used_the_trial_its_knobs_and_its_outcome():
    params = {"model.transformer.depth": 2, "model.transformer.dim": 96, "protocol.lr": 0.000316227766}
    assert trial_line(SearchTrial(4, params, False), "best loss 0.1234", 3, 12) == \
        "[3/12 trials] trial 4 depth=2 dim=96 lr=0.0003162: best loss 0.1234"
    assert trial_line(SearchTrial(7, params, True), "pruned at epoch 1", 5, 12) == \
        "[5/12 trials] trial 7 (re-run) depth=2 dim=96 lr=0.0003162: pruned at epoch 1"


def test_knob_names_are_shortened_only_as_far_as_they_stay_apart():
    assert short_names(["model.conv.stages.0.kernel", "model.conv.stages.1.kernel", "protocol.lr"]) == {
        "model.conv.stages.0.kernel": "0.kernel", "model.conv.stages.1.kernel": "1.kernel", "protocol.lr": "lr"}
    assert short_names(["lr", "protocol.lr"]) == {"lr": "lr", "protocol.lr": "protocol.lr"}
    assert knobs_text({"protocol.lr": 1e-7, "model.transformer.heads": 4, "data.name": "x"}) == \
        "lr=1e-07 heads=4 name=x"


def test_a_stop_is_named_by_its_signal():
    assert stop_name(KeyboardInterrupt()) == "SIGINT"
    assert stop_name(SystemExit(143)) == "SIGTERM"
    assert stop_name(SystemExit("the task could not be requeued")) == "exit the task could not be requeued"


STUDY = load_study(STUDIES / "search-quickstart.yaml")


def trial(number: int, state: str, value: float | None = None, pruned_at: int | None = None,
          loss_when_pruned: float | None = None, reason: str = "", retry_of: int | None = None, **knobs) -> dict:
    """A row as SearchLedger.trials gives it, with the quickstart search's knobs."""
    params = {"model.transformer.depth": 2, "model.transformer.heads": 4, "model.transformer.dim": 64,
              "model.conv.stages.0.kernel": 3, "protocol.lr": 1e-3 * (1 + number)}
    params.update({k.replace("__", "."): v for k, v in knobs.items()})
    return {"number": number, "state": state, "value": value, "reason": reason, "pruned_at_epoch": pruned_at,
            "loss_when_pruned": loss_when_pruned, "params": params, "retry_of": retry_of}


PRUNED = trial(1, "pruned", pruned_at=1, loss_when_pruned=2.5)
NOT_TRAINED = [trial(2, "rejected", reason="trial 2.model.transformer.heads: 3 does not divide dim 64",
                     model__transformer__heads=3),
               trial(3, "failed", reason="cell trial3 seed 0: CUDA out of memory"),
               trial(4, "failed"),  # a stopped worker's: re-queued
               trial(5, "queued", retry_of=4)]
CASES = {
    "none finished": [PRUNED, *NOT_TRAINED],
    "one finished": [trial(0, "done", 0.8123), PRUNED, *NOT_TRAINED],
    "many finished": [trial(0, "done", 0.8123), PRUNED, *NOT_TRAINED, trial(6, "done", 0.7, retry_of=4),
                      trial(7, "done", math.inf), trial(8, "done", 0.75, protocol__lr=1e-4),
                      trial(9, "done", 0.9, model__transformer__depth=3, protocol__lr=1e-2)],
    "nothing yet": [],
}


def finished_values(trials: list[dict]) -> dict[int, float]:
    return {t["number"]: t["value"] for t in trials
            if t["state"] == "done" and t["value"] is not None and math.isfinite(t["value"])}


@pytest.mark.parametrize("case", CASES)
def test_a_search_report_shows_no_raw_floats_and_no_partial_loss_as_a_value(case, tmp_path):
    trials = CASES[case]
    interrupted = "" if case == "many finished" else "SIGINT"  # a partial report of what is done
    summary = SearchSummary("s-search", trials, None, 12, interrupted=interrupted)
    path = write_search_report(STUDY, summary, {}, {1: 1.0}, 0.1234567, out_dir=tmp_path)
    text, page = path.read_text(), (tmp_path / "report.html").read_text()
    for shown in (text, re.sub(r"data:image/png;base64,[^\"]+", "", page)):
        assert not re.search(r"\b(nan|NaN|inf|None)\b", shown)
        assert not re.search(r"\d\.\d{5,}", shown)  # no raw float (0.1234567, 0.0010000000000000002)
    assert ("Partial report: the search was interrupted (SIGINT)" in text) == bool(interrupted)
    assert "Not run yet: the search was interrupted" in text if interrupted else "Nothing to confirm" in text
    if trials:
        assert "| 1 | pruned | – | 2.5000 (epoch 1) |" in text  # its partial loss apart, never as its value
        assert "| 4 | interrupted, re-queued | – |" in text and "| 5 | queued | – | – | 4 |" in text
        assert "3 does not divide dim 64" in text and "trial 3: cell trial3 seed 0: CUDA out of memory" in text
    for number, value in finished_values(trials).items():
        assert f"| {number} | finished | {value:.4f} |" in text
    assert ("| 7 | finished, a seed diverged | – |" in text) == (case == "many finished")
    for name in ("history", "parallel", "importances", "slices"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 5000


@pytest.mark.parametrize("case", CASES)
def test_the_history_plots_only_finished_values_on_an_integer_trial_axis(case):
    trials = CASES[case]
    ax, strip = fig_history(trials_table(trials)).axes
    values = finished_values(trials)
    points = np.vstack([c.get_offsets() for c in ax.collections]) if ax.collections else np.empty((0, 2))
    assert sorted(map(tuple, points)) == sorted(values.items())  # the one scatter: finished trials' values
    for line in ax.get_lines():  # the best so far, from finished values only
        assert set(line.get_ydata()) <= set(values.values()) and set(line.get_xdata()) <= set(values)
    assert not strip.collections and strip.get_ylim() == (0, 1) and not list(strip.get_yticks())  # no loss axis
    without = {x for line in strip.get_lines() for x in line.get_xdata()}
    assert without == {t["number"] for t in trials if t["state"] in ("pruned", "failed", "rejected")}
    assert all(float(x).is_integer() for x in strip.get_xticks())
    assert [t.get_text() for t in strip.texts] == (["1"] if trials else [])  # the epoch trial 1 was pruned at


@pytest.mark.parametrize("case", CASES)
def test_parallel_coordinates_draw_one_line_per_finished_trial_the_best_in_red(case):
    trials = CASES[case]
    fig = fig_parallel(trials_table(trials), list(STUDY.space))
    ax = fig.axes[0]
    values = finished_values(trials)
    assert len(ax.get_lines()) == len(values)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["depth", "heads", "dim", "kernel", "lr", "value"]
    red = [line for line in ax.get_lines() if line.get_color() == "tab:red"]
    if values:
        best = min(values, key=values.get)
        assert len(red) == 1 and red[0].get_label() == f"best: trial {best} ({values[best]:.4f})"
        ys = np.array([line.get_ydata() for line in ax.get_lines()], dtype=float)
        assert np.nanmin(ys) >= 0 and np.nanmax(ys) <= 1  # every knob scaled onto its axis
        assert len(fig.axes) == 2  # and a colourbar of the value
    else:
        assert not red


@pytest.mark.parametrize("case", CASES)
def test_slices_show_each_knobs_space_and_only_finished_values(case):
    """Before, a partial report with no finished trial drew empty panels on made-up axes (value
    -0.04..0.04, lr 1..10)."""
    trials = CASES[case]
    fig = fig_slices(trials_table(trials), list(STUDY.space))
    values = finished_values(trials)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert [t.get_text() for t in panels["protocol.lr"].get_xticklabels()] == ["0.0001", "0.001", "0.01"]
    assert [t.get_text() for t in panels["model.transformer.heads"].get_xticklabels()] == ["2", "3", "4", "8"]
    for ax in panels.values():
        points = ax.collections[0].get_offsets()
        assert sorted(points[:, 1]) == sorted(values.values())  # finished values only, never inf
        assert ((points[:, 0] >= 0) & (points[:, 0] <= 1)).all()  # inside the knob's space
        assert ([t.get_text() for t in ax.texts] == ["no finished trial yet"]) == (not values)


class StoppedLedger:
    """What stopped() reads of a search's ledger: its trials, nothing left to hand back."""

    def __init__(self, states: dict[int, str]):
        self.states = states

    def release_all(self, why: str) -> list[int]:
        return []

    def trials(self) -> list[dict]:
        return [trial(n, state) for n, state in self.states.items()]

    def used(self, finished: bool = False) -> int:
        return sum(state in ("done", "pruned") for state in self.states.values())


@pytest.mark.parametrize("state, said", [
    ("pruned", ""),  # the stop came after trial 1 was told, before the searcher moved on
    ("running", "; trial 1 goes back to the queue once the grace period has passed")])
def test_a_stop_says_a_trial_goes_back_only_while_it_is_running(state, said):
    """Before, a SIGINT just after '[2/12 trials] trial 1 ...: pruned at epoch 1' ended with 'trial 1
    goes back to the queue once the grace period has passed', of a trial already ended."""
    from types import SimpleNamespace
    from chae_ablate.search import stopped
    study = load_study(STUDIES / "search-quickstart.yaml")
    summary = SearchSummary("search-quickstart-search", [], None, 12, interrupted="SIGINT")
    searcher = SimpleNamespace(handed_back=[], training=1)
    line = stopped(study, summary, StoppedLedger({0: "pruned", 1: state}), searcher, [], False, {}, 0.1)
    done = 2 if state == "pruned" else 1
    assert line == (f"search of search-quickstart interrupted (SIGINT): {done} of 12 trials trained{said}; "
                    "rerun the same command to resume")


def test_a_resumed_seeded_search_proposes_new_knobs_not_its_first_trials_again(tmp_path):
    """Before, a search stopped after 2 trials and rerun asked its seeded sampler afresh, which drew
    trial 0's and trial 1's knobs again: trials 2 and 3 repeated them and used two of the budget."""
    from chae_ablate.ledger import SearchLedger
    study = load_study(STUDIES / "search-quickstart.yaml")
    def ledger():
        return SearchLedger("s-trials", f"sqlite:///{tmp_path / 'o.db'}", "tpe", "baseline", seed=0, budget=12,
                            curve={1: 1.0}, margin=0.1, epochs=1)
    first = ledger()
    asked = [first.ask(study.space) for _ in range(2)]
    for trial in asked:
        first.finish(trial, None, pruned_at=1)
    resumed = [ledger().ask(study.space).params for _ in range(2)]
    assert all(params not in [t.params for t in asked] for params in resumed)
    fresh = SearchLedger("other-trials", f"sqlite:///{tmp_path / 'o.db'}", "tpe", "baseline", seed=0, budget=12,
                         curve={1: 1.0}, margin=0.1, epochs=1)
    assert fresh.ask(study.space).params == asked[0].params  # a search from the start is still reproducible


def test_a_resumed_cell_is_pruned_by_its_checkpointed_epochs_before_training_on():
    """Before, the epochs a resumed cell's checkpoint held were reported without asking the pruner: a
    repeated configuration of a pruned trial trained on past the epoch that had pruned it."""
    from types import SimpleNamespace
    from chae_ablate.runner import CellPruned, EpochReporter
    reported = []
    def report(epoch, loss):
        reported.append(epoch)
        return loss > 1.0  # the pruner: worse than the baseline's curve
    reporter = EpochReporter(report, lambda: set(), lambda: None)
    reporter.run = SimpleNamespace(log_missed_epochs=lambda history: None)
    with pytest.raises(CellPruned) as pruned:
        reporter.log_missed_epochs([{"val_loss": 0.9}, {"val_loss": 1.2}, {"val_loss": 1.3}])
    assert pruned.value.epoch == 2 and reported == [1, 2]

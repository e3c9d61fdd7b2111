"""`chae-ablate search`: the space is validated like the rest of a study; a search keeps its budget
exactly through kill -9, prunes hopeless trials against the baseline, counts rejected combinations,
and ends with a confirmation on fresh seeds."""
from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import threading
import time

import mlflow
import optuna
import pandas as pd
import pytest
from typer.testing import CliRunner

from chae_ablate.cli import app
from chae_ablate.errors import ConfigError
from chae_ablate.search import trials_name
from chae_ablate.study import load_study, seed_sequence, study_from_dict
from chae_ablate.studyfile import read_study_file

from conftest import STUDIES, chae as cli, chae_here


def space(**knobs) -> dict:
    return {"name": "s", "search": {"space": knobs}}


@pytest.mark.parametrize("knobs, message", [
    ({"model.transformer.dept": [1, 2]}, "search.space.model.transformer.dept: unknown key 'dept' (did you mean 'depth'?)"),
    ({"model.conv.stages.9.kernel": [3]}, "search.space.model.conv.stages.9.kernel: no item '9'"),
    ({"protocol.lr": {"low": 0.1, "high": 0.01}}, "search.space.protocol.lr: empty range (low 0.1 must be below high 0.01)"),
    ({"protocol.lr": {"low": 0.0, "high": 0.01, "log": True}}, "search.space.protocol.lr.low: a log range needs low > 0"),
    ({"protocol.lr": {"low": -1.0, "high": 0.01, "log": True}}, "search.space.protocol.lr.low: a log range needs low > 0"),
    ({"model.transformer.depth": []}, "search.space.model.transformer.depth: empty list"),
    ({"model.transformer.depth": {"lo": 1, "high": 3}}, "search.space.model.transformer.depth.lo: unknown key"),
    ({"model.transformer.depth": [[1]]}, "is not a single value"),
    ({"protocol.lr": ["1e-4", 1.0e-3]},  # before: accepted, then every trial rejected by the builder
     "search.space.protocol.lr: '1e-4' is text, not a number (YAML reads '1e-4' as text; write it as 0.0001)"),
])
def test_bad_spaces_are_one_line_errors_naming_the_field(knobs, message):
    with pytest.raises(ConfigError) as err:
        study_from_dict(space(**knobs), {})
    assert str(err.value).startswith(message) or message in str(err.value)
    assert "\n" not in str(err.value)


def test_search_settings_are_validated():
    for settings, message in [({"sampler": "cmaes"}, "search.sampler: 'cmaes' is not one of tpe, gp, random"),
                              ({"trials": 0}, "search.trials: 0 must be > 0"),
                              ({"confirm_seed": 0, "seeds": [0, 1]}, "search.confirm_seed: 0 must be above")]:
        raw = space(**{"protocol.lr": [0.001, 0.01]})
        raw["search"].update(settings)
        with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
            study_from_dict(raw, {})


def test_the_shipped_search_study_and_fresh_confirmation_seeds():
    study = load_study(STUDIES / "search-quickstart.yaml")
    assert [k.path for k in study.space] == ["model.transformer.depth", "model.transformer.heads",
                                              "model.transformer.dim", "model.conv.stages.0.kernel", "protocol.lr"]
    assert study.space[3].integer and study.space[4].log and not study.space[4].integer
    with pytest.raises(ConfigError, match="heads: 3 does not divide dim 64"):
        study.config_with({"model.transformer.heads": 3, "model.transformer.dim": 64})
    assert seed_sequence([1000], 4) == [1000, 1001, 1002, 1003]  # never a search seed
    assert seed_sequence([0, 1, 2], 5) == [0, 1, 2, 3, 4]


SEARCH = """
base: {quickstart}
name: tinysearch
variants: {{{drops}}}
model: {{resolution: 16}}
protocol: {{epochs: 2}}
analysis: {{min_seeds: 2, max_seeds: 2, margin: 0.5, relative: false}}  # one look: 6 confirmation cells, not 9
search:
  trials: 6
  top_k: 2
  seeds: [0]
  space:  # 3 trainable configurations: a repeated one is recorded at once, and the kill needs one training
    protocol.lr: [1.0e-7, 1.0e-3, 2.0e-3, 3.0e-3]  # 1e-7 is hopeless: pruned after its first epoch
    model.transformer.heads: [3, 5, 4]              # 3 and 5 do not divide dim 128: rejected (the baseline has 8)
"""



class Output:
    """A process's merged output, read by a thread as it comes, so a test can wait for a line."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(process.stdout), daemon=True)
        self.thread.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)


def trials_of(study, storage: str) -> list:
    try:
        return optuna.load_study(study_name=trials_name(study, 6), storage=storage).get_trials()
    except Exception:  # not created yet
        return []


def wait_until(ready, process: subprocess.Popen, output: Output | None = None, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(0.2)
    assert process.poll() is None, output.text if output else process.communicate()[0]


def trained(trials, state) -> int:
    return sum(t.user_attrs.get("outcome") == "trained" and state(t.state) for t in trials)


TRIAL_ENDED = re.compile(r"^\[\d/6 trials\] trial \d+ .*: (best loss \d\.\d{4}|pruned at epoch \d)$", re.MULTILINE)


@pytest.mark.slow
def test_search_interrupted_killed_and_rerun_keeps_its_budget_prunes_rejects_and_confirms(tmp_path, monkeypatch):
    """Ctrl-C (SIGINT) after two trials: one line, the held trial back in the queue, a partial report;
    then kill -9 mid-trial; then a rerun that uses the budget exactly, once per trial."""
    drops = ", ".join(f"{v.name}: null" for v in load_study(STUDIES / "quickstart.yaml").variants[1:])
    (tmp_path / "s.yaml").write_text(SEARCH.format(quickstart=STUDIES / "quickstart.yaml", drops=drops))
    study = load_study(tmp_path / "s.yaml")
    storage = f"sqlite:///{tmp_path}/runs/optuna.db"
    running = lambda t: t == optuna.trial.TrialState.RUNNING  # noqa: E731

    stopped = cli("search", "s.yaml", "--no-progress", cwd=tmp_path, start_new_session=True)
    output = Output(stopped)
    wait_until(lambda: len(TRIAL_ENDED.findall(output.text)) >= 2 and trained(trials_of(study, storage), running),
               stopped, output)
    os.kill(stopped.pid, signal.SIGINT)  # mid-trial: Ctrl-C
    assert stopped.wait(timeout=120) == 130, output.text
    output.thread.join(timeout=10)
    lines = output.text.splitlines()
    assert lines[0] == "search of tinysearch: training the baseline first (1 cell)", lines
    assert len([line for line in lines if "interrupted" in line]) == 1 and "Traceback" not in output.text, lines
    assert re.fullmatch(r"search of tinysearch interrupted \(SIGINT\): [23] of 6 trials trained; trial \d+ returned "
                        r"to the queue; partial report: reports/tinysearch-search/report.md; rerun the same command "
                        r"to resume", lines[-1]), lines[-1]
    for name in optuna.get_all_study_names(storage):  # the baseline's cells and the search's trials
        assert not any(t.state == optuna.trial.TrialState.RUNNING
                       for t in optuna.load_study(study_name=name, storage=storage).get_trials()), name
    partial = (tmp_path / "reports" / "tinysearch-search" / "report.md").read_text()
    assert "Partial report: the search was interrupted (SIGINT)" in partial
    for t in trials_of(study, storage):
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert f"| {t.number} | finished | {t.value:.4f} |" in partial

    victim = cli("search", "s.yaml", "--no-progress", cwd=tmp_path, start_new_session=True)
    wait_until(lambda: trained(trials := trials_of(study, storage), lambda s: s.is_finished()) >= 4
               and trained(trials, running), victim)
    os.killpg(victim.pid, signal.SIGKILL)  # mid-trial
    victim.wait()

    monkeypatch.chdir(tmp_path)  # the rerun goes in this process: no interpreter to start
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rerun = chae_here("search", "s.yaml", "--no-progress")  # the kill seen at once
    assert rerun.exit_code == 0 and "search report: reports/tinysearch-search/report.md" in rerun.output, rerun.output
    trials = pd.read_csv(tmp_path / "reports" / "tinysearch-search" / "trials.csv")
    budget = trials[trials["state"].isin(["done", "pruned"])]
    assert len(budget) == 6  # exactly the budget, though one trial was interrupted and one killed mid-way
    knobs = [c for c in trials.columns if "." in c]
    stopped = trials[(trials["state"] == "failed") & trials["reason"].isna()]  # the SIGINT's and the kill's
    assert len(stopped) == 2
    for row in stopped.itertuples():  # each re-run once, with the same knobs, in the budget
        rerun = budget[budget["retry_of"] == row.trial]
        assert len(rerun) == 1 and (rerun[knobs].iloc[0] == trials.loc[row.Index, knobs]).all()
    hopeless = budget[budget["protocol.lr"] == 1e-7]  # trained trials (the killed and the rejected trained nothing)
    assert len(hopeless) and (hopeless["state"] == "pruned").all()
    assert (hopeless["pruned_at_epoch"] < 2).all()  # before their last epoch
    assert hopeless["value"].isna().all() and hopeless["loss_when_pruned"].notna().all()  # a partial loss is no value
    rejected = trials[trials["state"] == "rejected"]
    assert len(rejected) >= 1  # two thirds of the space: six trials without one would be a 1-in-700 draw
    assert rejected["model.transformer.heads"].isin([3, 5]).all()
    assert rejected["reason"].str.contains("does not divide dim").all()

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tinysearch-search").experiment_id],
                              "tags.`chae.role` = 'cell'")
    trial_runs = [r for r in runs if r.data.tags["variant"].startswith("trial")]
    names = [r.data.tags["variant"] for r in trial_runs]
    assert len(names) == len(set(names))  # no trial ran twice (the killed one's run was continued)
    configs = {tuple(sorted((k, str(v)) for k, v in row.items() if "." in k)) for _, row in budget.iterrows()}
    assert len({r.data.tags["cell_hash"] for r in trial_runs}) == len(configs)  # every trained config has a run

    report = (tmp_path / "reports" / "tinysearch-search" / "report.md").read_text()
    assert "## Which knobs mattered" in report and "## Confirmation on fresh seeds" in report
    assert "Budget: 6 trained trials (rejected" in report
    confirm = pd.read_csv(tmp_path / "reports" / "tinysearch-confirm" / "summary.csv")
    assert confirm["variant"].tolist()[0] == "baseline" and 2 <= len(confirm) <= 3
    cells = pd.read_csv(tmp_path / "reports" / "tinysearch-confirm" / "results.csv")
    assert cells["seed"].min() >= 1000  # fresh seeds


def test_search_without_a_search_section_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["search", str(STUDIES / "synthetic-tiny.yaml")])
    assert result.exit_code == 1 and "has no search: section" in result.output


def test_a_search_is_keyed_by_everything_that_shapes_its_trials():
    """Space, seeds, epochs (the baseline), sampler, pruner and budget name the trials study; how
    many configurations are confirmed does not."""
    raw = read_study_file(STUDIES / "search-quickstart.yaml")

    def name(search: dict | None = None, overrides: dict | None = None, budget: int = 12) -> str:
        changed = copy.deepcopy(raw)
        changed["search"].update(search or {})
        return trials_name(study_from_dict(changed, overrides or {}), budget)

    assert name().startswith("search-quickstart-search-trials-") and name() == name()
    assert name({"top_k": 1}) == name() and name({"confirm_seed": 2000}) == name()
    others = [name(budget=13), name(overrides={"protocol.epochs": 2}), name({"seeds": [0, 1]}),
              name({"sampler": "random"}), name({"pruner": "none"}), name({"space": {"protocol.lr": [0.001, 0.01]}}),
              name(overrides={"analysis.vary_split": True}), name(overrides={"analysis.margin": 0.2})]
    assert len({name(), *others}) == 9


MICRO_SEARCH = """
base: {tiny}
name: micro
variants: {{depth2: null}}
protocol: {{epochs: 1, seeds: [0]}}
analysis: {{min_seeds: 2, max_seeds: 2, margin: 0.5, relative: false}}
search:
  trials: 2
  top_k: 1
  seeds: [0]
  pruner: none
  space:
    protocol.lr: {lrs}
"""


@pytest.mark.slow
def test_a_changed_search_starts_new_trials_and_the_old_stay_readable(workdir, capsys):
    """Before, trials were keyed by the study's name only: a rerun with another space counted the old
    trials against the new budget and ranked them in its top-k."""
    from chae_ablate.runner import RunOptions
    from chae_ablate.search import run_search

    path = workdir / "micro.yaml"
    options = RunOptions(progress=False)
    path.write_text(MICRO_SEARCH.format(tiny=STUDIES / "synthetic-tiny.yaml", lrs="[1.0e-3, 3.0e-3]"))
    first = load_study(path)
    run_search(first, options, report=False)  # the reports read below are the second search's
    old_name = trials_name(first, 2)
    path.write_text(MICRO_SEARCH.format(tiny=STUDIES / "synthetic-tiny.yaml", lrs="[1.0e-2, 3.0e-2]"))
    second = load_study(path)
    summary = run_search(second, options)
    err = capsys.readouterr().err
    assert f"search of micro changed (space): its trials start afresh in {trials_name(second, 2)}" in err
    assert old_name in err
    assert {t["params"]["protocol.lr"] for t in summary.trials} <= {1e-2, 3e-2}  # none of the first search's
    assert len([t for t in summary.trials if t["state"] == "done"]) == 2
    storage = options.storage_url
    old = optuna.load_study(study_name=old_name, storage=storage).get_trials()
    assert {t.params["protocol.lr"] for t in old} <= {1e-3, 3e-3} and len(old) >= 2  # still readable
    confirm = pd.read_csv(workdir / "reports" / "micro-confirm" / "summary.csv")
    assert confirm["description"].iloc[1].split("protocol.lr=")[1] in ("0.01", "0.03")  # its top-1 is the new search's

    run_search(second, RunOptions(progress=False, fresh=True), report=False)  # forgets this search, not the earlier one
    names = set(optuna.get_all_study_names(storage))
    assert old_name in names and trials_name(second, 2) in names
    assert len(optuna.load_study(study_name=trials_name(second, 2), storage=storage).get_trials()) == 2  # anew


def test_the_search_report_states_the_budget_in_force_and_no_partial_loss_as_a_value(workdir):
    """A search run with --trials had its report print the study file's budget; a pruned trial's
    last partial loss (Optuna's value for a pruned trial) stood in the value column."""
    from chae_ablate.search import SearchSummary
    from chae_ablate.search_report import write_search_report
    study = load_study(STUDIES / "search-quickstart.yaml")
    knobs = {k.path: (k.choices[0] if k.choices else k.low) for k in study.space}
    trials = [{"number": 0, "state": "done", "value": 0.8, "reason": "", "pruned_at_epoch": None,
               "loss_when_pruned": None, "params": knobs, "retry_of": None},
              {"number": 1, "state": "done", "value": 0.7, "reason": "", "pruned_at_epoch": None,
               "loss_when_pruned": None, "params": knobs, "retry_of": None},
              {"number": 2, "state": "pruned", "value": None, "reason": "", "pruned_at_epoch": 1,
               "loss_when_pruned": 2.5, "params": knobs, "retry_of": None}]
    budget = study.search.trials - 1
    path = write_search_report(study, SearchSummary("s-search", trials, None, budget), {}, {1: 1.0}, 0.1,
                               out_dir=workdir / "report")
    text = path.read_text()
    assert f"Budget: {budget} trained trials (--trials; the study file says {study.search.trials})" in text
    table = pd.read_csv(workdir / "report" / "trials.csv")
    pruned = table[table["state"] == "pruned"].iloc[0]
    assert pd.isna(pruned["value"]) and pruned["loss_when_pruned"] == 2.5


def test_worker_trials_belongs_to_a_search(workdir):
    result = CliRunner().invoke(app, ["worker", str(STUDIES / "synthetic-tiny.yaml"), "--trials", "3"])
    assert result.exit_code == 1 and "worker --trials: only with --search" in result.output


HOPELESS_SEARCH = """
base: {tiny}
name: hopeless
variants: {{depth2: null}}
protocol: {{epochs: 1, seeds: [0]}}
analysis: {{min_seeds: 2, max_seeds: 2, margin: 0.001, relative: false}}
search:
  trials: 1
  top_k: 1
  seeds: {seeds}
  pruner: baseline
  space:
    protocol.lr: [{lr}]
"""


@pytest.mark.slow
def test_a_one_seed_trial_is_never_pruned_after_its_last_epoch(workdir):
    """Before, a one-epoch search pruned its hopeless trial after its only epoch: no training saved,
    and the finished value thrown away. With two seeds, pruning there still saves the second seed."""
    from chae_ablate.runner import RunOptions
    from chae_ablate.search import run_search

    path, options = workdir / "hopeless.yaml", RunOptions(progress=False)
    path.write_text(HOPELESS_SEARCH.format(tiny=STUDIES / "synthetic-tiny.yaml", seeds="[0, 1]", lr="1.0e-7"))
    two = run_search(load_study(path), options, report=False)
    assert [(t["state"], t["pruned_at_epoch"]) for t in two.trials] == [("pruned", 1)]  # the pruner says stop
    assert two.confirmation is None

    path.write_text(HOPELESS_SEARCH.format(tiny=STUDIES / "synthetic-tiny.yaml", seeds="[0]", lr="2.0e-7"))  # not the cell above
    one = run_search(load_study(path), options, report=False)
    assert [t["state"] for t in one.trials] == ["done"]
    # as hopeless as the pruned one (one epoch at lr 2e-7 or 1e-7 barely moves the weights): a value the
    # pruner would have stopped, kept
    assert one.trials[0]["value"] == pytest.approx(two.trials[0]["loss_when_pruned"], rel=1e-3)


def test_a_stop_while_the_baseline_trains_is_said_in_one_line(workdir, capsys, monkeypatch):
    """Before, the cell's own 'stopped ... handed back' line came first, then the search's."""
    from chae_ablate.ledger.queue import Claim
    from chae_ablate.runner import RunOptions
    from chae_ablate.search import run_search

    def interrupted(claim, epoch, loss):
        raise KeyboardInterrupt
    monkeypatch.setattr(Claim, "report", interrupted)
    path = workdir / "hopeless.yaml"
    path.write_text(HOPELESS_SEARCH.format(tiny=STUDIES / "synthetic-tiny.yaml", seeds="[0]", lr="1.0e-7"))
    with pytest.raises(KeyboardInterrupt):
        run_search(load_study(path), RunOptions(progress=False), report=False)
    said = [line for line in capsys.readouterr().err.splitlines() if "training the baseline first" not in line]
    assert said == ["search of hopeless interrupted (SIGINT) while training the baseline, before any trial; "
                    "cell baseline/seed0 handed back to the queue; rerun the same command to resume"]

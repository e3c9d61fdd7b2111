"""A study's versions: cells are identified by the configuration they trained, so an edited study
keeps its earlier cells apart (never in the statistics), says what changed, refuses a second file
under the same name, and marks decision settings changed after results were seen."""
from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from typer.testing import CliRunner

from chae_ablate import versions
from chae_ablate.cli import app
from chae_ablate.errors import ChaeError
from chae_ablate.runner import RunOptions, run_study
from chae_ablate.study import load_study, study_from_dict

from conftest import STUDIES, slow_study, chae as run_cli

TINY = STUDIES / "synthetic-tiny.yaml"
cli = CliRunner()


def plan_of(overrides: dict | None = None, path: Path = TINY):
    return load_study(path, overrides or {}).plan()


# --- what changed -------------------------------------------------------------------------------

def test_a_change_every_variant_shares_is_said_once():
    assert versions.changes(plan_of(), plan_of({"protocol.epochs": 6})) == ["protocol.epochs 2 -> 6"]


def test_changes_name_variants_added_removed_and_their_own_settings(tmp_path):
    raw = {"name": "t", "variants": {"k5": {"set": {"model.conv.stages.0.kernel": 5}},
                                     "deep": {"set": {"model.transformer.depth": 3}}}}
    old = study_from_dict(raw, {}).plan()
    raw["variants"] = {"k5": {"set": {"model.conv.stages.0.kernel": 7}}, "wide": {"set": {"model.transformer.dim": 256}}}
    new = study_from_dict(raw, {"analysis.alpha": 0.01}).plan()
    assert versions.changes(old, new) == ["variant k5: model.conv.stages.0.kernel 5 -> 7", "variant wide added",
                                          "variant deep removed", "analysis.alpha 0.05 -> 0.01"]


def test_the_same_plan_has_the_same_fingerprint_and_any_change_another():
    assert plan_of().fingerprint == plan_of().fingerprint
    fingerprints = {plan_of(o).fingerprint for o in ({}, {"protocol.epochs": 3}, {"analysis.margin": 0.1},
                                                      {"protocol.seeds": [0, 1, 2]})}
    assert len(fingerprints) == 4


# --- two files, one name ------------------------------------------------------------------------

def test_another_file_with_other_contents_under_a_recorded_name_is_refused(tmp_path):
    mine, other = tmp_path / "a.yaml", tmp_path / "b.yaml"
    mine.write_text(TINY.read_text())
    other.write_text(TINY.read_text().replace("lr: 3.0e-3", "lr: 1.0e-3"))
    recorded = [versions.new_version(plan_of(path=mine), None, 0)]
    versions.refuse_other_file(plan_of(path=mine), recorded, "here")  # the same file: fine
    versions.refuse_other_file(plan_of({"protocol.epochs": 3}, mine), recorded, "here")  # edited: goes on
    copied = tmp_path / "copy" / "a.yaml"  # the same contents elsewhere (another machine's checkout)
    copied.parent.mkdir()
    copied.write_text(mine.read_text())
    versions.refuse_other_file(plan_of(path=copied), recorded, "here")
    with pytest.raises(ChaeError, match=rf"^study name 'synthetic-tiny' is already used in here by {mine}, and "
                                        rf"{other} is a different study; give one of them its own `name:`"):
        versions.refuse_other_file(plan_of(path=other), recorded, "here")


def tree(folder: Path) -> dict[str, str]:
    """Every file under folder with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_two_study_files_with_one_name_the_second_is_refused_and_writes_nothing(workdir):
    (workdir / "a.yaml").write_text(TINY.read_text().replace("epochs: 2", "epochs: 1"))
    (workdir / "b.yaml").write_text(TINY.read_text().replace("epochs: 2", "epochs: 1").replace("lr: 3.0e-3", "lr: 1.0e-3"))
    first = cli.invoke(app, ["run", "a.yaml", "--no-progress", "--no-report"])
    assert first.exit_code == 0, first.output
    before = tree(workdir)
    for args in (["run", "b.yaml", "--no-progress"], ["run", "b.yaml", "--fresh"], ["worker", "b.yaml"],
                 ["report", "b.yaml"]):
        result = cli.invoke(app, args)
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert "is already used in the" in result.output and "b.yaml is a different study" in result.output
        assert tree(workdir) == before  # nothing written: not the ledger, MLflow, checkpoints nor caches


# --- analysis settings changed after results were seen --------------------------------------------

def test_decision_settings_changed_after_results_are_kept_with_the_version():
    before = versions.new_version(plan_of(), None, results_seen=0)
    assert before.analysis_changed == ()
    fresh = versions.new_version(plan_of({"analysis.margin": 0.2}), before, results_seen=0)
    assert fresh.analysis_changed == ()  # set before any result of its cells: fixed in advance
    late = versions.new_version(plan_of({"analysis.margin": 0.2}), before, results_seen=3)
    assert late.analysis_changed == ("analysis.margin 0.05 -> 0.2",)
    kept = versions.new_version(plan_of({"analysis.margin": 0.2, "protocol.seeds": [0, 1, 2]}), late, results_seen=4)
    assert kept.analysis_changed == late.analysis_changed  # more seeds do not make the late margin early
    in_ledger = versions.Version.from_json(before.to_json(with_plan=False))  # the ledger keeps no plan
    assert in_ledger.plan is None and in_ledger.decision == before.decision
    assert versions.new_version(plan_of({"analysis.margin": 0.2}), in_ledger, 3).analysis_changed == late.analysis_changed
    restored = versions.new_version(plan_of({"analysis.vary_split": True}), before, results_seen=0)
    assert restored.analysis_changed == ()


def test_margin_changed_after_results_is_recorded_and_reported(workdir, capsys):
    raw = {"name": "margin", "data": {"source": "synthetic", "synthetic_classes": 2, "synthetic_per_class": 12},
           "protocol": {"epochs": 1, "seeds": [0, 1], "augment": {"copies": 0}},
           "model": {"resolution": 16, "conv": {"stages": [{"channels": 4}, {"channels": 4}]},
                     "transformer": {"depth": 1, "heads": 1, "dim": 4, "mlp_hidden": [4]}},
           "variants": {"lr": {"set": {"protocol.lr": 0.01}}}}
    source = workdir / "margin.yaml"
    options = RunOptions(progress=False)
    first = run_study(study_from_dict(raw, {}, source), options)
    text = first.report.read_text()
    assert "Warning" not in text
    raw["analysis"] = {"margin": 0.5}
    second = run_study(study_from_dict(raw, {}, source), options)  # trains nothing: every cell is done
    err = capsys.readouterr().err
    assert "study margin changed since the version first run" in err and "analysis.margin 0.05 -> 0.5" in err
    assert "analysis.margin 0.05 -> 0.5 set after 4 result(s) were seen" in err
    verdicts = second.report.read_text().split("## Verdicts against the baseline")[1].split("##")[0]
    assert "Warning: analysis.margin 0.05 -> 0.5 changed after 4 of this plan's results were seen" in verdicts
    assert [c.state for c in second.cells] == ["done"] * 4


# --- edit, rerun, kill: the scenario of the issue ---------------------------------------------------


@pytest.mark.slow
def test_an_edited_study_killed_mid_rerun_reports_only_its_own_cells(tmp_path, monkeypatch):
    """Run a study, change protocol.epochs, rerun, kill -9 after the first new cell, report: only
    the new version's cells are in the statistics; the earlier ones are listed apart with what
    changed, and `status` counts them apart. Before cell identity, the report paired the new
    baseline with the old variant and said '4 of 4 needed cells are in the statistics'."""
    monkeypatch.chdir(tmp_path)  # the user's folder: its runs/, mlflow.db and reports/
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study = tmp_path / "s.yaml"
    study.write_text(slow_study("edited").replace("epochs: 6", "epochs: 1").replace("seeds: [0]", "seeds: [0, 1]"))
    done = cli.invoke(app, ["run", "s.yaml", "--no-progress", "--no-report"])  # in here: only the victim is killed
    assert done.exit_code == 0, done.output
    old = {c.cell_hash for c in load_study(study).plan().cells}
    study.write_text(study.read_text().replace("epochs: 1", "epochs: 2"))
    new = {c.cell_hash for c in load_study(study).plan().cells}
    assert old.isdisjoint(new)

    victim = run_cli("run", "s.yaml", "--no-progress", cwd=tmp_path, start_new_session=True)
    ledger = optuna.load_study(study_name="edited", storage=f"sqlite:///{tmp_path}/runs/optuna.db")
    deadline = time.time() + 600
    while time.time() < deadline and victim.poll() is None:
        finished = [t for t in ledger.get_trials() if t.state == optuna.trial.TrialState.COMPLETE
                    and t.user_attrs["cell_hash"] in new]
        if finished:
            break
        time.sleep(0.2)
    assert victim.poll() is None, victim.communicate()[0]
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    out = victim.stdout.read()
    assert "changed since the version first run" in out and "protocol.epochs 1 -> 2" in out

    report = cli.invoke(app, ["report", "edited"])
    assert report.exit_code == 0, report.output
    results = pd.read_csv(tmp_path / "reports" / "edited" / "results.csv")
    assert set(results["cell_hash"]) == new  # one row per cell of the new version, none of the old
    counted = results[results["in_stats"]]
    assert 1 <= len(counted) < 4 and set(counted["cell_hash"]) <= new
    text = (tmp_path / "reports" / "edited" / "report.md").read_text()
    assert f"{len(counted)} of 4 needed cells are in the statistics. The study is not complete" in text
    section = text.split("## Cells of other versions of this study")[1].split("##")[0]
    assert "from an earlier version of this study" in section and "4 cells (4 done)" in section
    assert "changed: protocol.epochs 1 -> 2" in section

    status = cli.invoke(app, ["status", str(study), "--runs-dir", str(tmp_path / "runs")])
    assert status.output.splitlines()[-1] == "kept apart: 4 cells of other versions of this study (4 done), not counted"

    rerun = cli.invoke(app, ["run", "s.yaml", "--no-progress"])  # the killed run is seen gone at once
    assert rerun.exit_code == 0, rerun.output
    results = pd.read_csv(tmp_path / "reports" / "edited" / "results.csv")
    assert set(results["cell_hash"]) == new and results["in_stats"].all()

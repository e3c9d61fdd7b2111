"""Results where researchers work: chae_ablate.api in a notebook or script, and `--json` on
`plan`, `status` and `report`, read against the files the report writes and MLflow itself."""
from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import chae_ablate
from chae_ablate.cli import app
from chae_ablate.errors import ChaeError
from chae_ablate.metrics import EPOCH_METRICS, Metric

from conftest import REPO, STUDIES

TINY = STUDIES / "synthetic-tiny.yaml"  # 2 variants x 2 seeds x 2 epochs, seconds on a CPU
runner = CliRunner()


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The tiny study run once, as a user would, in a folder of its own, its ledger a journal file
    (as on a cluster's shared disk)."""
    folder = tmp_path_factory.mktemp("ran")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("TQDM_DISABLE", "1")
        result = runner.invoke(app, ["run", str(TINY), "--no-progress", "--storage", journal(folder)])
        assert result.exit_code == 0, result.output
    return folder


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A notebook started in another folder, with no MLflow settings."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def journal(folder) -> str:
    return f"journal:{folder / 'ledger.journal'}"


def strict(text: str):
    """JSON as any reader parses it: NaN or Infinity (Python's extensions) fail the test."""
    def refuse(constant):
        raise AssertionError(f"{constant} in JSON output")
    return json.loads(text, parse_constant=refuse)


def csv(folder, name: str) -> pd.DataFrame:
    """A report's CSV as pandas reads it by default (an empty text cell is NaN)."""
    return pd.read_csv(folder / "reports" / "synthetic-tiny" / name)


def as_in_csv(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.replace("", float("nan"))


def test_results_and_verdicts_are_the_reports_csvs(ran, elsewhere):
    study = chae_ablate.load(TINY, folder=ran)
    results, verdicts = study.results(), study.verdicts()
    assert len(results) == 4 and (results["state"] == "done").all() and results["in_stats"].all()
    assert list(results["variant"]) == ["baseline", "baseline", "depth2", "depth2"]
    assert results["run_id"].str.len().gt(0).all()
    pd.testing.assert_frame_equal(as_in_csv(results), csv(ran, "results.csv"), check_dtype=False)
    pd.testing.assert_frame_equal(as_in_csv(verdicts), csv(ran, "summary.csv"), check_dtype=False)
    assert not list(elsewhere.iterdir())  # read only: no store, no folder created where it runs


def test_curves_are_mlflows_epoch_metrics_of_the_plans_cells(ran, elsewhere):
    study = chae_ablate.load(TINY, folder=ran)
    curves, results = study.curves(), study.results()
    assert list(curves.columns) == ["variant", "seed", "cell_hash", "run_id", "epoch", *EPOCH_METRICS]
    assert len(curves) == 4 * 2 and sorted(set(curves["epoch"])) == [1, 2]
    client = MlflowClient(f"sqlite:///{ran / 'mlflow.db'}")
    for r in results.itertuples():
        rows = curves[curves["cell_hash"] == r.cell_hash].sort_values("epoch")
        assert set(rows["run_id"]) == {r.run_id} and set(rows["variant"]) == {r.variant}
        logged = [m.value for m in sorted(client.get_metric_history(r.run_id, Metric.VAL_LOSS), key=lambda m: m.step)]
        assert rows[Metric.VAL_LOSS].tolist() == logged
        assert min(logged) == pytest.approx(r.best_val_loss)


def test_figures_are_the_reports_as_matplotlib_figures(ran, elsewhere):
    figures = chae_ablate.load(TINY, folder=ran).figures()
    assert list(figures) == ["differences", "val_loss_curves", "params_vs_metric"]
    assert all(isinstance(f, Figure) and f.axes for f in figures.values())
    assert sorted(p.stem for p in (ran / "reports" / "synthetic-tiny" / "figures").glob("*.png")) == sorted(figures)


def test_plan_rows_and_plan_json_agree(ran):
    from chae_ablate.builders import count_parameters
    from chae_ablate.model import build_model
    study = chae_ablate.load(TINY, folder=ran)
    plan = study.plan()
    assert list(plan["variant"]) == ["baseline", "depth2"] and list(plan.columns) == [
        "variant", "changes", "resolution", "tokens", "params", "mflops", "memory_mb", "seeds"]
    assert plan["params"][0] == count_parameters(build_model(study.study.baseline.config.model, 3))
    result = runner.invoke(app, ["plan", str(TINY), "--json"])
    assert result.exit_code == 0, result.output
    data = strict(result.stdout)
    assert data["variants"] == json.loads(plan.to_json(orient="records", double_precision=15))
    assert (data["cells_min"], data["cells_max"], data["epochs"], data["classes"]) == (4, 4, 2, 3)
    assert data["spread_from"] is None


def test_status_json_and_status_rows_read_the_ledger(ran, monkeypatch):
    monkeypatch.chdir(ran)
    result = runner.invoke(app, ["status", str(TINY), "--json", "--storage", journal(ran)])
    assert result.exit_code == 0, result.output
    data = strict(result.stdout)
    assert data["counts"] == {"queued": 0, "running": 0, "done": 4, "failed": 0, "pruned": 0, "missing": 0}
    assert data["total"] == 4 and data["complete"] and data["kept_apart"] == {}
    by_hash = {c["cell_hash"]: c for c in data["cells"]}
    results = csv(ran, "results.csv")
    for r in results.itertuples():
        assert by_hash[r.cell_hash]["best_val_loss"] == pytest.approx(r.best_val_loss)
    assert {d["variant"] for d in data["undecided"]} <= {"depth2"}
    rows = chae_ablate.load(TINY, storage=journal(ran)).status()  # MLflow: the folder here
    assert list(rows["cell_hash"]) == list(results["cell_hash"]) and (rows["state"] == "done").all()
    with pytest.raises(ChaeError, match="study synthetic-tiny: not in the ledger .*optuna.db; start it first"):
        chae_ablate.load(TINY).status()  # the default ledger (runs/optuna.db) was never used here


def test_report_json_is_the_summary(ran, monkeypatch, tmp_path):
    monkeypatch.chdir(ran)
    result = runner.invoke(app, ["report", "synthetic-tiny", "--json", "--out", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    data = strict(result.stdout)
    assert data["report"] == str(tmp_path / "again" / "report.md") and data["mlflow"].startswith("http")
    summary = csv(ran, "summary.csv")
    assert [v["variant"] for v in data["variants"]] == list(summary["variant"])
    for row, r in zip(data["variants"], summary.to_dict(orient="records")):
        for key, value in r.items():
            if isinstance(value, float) and not math.isfinite(value):
                assert row[key] is None, key  # strict JSON: NaN is null
            elif key != "needs":
                assert row[key] == (pytest.approx(value) if isinstance(value, float) else value), key


def test_parquet_beside_each_csv_with_the_same_columns_and_values(ran):
    for name in ("results", "summary"):
        folder = ran / "reports" / "synthetic-tiny"
        pd.testing.assert_frame_equal(as_in_csv(pd.read_parquet(folder / f"{name}.parquet")),
                                      csv(ran, f"{name}.csv"), check_dtype=False)


def test_a_changed_study_counts_none_of_the_earlier_versions_cells(ran, elsewhere):
    study = chae_ablate.load(TINY, folder=ran, overrides={"protocol.epochs": 3})
    results = study.results()
    assert len(results) == 4 and (results["state"] == "missing").all() and not results["in_stats"].any()
    assert set(results["cell_hash"]).isdisjoint(csv(ran, "results.csv")["cell_hash"])
    assert study.curves().empty


def test_a_store_at_a_uri_and_missing_stores(ran, elsewhere):
    uri = f"sqlite:///{ran / 'mlflow.db'}"
    assert len(chae_ablate.load(TINY, tracking_uri=uri).results()) == 4
    with pytest.raises(ChaeError, match="no MLflow store at .*mlflow.db; run a study here first"):
        chae_ablate.load(TINY).results()
    assert not (elsewhere / "mlflow.db").exists()
    renamed = elsewhere / "other.yaml"
    renamed.write_text(TINY.read_text().replace("name: synthetic-tiny", "name: never-run"))
    with pytest.raises(ChaeError, match="no MLflow experiment named 'never-run'"):
        chae_ablate.load(renamed, folder=ran).results()


def test_refresh_reads_the_store_again(ran, elsewhere):
    study = chae_ablate.load(TINY, folder=ran)
    first = study.results()
    assert study.results() is not first and study.refresh().results().equals(first)


def test_the_example_script_runs_on_a_study(ran, elsewhere, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["from_python.py", str(TINY), str(ran)])
    runpy.run_path(str(REPO / "examples" / "from_python.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "depth2" in out and "3 figures: differences, val_loss_curves, params_vs_metric" in out
    assert (elsewhere / "differences.png").stat().st_size > 1000


def test_json_output_is_strict_and_errors_stay_one_line():
    result = runner.invoke(app, ["status", str(TINY), "--json", "--storage", "sqlite:////nonexistent/x.db"])
    assert result.exit_code == 1 and result.stdout == ""  # nothing half-written on stdout
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_no_color_leaves_errors_uncoloured(monkeypatch):
    bad = ["plan", str(STUDIES / "nope.yaml")]
    assert "\x1b[31m" in runner.invoke(app, bad, color=True).stderr
    monkeypatch.setenv("NO_COLOR", "1")
    result = runner.invoke(app, bad, color=True)
    assert result.exit_code == 1 and "\x1b[" not in result.stderr and "study file not found" in result.stderr


def test_shell_completion_is_offered(tmp_path):
    """The installed command prints bash's completion script (the shell found from its parent)."""
    command = Path(sys.executable).with_name("chae-ablate")
    shown = subprocess.run(["bash", "-c", f"'{command}' --show-completion"], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "complete " in shown.stdout and "_CHAE_ABLATE_COMPLETE=complete_bash" in shown.stdout
    assert "--install-completion" in runner.invoke(app, ["--help"]).stdout

"""The comparison report: exact statistics against scipy, honest single-seed wording,
partial studies, and one end-to-end run through a real MLflow store."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats as sps

from chae_ablate import report, stats
from chae_ablate.errors import ChaeError

try:
    from chae_ablate import tracking
except ImportError:  # the lead's module may not exist yet
    tracking = None

N_EPOCHS = 5
KNOWN = {  # variant -> {seed: lowest validation loss}
    "baseline": {0: 0.50, 1: 0.52, 2: 0.51},
    "better": {0: 0.40, 1: 0.425, 2: 0.41},
    "worse": {0: 0.70, 1: 0.71, 2: 0.73},
    "same": {0: 0.51, 1: 0.50, 2: 0.53},
    "welch": {5: 0.52, 6: 0.55},  # no seed shared with the baseline
}


def make_study(losses: dict[str, dict[int, float]], failed: dict[tuple[str, int], str] | None = None,
               missing: list[tuple[str, int]] = ()) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """(cells, epochs, plan) as tracking.load_study_runs returns them. Failed cells keep
    their place in the plan with NaN metrics; missing ones are planned but absent."""
    failed = failed or {}
    keys = [(v, s) for v, seeds in losses.items() for s in seeds] + list(failed) + list(missing)
    plan = [{"variant": v, "seed": s, "cell_hash": f"h-{v}-{s}", "description": f"change {v}"} for v, s in keys]
    cells, epochs = [], []
    for i, (v, s) in enumerate(keys):
        if (v, s) in missing:
            continue
        loss = losses.get(v, {}).get(s, math.nan)
        metrics = {"best_val_loss": loss, "best_epoch": 4, "val_acc_at_best": 0.8 - loss / 10,
                   "test_loss": loss + 0.02, "test_acc": 0.85 - loss / 10, "n_params": 400_000 + 1000 * len(v),
                   "mflops": 100.0 + len(v), "images_per_s": 500.0, "wall_time_s": 600.0, "resolution": 256}
        if (v, s) in failed:
            metrics = dict.fromkeys(metrics, math.nan)
        cells.append({"run_id": f"r{i}", "variant": v, "seed": s, "cell_hash": f"h-{v}-{s}",
                      "description": f"change {v}", "status": "FAILED" if (v, s) in failed else "FINISHED",
                      "failure_reason": failed.get((v, s), ""), **metrics})
        for e in range(1, N_EPOCHS + 1):
            val = loss + 0.05 * (e - 4) ** 2
            epochs.append({"run_id": f"r{i}", "variant": v, "seed": s, "epoch": e, "train_loss": val - 0.05,
                           "train_acc": 0.7, "val_loss": val, "val_acc": 0.8 - val / 10})
    return pd.DataFrame(cells), pd.DataFrame(epochs), plan


def hand_holm(p: list[float]) -> list[float]:
    """Holm step-down written out longhand, independently of stats.holm."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


@pytest.fixture(scope="module")
def known_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("known")
    md = report.build_report("known", *make_study(KNOWN), out)
    return md, pd.read_csv(out / "summary.csv").set_index("variant"), pd.read_csv(out / "results.csv")


def test_summary_matches_scipy(known_report):
    _, summary, _ = known_report
    base = np.array(list(KNOWN["baseline"].values()))
    for variant, seeds in KNOWN.items():
        x, row = np.array(list(seeds.values())), summary.loc[variant]
        half = sps.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
        assert row["n"] == len(x)
        assert row["best_val_loss_mean"] == pytest.approx(x.mean(), abs=1e-12)
        assert row["best_val_loss_std"] == pytest.approx(x.std(ddof=1), abs=1e-12)
        ci = (row["best_val_loss_ci_low"], row["best_val_loss_ci_high"])
        assert ci == pytest.approx((x.mean() - half, x.mean() + half))
    p = {}
    for variant in ["better", "worse", "same"]:
        d = np.array(list(KNOWN[variant].values())) - base
        half = sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        row = summary.loc[variant]
        assert row["test"] == "paired t" and row["n_pairs"] == 3
        assert row["diff_vs_baseline"] == pytest.approx(d.mean())
        assert (row["diff_ci_low"], row["diff_ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half))
        p[variant] = sps.ttest_rel(list(KNOWN[variant].values()), base).pvalue
    welch = sps.ttest_ind(list(KNOWN["welch"].values()), base, equal_var=False)
    p["welch"] = welch.pvalue
    assert summary.loc["welch", "test"] == "Welch t"
    welch_mean = np.mean(list(KNOWN["welch"].values()))
    assert summary.loc["welch", "diff_vs_baseline"] == pytest.approx(welch_mean - base.mean())
    names = list(p)
    for name, want in zip(names, hand_holm([p[n] for n in names])):
        assert summary.loc[name, "p_value"] == pytest.approx(p[name], rel=1e-9)
        assert summary.loc[name, "p_holm"] == pytest.approx(want, rel=1e-9)
    assert summary["verdict"].to_dict() == {"baseline": "baseline", "better": "better", "worse": "worse",
                                            "same": "no significant difference", "welch": "no significant difference"}


def test_results_csv_has_every_cell(known_report):
    _, _, results = known_report
    assert len(results) == sum(map(len, KNOWN.values()))
    assert list(results["variant"].unique()) == list(KNOWN)  # study order, baseline first
    row = results[(results["variant"] == "better") & (results["seed"] == 1)].iloc[0]
    assert row["best_val_loss"] == 0.425
    assert row["diff_vs_baseline"] == pytest.approx(0.425 - 0.52)
    assert results["in_stats"].all()


def test_report_files_are_complete(known_report):
    md, summary, _ = known_report
    text, page = md.read_text(), (md.parent / "report.html").read_text()
    assert "This study does not support it" in text and "better" in text
    assert "<table" in page and ">worse</td>" in page and 'src="data:image/png;base64,' in page
    assert 'src="figures/' not in page  # self-contained
    pngs = sorted((md.parent / "figures").glob("*.png"))
    assert [p.name for p in pngs] == ["best_val_loss.png", "params_vs_loss.png", "val_loss_curves.png"]
    for png in pngs:
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.width > 400 and im.height > 300
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100  # not blank
        assert f"figures/{png.name}" in text


def test_one_seed_claims_no_significance(tmp_path):
    losses = {"baseline": {0: 0.5}, "heads4": {0: 0.45}, "deep": {0: 0.55}}
    md = report.build_report("single", *make_study(losses), tmp_path)
    text = md.read_text()
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("variant")
    assert "no significance can be claimed" in text.lower()
    assert "`heads4`, `deep`: at least 3 seeds per variant, e.g. `--seeds 0,1,2`" in text
    assert summary.loc[["heads4", "deep"], "verdict"].tolist() == ["n/a (1 seed)"] * 2
    assert summary.loc[["heads4", "deep"], "p_holm"].isna().all()


def test_one_seed_variant_gets_an_estimate_from_the_spread(tmp_path):
    losses = {"baseline": {0: 0.50, 1: 0.52, 2: 0.51}, "deep": {0: 0.55, 1: 0.56, 2: 0.53}, "heads4": {0: 0.47}}
    md = report.build_report("mixed", *make_study(losses), tmp_path)
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("variant")
    pooled = stats.pooled_std([list(losses["baseline"].values()), list(losses["deep"].values())])
    want = stats.seeds_needed(0.47 - 0.51, pooled * math.sqrt(2), alpha=0.05 / 2)
    assert summary.loc["heads4", "verdict"] == "n/a (1 seed)"
    assert summary.loc["heads4", "seeds_needed"] == want >= stats.MIN_SEEDS
    assert f"`heads4`: about {want} paired seeds" in md.read_text()


def test_failed_and_missing_cells_are_reported(tmp_path):
    losses = {"baseline": {0: 0.50, 1: 0.52}, "kernel5": {0: 0.49}, "heads4": {0: 0.51}}
    failed = {("kernel5", 1): "CUDA out of memory", ("dim96", 0): "loss became NaN"}
    cells, epochs, plan = make_study(losses, failed=failed, missing=[("heads4", 1)])
    md = report.build_report("partial", cells, epochs, plan, tmp_path)
    text = md.read_text()
    section = text.split("## Cells not in the statistics")[1].split("##")[0]
    assert "`kernel5` seed 1 (cell h-kernel5-1): failed: CUDA out of memory" in section
    assert "`dim96` seed 0 (cell h-dim96-0): failed: loss became NaN" in section
    assert "`heads4` seed 1 (cell h-heads4-1): missing" in section
    results = pd.read_csv(tmp_path / "results.csv")
    assert results.set_index(["variant", "seed"]).loc[("heads4", 1), "status"] == "MISSING"
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("variant")
    assert summary.loc["dim96", "n"] == 0 and summary.loc["dim96", "verdict"] == "n/a (no finished cell)"
    assert summary.loc["kernel5", "n"] == 1 and summary.loc["kernel5", "n_planned"] == 2
    assert "4 of 7 cells" in text
    assert "<li><code>kernel5</code> seed 1" in (tmp_path / "report.html").read_text()


def test_no_finished_baseline_gives_no_verdicts(tmp_path):
    losses = {"kernel5": {0: 0.49, 1: 0.50}, "heads4": {0: 0.51, 1: 0.53}}
    cells, epochs, plan = make_study(losses, failed={("baseline", 0): "diverged", ("baseline", 1): "diverged"})
    plan = plan[-2:] + plan[:-2]  # baseline first, as the runner writes it
    md = report.build_report("nobase", cells, epochs, plan, tmp_path)
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("variant")
    assert summary.index[0] == "baseline" and summary.loc["baseline", "n"] == 0
    assert set(summary.loc[["kernel5", "heads4"], "verdict"]) == {"n/a (no baseline)"}
    assert "baseline has no finished cell" in md.read_text()


def test_format_summary_table(known_report):
    _, summary, _ = known_report
    lines = report.format_summary_table(summary.reset_index()).splitlines()
    assert lines[0].split() == ["variant", "n", "best", "val", "loss", "test", "acc", "verdict"]
    assert len(lines) == 1 + len(KNOWN)
    assert lines[1].split()[:5] == ["baseline", "3/3", "0.510", "±", "0.010"]
    assert lines[2].endswith("better")


def test_empty_study_is_a_user_error(tmp_path):
    with pytest.raises(ChaeError, match="nothing to report"):
        report.build_report("empty", pd.DataFrame(), pd.DataFrame(), [], tmp_path)


def test_holm_and_seeds_needed():
    got = stats.holm([0.01, 0.04, math.nan, 0.03])
    assert got[[0, 1, 3]] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(got[2])
    assert stats.holm([0.5, 0.6]).tolist() == [1.0, 1.0]
    assert stats.seeds_needed(1.0, 1.0) == 10  # one-sample t, d=1, 80% power: the textbook n=10
    assert stats.seeds_needed(10.0, 1.0) == stats.MIN_SEEDS
    assert stats.seeds_needed(0.001, 1.0) is None


def _log_study(name: str, losses: dict[str, dict[int, float]], failed: dict, tmp_path) -> None:
    """Log a study the way the runner does: a parent run and one nested run per cell."""
    import mlflow

    cells, epochs, plan = make_study(losses, failed=failed)
    exp = mlflow.create_experiment(name, artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp, run_name=name, tags={"chae.role": "study"}):
        mlflow.log_dict({"cells": plan}, "plan.json")  # the layout tracking.StudyLog writes
        for c in cells.to_dict("records"):
            tags = {"chae.role": "cell", **{k: str(c[k]) for k in ["variant", "seed", "cell_hash", "description"]}}
            if c["failure_reason"]:
                tags["failure_reason"] = c["failure_reason"]
            mlflow.start_run(experiment_id=exp, run_name=f"{c['variant']}/seed{c['seed']}", nested=True, tags=tags)
            mlflow.log_param("model.resolution", 256)
            for e in epochs[epochs["run_id"] == c["run_id"]].to_dict("records"):
                metrics = {k: e[k] for k in ["train_loss", "train_acc", "val_loss", "val_acc"]}
                mlflow.log_metrics(metrics, step=e["epoch"])
            if c["status"] == "FINISHED":
                mlflow.log_metrics({k: c[k] for k in report.METRICS if k != "resolution"})
            mlflow.end_run(status=c["status"])


@pytest.mark.skipif(tracking is None or not hasattr(tracking, "load_study_runs"),
                    reason="chae_ablate.tracking.load_study_runs is not written yet")
def test_write_report_from_mlflow(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    losses = {"baseline": {0: 0.50, 1: 0.52}, "heads4": {0: 0.55, 1: 0.56}}
    _log_study("e2e", losses, {("heads4", 2): "CUDA out of memory"}, tmp_path)
    md = report.write_report("e2e")
    assert md.resolve() == (tmp_path / "reports" / "e2e" / "report.md").resolve()
    summary = pd.read_csv(md.parent / "summary.csv").set_index("variant")
    assert summary.loc["baseline", "best_val_loss_mean"] == pytest.approx(0.51)
    assert summary.loc["heads4", "test"] == "paired t"
    assert "CUDA out of memory" in md.read_text()
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("e2e")
    parent = client.search_runs([exp.experiment_id], "tags.`chae.role` = 'study'")[0]

    def walk(path=None):
        for f in client.list_artifacts(parent.info.run_id, path):
            yield from walk(f.path) if f.is_dir else [f.path]

    assert any(p.endswith("report.md") for p in walk())

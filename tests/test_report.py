"""The comparison report: exact statistics against scipy, honest single-seed wording,
partial studies, and one end-to-end run through a real MLflow store."""
from __future__ import annotations

import base64
import math
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from chae_ablate import report, stats, tracking
from chae_ablate.errors import ChaeError

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
    assert summary.loc["welch", "test"] == "Welch t" and summary.loc["welch", "n_pairs"] == 0
    welch_mean = np.mean(list(KNOWN["welch"].values()))
    assert summary.loc["welch", "diff_vs_baseline"] == pytest.approx(welch_mean - base.mean())
    welch_ci = welch.confidence_interval(0.95)
    assert (summary.loc["welch", "diff_ci_low"], summary.loc["welch", "diff_ci_high"]) == pytest.approx(
        (welch_ci.low, welch_ci.high))
    names = list(p)
    holm = multipletests([p[n] for n in names], method="holm")[1]  # statsmodels, not stats.holm
    for name, want in zip(names, holm):
        assert summary.loc[name, "p_value"] == pytest.approx(p[name], rel=1e-9)
        assert summary.loc[name, "p_holm"] == pytest.approx(want, rel=1e-9)
    assert summary.loc["better", "p_holm"] == pytest.approx(4 * p["better"])  # smallest of 4: times 4
    base_row = summary.loc["baseline"]
    assert base_row[["test", "diff_vs_baseline", "diff_ci_low", "diff_ci_high", "p_value", "p_holm"]].isna().all()
    assert summary["verdict"].to_dict() == {"baseline": "baseline", "better": "better", "worse": "worse",
                                            "same": "no significant difference", "welch": "no significant difference"}


def test_summary_metrics_are_the_seed_means(known_report):
    """Every other per-variant column is the mean (or the architecture's value) of the inputs."""
    _, summary, _ = known_report
    assert list(summary.index) == list(KNOWN)
    for variant, seeds in KNOWN.items():
        x, row = np.array(list(seeds.values())), summary.loc[variant]
        assert row["n_planned"] == len(x)
        assert row["best_epoch_mean"] == 4
        assert row["val_acc_at_best_mean"] == pytest.approx(np.mean(0.8 - x / 10))
        assert row["test_loss_mean"] == pytest.approx(x.mean() + 0.02)
        assert row["test_acc_mean"] == pytest.approx(np.mean(0.85 - x / 10))
        assert (row["n_params"], row["mflops"], row["resolution"]) == (400_000 + 1000 * len(variant),
                                                                       100.0 + len(variant), 256)
        assert (row["images_per_s_mean"], row["wall_time_s_mean"]) == (500.0, 600.0)
    assert summary["seeds_needed"].isna().all()  # every variant has 2+ seeds: no advice needed


def test_results_csv_has_every_cell(known_report):
    _, _, results = known_report
    assert len(results) == sum(map(len, KNOWN.values()))
    assert list(results["variant"].unique()) == list(KNOWN)  # study order, baseline first
    assert results[["variant", "seed"]].values.tolist() == [[v, s] for v, seeds in KNOWN.items() for s in seeds]
    assert (results["status"] == "FINISHED").all() and results["in_stats"].all()
    for r in results.itertuples():
        loss, base = KNOWN[r.variant][r.seed], KNOWN["baseline"].get(r.seed, math.nan)
        assert r.best_val_loss == loss and r.cell_hash == f"h-{r.variant}-{r.seed}"
        assert r.test_acc == pytest.approx(0.85 - loss / 10) and r.test_loss == pytest.approx(loss + 0.02)
        if r.variant == "welch":  # seeds 5 and 6 have no baseline cell to pair with
            assert math.isnan(r.diff_vs_baseline)
        else:
            assert r.diff_vs_baseline == pytest.approx(loss - base, abs=1e-12)
    row = results[(results["variant"] == "better") & (results["seed"] == 1)].iloc[0]
    assert row["diff_vs_baseline"] == pytest.approx(0.425 - 0.52)


def test_report_files_are_complete(known_report):
    md, summary, _ = known_report
    text, page = md.read_text(), (md.parent / "report.html").read_text()
    base, better = list(KNOWN["baseline"].values()), list(KNOWN["better"].values())
    paired = sps.ttest_rel(better, base)
    d, ci = np.subtract(better, base), paired.confidence_interval(0.95)
    # better has the smallest of the 4 p-values, so Holm multiplies it by 4
    claim = (f"This study does not support it: 1 of 4 variants beat the baseline (baseline 0.510 ± 0.010, n=3): "
             f"better {np.mean(better):.3f} (n=3, difference {d.mean():+.3f} [{ci.low:+.3f}, {ci.high:+.3f}], "
             f"p_holm={4 * paired.pvalue:.3f}). 1 variant(s) were significantly worse: worse.")
    assert claim in text
    assert "14 of 14 cells are in the statistics" in text and "over 5 epochs" in text
    assert "<table" in page and ">worse</td>" in page
    assert 'src="figures/' not in page  # self-contained
    pngs = sorted((md.parent / "figures").glob("*.png"))
    assert [p.name for p in pngs] == ["best_val_loss.png", "params_vs_loss.png", "val_loss_curves.png"]
    linked = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", text)
    assert sorted(linked) == [f"figures/{p.name}" for p in pngs]
    inlined = [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert inlined == [(md.parent / f).read_bytes() for f in linked]  # the HTML holds the same figures
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.format == "PNG"
            assert 600 <= im.width <= 2400 and 300 <= im.height <= 1600  # a few inches at ~120 dpi
            assert 1 <= im.width / im.height <= 3.5  # landscape, not a sliver
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100  # not blank


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
    base, deep = np.array([0.50, 0.52, 0.51]), np.array([0.55, 0.56, 0.53])
    pooled = math.sqrt((((base - base.mean()) ** 2).sum() + ((deep - deep.mean()) ** 2).sum()) / (2 + 2))
    effect = abs(0.47 - 0.51) / (pooled * math.sqrt(2))  # a difference of two cells has sd * sqrt(2)
    # paired (one-sample) t-test power at the strictest Holm level of 2 comparisons: n = 4.72
    n = TTestPower().solve_power(effect_size=effect, alpha=0.05 / 2, power=0.8, alternative="two-sided")
    want = max(stats.MIN_SEEDS, math.ceil(n))
    assert want == 5
    assert summary.loc["heads4", "verdict"] == "n/a (1 seed)"
    assert summary.loc["heads4", "seeds_needed"] == want
    assert summary.loc["heads4", "diff_vs_baseline"] == pytest.approx(0.47 - 0.51)
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


# Published worked examples of Holm's (1979) step-down method: (raw p, adjusted p, rejected at 0.05).
# Wikipedia, "Holm-Bonferroni method", section Example: four hypotheses at alpha = 0.05, H1 and H4
# rejected; adjusted p-values by the article's formula max_{j<=i} (m - j + 1) p_(j):
# 4 * 0.005, 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04).
WIKIPEDIA_HOLM = ([0.01, 0.03, 0.04, 0.005], [0.03, 0.06, 0.06, 0.02], [True, False, False, True])
# pingouin's documentation, pingouin.holm, Examples: 5 * 0.0003, 4 * 0.003, 3 * 0.054,
# max(2 * 0.32, 1 * 0.50).
PINGOUIN_HOLM = ([0.50, 0.003, 0.32, 0.054, 0.0003], [0.64, 0.012, 0.64, 0.162, 0.0015],
                 [False, True, False, False, True])


@pytest.mark.parametrize("raw, adjusted, rejected", [WIKIPEDIA_HOLM, PINGOUIN_HOLM], ids=["wikipedia", "pingouin"])
def test_holm_matches_published_examples(raw, adjusted, rejected):
    got = stats.holm(raw)
    assert got.tolist() == pytest.approx(adjusted, abs=1e-12)
    assert got.tolist() == pytest.approx(multipletests(raw, method="holm")[1].tolist(), abs=1e-12)
    assert (got < 0.05).tolist() == rejected


@pytest.mark.parametrize("raw", [[0.4, 0.45, 0.9], [0.01, 0.01, 0.02, 0.5], [0.2, 0.2, 0.2], [0.03],
                                 np.random.default_rng(0).uniform(0, 0.2, 12).tolist()],
                         ids=["capped", "ties", "all-equal", "one", "twelve"])
def test_holm_agrees_with_statsmodels(raw):
    assert stats.holm(raw).tolist() == pytest.approx(multipletests(raw, method="holm")[1].tolist(), abs=1e-12)


def test_holm_caps_at_one():
    assert stats.holm([0.4, 0.45, 0.9]).tolist() == [1.0, 1.0, 1.0]  # 3 * 0.4 = 1.2 -> 1


def test_holm_leaves_nans_out():
    """As stats.holm documents: NaNs stay NaN and do not count as comparisons, so the Wikipedia
    example with two NaNs mixed in is still corrected for m = 4, not 6."""
    nan = math.nan
    got = stats.holm([0.01, nan, 0.03, 0.04, nan, 0.005])
    assert np.isnan(got).tolist() == [False, True, False, False, True, False]
    assert got[~np.isnan(got)].tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-12)
    assert np.isnan(stats.holm([nan, 0.02])).tolist() == [True, False] and stats.holm([nan, 0.02])[1] == 0.02
    assert np.isnan(stats.holm([nan, nan])).all() and stats.holm([]).size == 0


# Fewest paired seeds for 80% power at alpha = 0.05, by Cohen's d; G*Power's one-sample t-test gives
# the same (d = 0.5: n = 34; d = 1: n = 10), checked here against statsmodels' power solver.
SEEDS_FOR_EFFECT = {0.5: 34, 0.8: 15, 1.0: 10, 1.5: 6, 2.0: 5, 3.0: 4}


@pytest.mark.parametrize("effect, n", SEEDS_FOR_EFFECT.items())
def test_seeds_needed_matches_t_test_power(effect, n):
    solved = TTestPower().solve_power(effect_size=effect, alpha=0.05, power=0.8, alternative="two-sided")
    assert math.ceil(solved) == n
    assert stats.seeds_needed(0.03 * effect, 0.03) == n
    assert stats.seeds_needed(-0.03 * effect, 0.03) == n  # the sign of the difference does not matter


def test_seeds_needed_edges():
    assert stats.seeds_needed(10.0, 1.0) == stats.MIN_SEEDS  # 2 would do; we ask for at least 3
    assert stats.seeds_needed(1.0, 0.0) == stats.MIN_SEEDS
    assert stats.seeds_needed(0.001, 1.0) is None  # d = 0.001 needs millions
    assert stats.seeds_needed(0.0, 1.0) is None
    with pytest.raises(ValueError, match="finite"):
        stats.seeds_needed(math.nan, 1.0)


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


def test_write_report_from_mlflow(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    losses = {"baseline": {0: 0.50, 1: 0.52}, "heads4": {0: 0.55, 1: 0.56}}
    _log_study("e2e", losses, {("heads4", 2): "CUDA out of memory"}, tmp_path)
    cells, epochs, plan = tracking.load_study_runs("e2e")
    assert sorted(zip(cells["variant"], cells["seed"], cells["status"])) == [
        ("baseline", 0, "FINISHED"), ("baseline", 1, "FINISHED"), ("heads4", 0, "FINISHED"),
        ("heads4", 1, "FINISHED"), ("heads4", 2, "FAILED")]
    assert len(epochs) == 5 * N_EPOCHS and len(plan) == 5
    md = report.write_report("e2e")
    assert md.resolve() == (tmp_path / "reports" / "e2e" / "report.md").resolve()
    summary = pd.read_csv(md.parent / "summary.csv").set_index("variant")
    assert summary.loc["baseline", "best_val_loss_mean"] == pytest.approx(0.51)
    assert summary.loc["heads4", "best_val_loss_mean"] == pytest.approx(0.555)
    assert (summary.loc["heads4", "n"], summary.loc["heads4", "n_planned"]) == (2, 3)
    assert summary.loc["heads4", "test"] == "paired t"
    assert summary.loc["heads4", "p_value"] == pytest.approx(sps.ttest_rel([0.55, 0.56], [0.50, 0.52]).pvalue)
    assert "`heads4` seed 2 (cell h-heads4-2): failed: CUDA out of memory" in md.read_text()
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("e2e")
    parent = client.search_runs([exp.experiment_id], "tags.`chae.role` = 'study'")[0]

    def walk(path=None):
        for f in client.list_artifacts(parent.info.run_id, path):
            yield from walk(f.path) if f.is_dir else [f.path]

    logged = set(walk())
    assert {"report/report.md", "report/report.html", "report/summary.csv", "report/results.csv",
            "report/figures/best_val_loss.png"} <= logged

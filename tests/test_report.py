"""The comparison report: every interval, p-value and verdict against scipy and statsmodels, the
claim's wording, adaptive and partial studies, real figures, and one end-to-end run through a real
MLflow store."""
from __future__ import annotations

import base64
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats as sps
from statsmodels.stats.power import TTestPower

from chae_ablate import files, report, tracking
from chae_ablate.analysis import Plan, outcome
from chae_ablate.config import AnalysisConfig, parse
from chae_ablate.errors import ChaeError
from chae_ablate.metrics import EPOCH_METRICS
from chae_ablate.records import CellRecord, CellState, PlannedCell
from chae_ablate.versions import new_version

from reference_stats import reference, spent

N_EPOCHS = 5
ALPHA = 0.05
SEEDS = [0, 1, 2, 3, 4, 5]
BASE = dict(zip(SEEDS, [0.50, 0.53, 0.47, 0.52, 0.49, 0.51]))  # spread wider than most differences:
DIFFS = {  # variant -> paired difference from the baseline, per seed   # only pairing decides these
    "better": [-0.10, -0.104, -0.098, -0.102, -0.10, -0.096],  # beyond any margin below 0
    "worse": [0.20, 0.204, 0.196, 0.202, 0.198, 0.20],
    "same": [0.002, -0.002, 0.001, -0.001, 0.0, 0.0],  # mean 0, tiny spread: equivalent
    "noisy": [0.06, -0.05, 0.04, -0.07, 0.05, -0.02],  # interval straddles 0 and the margin
    "slightly": [-0.010, -0.012, -0.009, -0.011, -0.010, -0.008],  # below 0, inside the margin
}
KNOWN = {"baseline": BASE, **{v: {s: BASE[s] + d for s, d in zip(SEEDS, ds)} for v, ds in DIFFS.items()}}
LABELS = {"baseline": "baseline", "better": "better", "worse": "worse", "same": "equivalent",
          "noisy": "undecided", "slightly": "better (less than the margin)"}


def make_study(losses: dict[str, dict[int, float]], failed: dict[tuple[str, int], str] | None = None,
               missing: list[tuple[str, int]] = (), analysis: dict | None = None,
               seeds: dict[str, list[int]] | None = None, name: str = "t",
               version: str = "h") -> tuple[Plan, list[CellRecord], pd.DataFrame]:
    """(plan, records, epochs) as tracking.load_study_runs gives them. Failed cells keep their place
    in the plan with no metrics; missing ones, and seeds listed in `seeds` without a value, are
    planned but have no record. Cell hashes are f"{version}-{variant}-{seed}"."""
    failed = failed or {}
    logged = [(v, s) for v, by_seed in losses.items() for s in by_seed] + list(failed)
    planned = list(dict.fromkeys(logged + list(missing) + [(v, s) for v, ss in (seeds or {}).items() for s in ss]))
    planned.sort(key=lambda vs: vs[0] != "baseline")  # the baseline first, as in every study
    by_variant: dict[str, tuple[int, ...]] = {}
    for v, s in planned:
        by_variant[v] = (*by_variant.get(v, ()), s)
    plan = Plan(name, tuple(PlannedCell(f"{version}-{v}-{s}", v, s, f"change {v}") for v, s in planned),
                {v: tuple((seeds or {}).get(v, ss)) for v, ss in by_variant.items()},
                parse(AnalysisConfig, analysis or {}, "analysis"),
                {v: {"model.resolution": 256} for v in by_variant})
    records, epochs = [], []
    for i, (v, s) in enumerate(logged):
        loss = losses.get(v, {}).get(s, math.nan)
        metrics = {"best_val_loss": loss, "best_epoch": 4, "val_acc_at_best": 0.8 - loss / 10,
                   "test_loss": loss + 0.02, "test_acc": 0.85 - loss / 10, "n_params": 400_000 + 1000 * len(v),
                   "mflops": 100.0 + len(v), "images_per_s": 500.0, "wall_time_s": 600.0}
        state = CellState.FAILED if (v, s) in failed else CellState.DONE
        records.append(CellRecord(f"{version}-{v}-{s}", v, s, state, metrics if state == CellState.DONE else {},
                                  f"mlflow run r{i}", f"r{i}", failed.get((v, s), "")))
        for e in range(1, N_EPOCHS + 1):
            val = loss + 0.05 * (e - 4) ** 2
            epochs.append({"run_id": f"r{i}", "variant": v, "seed": s, "epoch": e, "train_loss": val - 0.05,
                           "train_acc": 0.7, "val_loss": val, "val_acc": 0.8 - val / 10})
    return plan, records, pd.DataFrame(epochs, columns=["run_id", "variant", "seed", "epoch", *EPOCH_METRICS])


def read_csvs(out) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_csv(out / "summary.csv").set_index("variant"), pd.read_csv(out / "results.csv")


def paired(variant: str, losses=KNOWN, seeds=SEEDS) -> tuple[np.ndarray, np.ndarray]:
    """(variant, baseline) values on the given seeds, straight from the inputs."""
    return (np.array([losses[variant][s] for s in seeds]), np.array([losses["baseline"][s] for s in seeds]))


@pytest.fixture(scope="module")
def known_report(tmp_path_factory):
    """A fixed-design study with the default analysis (relative margin 5%, alpha 0.05)."""
    out = tmp_path_factory.mktemp("known")
    md, summary, written = report.build_report(*make_study(KNOWN, name="known"), out)
    assert summary.columns.tolist() == pd.read_csv(out / "summary.csv").columns.tolist()
    return md, *read_csvs(out), written


def test_intervals_and_p_values_match_the_reference(known_report):
    """Every interval against tests/reference_stats.py (statsmodels' two-way fit, scipy's t), the
    p-value against scipy at the interval's standard error, the detectable difference against
    statsmodels' power, and each verdict read off those intervals."""
    _, summary, _, _ = known_report
    m = len(DIFFS)
    a = ALPHA / m  # one look spends all of alpha, split over the m = 5 variants
    margin = 0.05 * abs(np.mean(list(BASE.values())))
    for variant in DIFFS:
        x, base = paired(variant)
        row, d = summary.loc[variant], x - base
        ref = reference(KNOWN, variant, a, 0.05, relative=True)
        assert row["level"] == pytest.approx(1 - a, abs=1e-15)
        df = len(SEEDS) - 1 if ref.variance == "own" else ref.df  # a noisier variant's own t
        assert (row["n_pairs"], row["looks"], row["variance"], row["df"]) == (len(SEEDS), 1, ref.variance, df)
        assert row["diff"] == pytest.approx(d.mean(), abs=1e-12)
        assert (row["diff_low"], row["diff_high"], row["eq_low"], row["eq_high"]) == pytest.approx(
            (ref.low, ref.high, ref.eq_low, ref.eq_high), rel=1e-9)
        if ref.variance == "shared":  # the difference detectable with 80% power by the shared t-test
            effect = TTestPower().solve_power(nobs=ref.df + 1, alpha=a, power=0.8, alternative="two-sided")
            assert row["detectable"] == pytest.approx(effect * ref.shared_se * math.sqrt(ref.df + 1), rel=1e-4)
        wins = (d < 0).sum() + 0.5 * (d == 0).sum()
        assert row["share_better"] == pytest.approx(wins / len(d))
        assert row["boot_low"] <= d.mean() <= row["boot_high"]
        assert row["verdict_code"] == ref.verdict and bool(row["within_margin"]) == ref.within
    assert summary.loc["same", "eq_high"] < margin
    base_row = summary.loc["baseline"]
    assert base_row[["n_pairs", "diff", "diff_low", "diff_high", "level", "eq_low", "eq_high"]].isna().all()
    assert summary["verdict"].to_dict() == LABELS  # the fixture covers every verdict


def test_relative_margin_is_a_fraction_of_the_baseline_mean(known_report):
    md, _, _, _ = known_report
    plan, records, _ = make_study(KNOWN)
    standing = outcome(plan, records)
    margin = 0.05 * abs(np.mean(list(BASE.values())))
    assert standing.margin == pytest.approx(margin, rel=1e-12)
    assert f"Margin: 5% of the baseline's mean = {margin:.4f}" in md.read_text()
    assert standing.complete and standing.n_looks == 1


def test_summary_metrics_are_the_seed_means(known_report):
    """Every descriptive column is the seed mean (and 95% t-interval) or the architecture's value."""
    _, summary, _, _ = known_report
    assert list(summary.index) == list(KNOWN)
    for variant, by_seed in KNOWN.items():
        x, row = np.array(list(by_seed.values())), summary.loc[variant]
        ci = sps.ttest_1samp(x, 0.0).confidence_interval(0.95)
        assert (row["n"], row["n_needed"], row["metric"]) == (len(x), len(x), "best_val_loss")
        assert row["mean"] == pytest.approx(x.mean(), abs=1e-12)
        assert row["sd"] == pytest.approx(x.std(ddof=1), abs=1e-12)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-12)
        assert row["best_val_loss_mean"] == pytest.approx(x.mean(), abs=1e-12)
        assert row["best_epoch_mean"] == 4
        assert row["val_acc_at_best_mean"] == pytest.approx(np.mean(0.8 - x / 10))
        assert row["test_loss_mean"] == pytest.approx(x.mean() + 0.02)
        assert row["test_acc_mean"] == pytest.approx(np.mean(0.85 - x / 10))
        assert (row["n_params"], row["mflops"], row["resolution"]) == (400_000 + 1000 * len(variant),
                                                                       100.0 + len(variant), 256)
        assert (row["images_per_s_mean"], row["wall_time_s_mean"]) == (500.0, 600.0)


def test_results_csv_has_every_needed_cell_with_same_seed_differences(known_report):
    _, _, results, _ = known_report
    assert results[["variant", "seed"]].values.tolist() == [[v, s] for v, by_seed in KNOWN.items() for s in by_seed]
    assert (results["status"] == "done").all() and results["in_stats"].all()
    for r in results.itertuples():
        loss = KNOWN[r.variant][r.seed]
        assert r.best_val_loss == loss and r.cell_hash == f"h-{r.variant}-{r.seed}"
        assert r.test_acc == pytest.approx(0.85 - loss / 10) and r.test_loss == pytest.approx(loss + 0.02)
        assert r.diff_vs_baseline == pytest.approx(loss - BASE[r.seed], abs=1e-12)
    row = results[(results["variant"] == "better") & (results["seed"] == 1)].iloc[0]
    assert row["diff_vs_baseline"] == pytest.approx(-0.104)


def test_conclusion_names_contradicting_and_supporting_variants(known_report):
    md, summary, _, _ = known_report
    text = md.read_text()
    x, base = paired("better")
    row, noisy = summary.loc["better"], summary.loc["noisy"]
    assert noisy["needs"].startswith("`noisy` ")  # how many seeds it would need, or that over 100 would
    want = (f"In this study the claim is contradicted: contradicted by 1 variant(s) that beat the baseline by "
            f"more than noise: `better` {np.mean(x - base):+.3f} [{row.diff_low:+.3f}, {row.diff_high:+.3f}] (n=6); "
            f"supported by 2 variant(s): `worse` worse, `same` equivalent; 1 variant(s) beat it by less than "
            f"the margin, which the claim allows: `slightly`; undecided for 1 variant(s) ({noisy['needs']}): "
            f"`chae-ablate run STUDY --adaptive` adds seeds where they are undecided.")
    assert want in text
    assert "(this study trained 5)" in text  # not the paper's 20 epochs
    assert "36 of 36 needed cells are in the statistics" in text and "not complete" not in text


def conclusion_of(md) -> str:
    return md.read_text().split("## Conclusion\n\n")[1].split("\n")[0]


def test_conclusion_ends_with_one_full_stop(known_report):
    assert not conclusion_of(known_report[0]).endswith("..")


def test_conclusion_words_pending_variants_as_pending(tmp_path):
    losses = {"baseline": {0: 0.50, 1: 0.52}, "kernel5": {0: 0.49, 1: 0.47}, "heads4": {0: 0.51}}
    md, _, _ = report.build_report(*make_study(losses, missing=[("heads4", 1)]), tmp_path)
    text = conclusion_of(md)
    assert "n=nan" not in text and "undecided" not in text and "pending" in text


@pytest.mark.parametrize("drop, verdict", [(["better", "noisy"], "supported"), (["better"], "not yet settled")])
def test_claim_is_supported_only_when_nothing_is_open(tmp_path, drop, verdict):
    losses = {k: v for k, v in KNOWN.items() if k not in drop}
    md, summary, _ = report.build_report(*make_study(losses), tmp_path)
    assert f"In this study the claim is {verdict}: supported by 2 variant(s)" in md.read_text()
    assert summary["level"].dropna().unique() == pytest.approx([1 - ALPHA / (len(losses) - 1)])


def test_report_files_and_figures_are_real(known_report):
    md, _, _, written = known_report
    out = md.parent
    assert sorted(p.relative_to(out).as_posix() for p in written) == sorted(
        [*report.REPORT_FILES, *report.PARQUET_FILES, "figures/differences.png", "figures/val_loss_curves.png",
         "figures/params_vs_metric.png"])
    assert all(p.is_file() for p in written)
    text, page = md.read_text(), (out / "report.html").read_text()
    linked = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", text)
    assert linked == ["figures/differences.png", "figures/val_loss_curves.png", "figures/params_vs_metric.png"]
    assert 'src="figures/' not in page  # self-contained
    inlined = [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert inlined == [(out / f).read_bytes() for f in linked]  # the HTML holds the same figures, in order
    assert "<table" in page and ">equivalent</td>" in page and ">better (less than the margin)</td>" in page
    for name in linked:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.format == "PNG"
            assert 600 <= im.width <= 2400 and 300 <= im.height <= 1600  # a few inches at ~120 dpi
            assert 1 <= im.width / im.height <= 3.5  # landscape, not a sliver
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100  # not blank


def test_every_report_file_is_written_atomically(tmp_path, monkeypatch):
    """SLURM tasks rewrite a report at once and `run` reads summary.csv back: every file is written
    under a temporary name and renamed into place, so a reader never meets half of one."""
    replaced, real = [], files.os.replace
    monkeypatch.setattr(files.os, "replace", lambda src, dst: (replaced.append(Path(dst)), real(src, dst)))
    _, _, written = report.build_report(*make_study(KNOWN), tmp_path)
    assert sorted(replaced) == sorted(written) and len(written) == 9  # 4 report files, 2 Parquet, 3 figures
    assert [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")] == []


def test_forest_plot_colours_its_verdicts(known_report):
    md, _, _, _ = known_report
    with Image.open(md.parent / "figures" / "differences.png") as im:
        rgb = np.asarray(im.convert("RGB"), dtype=int)
    for colour in [(44, 160, 44), (214, 39, 40), (31, 119, 180)]:  # tab:green better, tab:red worse, tab:blue
        near = (np.abs(rgb - np.array(colour)).sum(axis=-1) < 15).sum()
        assert near > 50, colour


def test_format_summary_table(known_report):
    _, summary, _, _ = known_report
    lines = report.format_summary_table(summary.reset_index()).splitlines()
    assert lines[0].split() == ["variant", "seeds", "best_val_loss", "difference", "[interval", "its", "verdict",
                                "is", "read", "from,", "at", "its", "look's", "level]", "verdict"]
    assert len(lines) == 1 + len(KNOWN)
    base = np.array(list(BASE.values()))
    assert lines[1].split() == ["baseline", "6/6", f"{base.mean():.3f}", "±", f"{base.std(ddof=1):.3f}", "baseline"]
    x, b = paired("worse")
    ref = reference(KNOWN, "worse", ALPHA / len(DIFFS), 0.05, relative=True)
    assert f"{np.mean(x - b):+.3f} [{ref.low:+.3f}, {ref.high:+.3f}]" in lines[2 + list(DIFFS).index("worse")]
    x, b = paired("same")  # equivalent: the TOST interval it was read from, inside the margin
    ref = reference(KNOWN, "same", ALPHA / len(DIFFS), 0.05, relative=True)
    assert f"{np.mean(x - b):+.3f} [{ref.eq_low:+.3f}, {ref.eq_high:+.3f}] (TOST)" in lines[2 + list(DIFFS).index("same")]
    assert lines[-1].endswith("better (less than the margin)")
    assert report.summary_table_text(known_report[0].parent).splitlines() == lines


def test_plan_json_reads_plans_and_legacy_lists():
    cells = [{"variant": "baseline", "seed": 1, "cell_hash": "a"}, {"variant": "baseline", "seed": 0, "cell_hash": "b"},
             {"variant": "k5", "seed": "0", "cell_hash": "c"}]
    legacy = Plan.from_json(cells, "old")
    assert (legacy.study, legacy.analysis, dict(legacy.seeds)) == ("old", AnalysisConfig(), {"baseline": (1, 0), "k5": (0,)})
    assert [c.cell_hash for c in legacy.cells] == ["a", "b", "c"]
    plan = Plan.from_json({"cells": cells, "analysis": {"adaptive": True, "margin": 0.1, "relative": False},
                           "seeds": {"baseline": [3, 1, 2], "k5": [3, 1, 2]}})
    assert plan.analysis == AnalysisConfig(adaptive=True, margin=0.1, relative=False)
    assert dict(plan.seeds) == {"baseline": (3, 1, 2), "k5": (3, 1, 2)}  # draw order kept, not sorted
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.fingerprint == plan.fingerprint
    with pytest.raises(ChaeError, match="analysis.alpha"):
        Plan.from_json({"cells": cells, "analysis": {"alpha": 2.0}})


ADAPTIVE = {"adaptive": True, "min_seeds": 3, "max_seeds": 6, "margin": 0.05, "relative": False}  # looks 3, 6
FAST = [-0.30, -0.31, -0.29]  # decided at the first look
SLOW = [0.01, -0.02, 0.03, -0.01, 0.02, 0.00]  # undecided at 3 seeds, equivalent at 6


def adaptive_losses(slow_seeds: int = 6) -> dict[str, dict[int, float]]:
    return {"baseline": {s: BASE[s] for s in SEEDS},
            "fast": {s: BASE[s] + d for s, d in zip(SEEDS, FAST)},
            "slow": {s: BASE[s] + d for s, d in list(zip(SEEDS, SLOW))[:slow_seeds]}}


def test_adaptive_study_reports_only_the_needed_cells(tmp_path):
    """The plan lists 6 seeds per variant; `fast` is decided at 3, so its seeds 3-5 are not needed
    and are neither listed as missing nor counted; `slow` and the baseline run all 6."""
    losses = adaptive_losses()
    plan, records, epochs = make_study(losses, analysis=ADAPTIVE, seeds={v: SEEDS for v in losses})
    assert len(plan.cells) == 18
    md, summary, _ = report.build_report(plan, records, epochs, tmp_path)
    summary, results = read_csvs(tmp_path)
    assert results[["variant", "seed"]].values.tolist() == [[v, s] for v, by_seed in losses.items() for s in by_seed]
    assert (results["status"] == "done").all()
    first, last = (spent(ALPHA, [3, 6], k) / 2 for k in (0, 1))  # m = 2 variants, looks at 3 and 6 seeds
    knew = [{v: SEEDS[:3] for v in losses}, {"baseline": SEEDS, "fast": SEEDS[:3], "slow": SEEDS}]
    for variant, look, a, code in [("fast", 0, first, "better"), ("slow", 1, last, "equivalent")]:
        seen = {v: {s: losses[v][s] for s in seeds} for v, seeds in knew[look].items()}
        ref, row, n = reference(seen, variant, a, 0.05), summary.loc[variant], [3, 6][look]
        assert (row["n_needed"], row["n_pairs"], row["looks"]) == (n, n, look + 1)
        assert row["verdict_code"] == code == ref.verdict
        assert (row["diff_low"], row["diff_high"]) == pytest.approx((ref.low, ref.high), rel=1e-9)
        assert row["level"] == pytest.approx(1 - a)
    ref3 = reference({v: {s: losses[v][s] for s in SEEDS[:3]} for v in losses}, "slow", first, 0.05)
    assert ref3.verdict == "undecided"  # at the first look slow was undecided
    assert summary.loc["baseline", "n_needed"] == 6
    text = md.read_text()
    assert "Seeds: adaptive, 3 to 6 seeds." in text and "looks at 3, 6 seeds (K = 2)" in text
    assert "15 cells ran, against 18 with 6 seeds everywhere: 3 cells saved (17%)" in text
    assert "None: all 15 needed cells finished." in text


def test_cells_beyond_the_needed_seeds_stay_out_of_the_statistics(tmp_path):
    """fast is decided at 3 seeds; seeds 3-5 were logged anyway (the study once ran with a fixed
    design, or its margin changed). Its row must describe the seeds its verdict used: 3, not 6."""
    losses = adaptive_losses()
    losses["fast"] = {s: BASE[s] + d for s, d in zip(SEEDS, FAST + [0.3, 0.3, 0.3])}
    md, _, _ = report.build_report(*make_study(losses, analysis=ADAPTIVE, seeds={v: SEEDS for v in losses}), tmp_path)
    summary, results = read_csvs(tmp_path)
    assert summary.loc["fast", "verdict"] == "better" and summary.loc["fast", "n_pairs"] == 3
    x = np.array([losses["fast"][s] for s in SEEDS[:3]])
    assert summary.loc["fast", "mean"] == pytest.approx(x.mean())
    assert summary.loc["fast", "n"] == 3
    assert results[results["variant"] == "fast"]["seed"].tolist() == SEEDS[:3]  # the others are not needed
    assert "of this plan but not needed by its looks (an earlier design's seeds): 3 cells (3 done)" in md.read_text()


def test_an_unfinished_look_leaves_the_study_incomplete(tmp_path):
    """slow's second-look cells (and the baseline's) never ran: they are listed as missing, slow keeps
    its first-look verdict, and fast's decision stands."""
    losses = adaptive_losses(slow_seeds=3)
    losses["baseline"] = {s: BASE[s] for s in SEEDS[:3]}
    md, _, _ = report.build_report(*make_study(losses, analysis=ADAPTIVE, seeds={v: SEEDS for v in losses}), tmp_path)
    summary, results = read_csvs(tmp_path)
    missing = results[results["status"] == "missing"]
    assert missing[["variant", "seed"]].values.tolist() == [["baseline", s] for s in SEEDS[3:]] + [
        ["slow", s] for s in SEEDS[3:]]
    assert summary.loc["fast", "verdict"] == "better" and summary.loc["fast", "n_needed"] == 3
    assert (summary.loc["slow", "verdict"], summary.loc["slow", "looks"], summary.loc["slow", "n_pairs"]) == (
        "undecided", 1, 3)
    assert (summary.loc["slow", "n"], summary.loc["slow", "n_needed"]) == (3, 6)
    text = md.read_text()
    assert "The study is not complete: some verdicts are pending." in text
    assert "9 of 15 needed cells are in the statistics" in text
    assert "`slow` seed 4 (cell h-slow-4): missing: needed, but no run was logged for it" in text


def test_failed_and_missing_cells_are_reported(tmp_path):
    losses = {"baseline": {0: 0.50, 1: 0.52, 2: 0.51}, "kernel5": {0: 0.49, 2: 0.47}, "heads4": {0: 0.51, 2: 0.50}}
    failed = {("kernel5", 1): "CUDA out of memory", ("dim96", 0): "loss became NaN"}
    md, _, _ = report.build_report(*make_study(losses, failed=failed, missing=[("heads4", 1)]), tmp_path)
    text = md.read_text()
    section = text.split("## Cells not in the statistics")[1].split("##")[0]
    assert "`kernel5` seed 1 (cell h-kernel5-1): failed: CUDA out of memory" in section
    assert "`dim96` seed 0 (cell h-dim96-0): failed: loss became NaN" in section
    assert "`heads4` seed 1 (cell h-heads4-1): missing: needed, but no run was logged for it" in section
    assert "<li><code>kernel5</code> seed 1" in (tmp_path / "report.html").read_text()
    summary, results = read_csvs(tmp_path)
    assert results.set_index(["variant", "seed"]).loc[("heads4", 1), "status"] == "missing"
    assert (summary.loc["kernel5", "n"], summary.loc["kernel5", "n_needed"]) == (2, 3)
    # a look is taken once all its cells are settled: heads4's missing cell holds every verdict back
    assert summary.loc[["kernel5", "heads4", "dim96"], "verdict"].tolist() == [
        "pending (its first look is not complete)"] * 3
    assert summary.loc["dim96", "n"] == 0 and summary.loc["dim96", "verdict_code"] == "pending"
    assert "7 of 10 needed cells are in the statistics. The study is not complete" in text


def test_failed_cells_settle_the_look(tmp_path):
    """Once every needed cell finished or failed the look is taken, on the pairs that exist."""
    losses = {"baseline": {0: 0.50, 1: 0.52, 2: 0.51}, "kernel5": {0: 0.49, 2: 0.47}, "heads4": {0: 0.51, 2: 0.50}}
    failed = {("kernel5", 1): "CUDA out of memory", ("dim96", 0): "loss became NaN", ("heads4", 1): "diverged"}
    report.build_report(*make_study(losses, failed=failed), tmp_path)
    summary, _ = read_csvs(tmp_path)
    a = ALPHA / 3
    for variant in ["kernel5", "heads4"]:
        ref = reference(losses, variant, a, 0.05, relative=True)  # failed cells: no value, no pair
        row = summary.loc[variant]
        assert (row["n"], row["n_needed"], row["n_pairs"], row["looks"]) == (2, 3, 2, 1)
        assert (row["diff_low"], row["diff_high"]) == pytest.approx((ref.low, ref.high), rel=1e-9)
        assert row["level"] == pytest.approx(1 - a)
    assert (summary.loc["dim96", "n_pairs"], summary.loc["dim96", "verdict"]) == (0, "undecided")


def test_one_seed_is_undecided_without_an_interval(tmp_path):
    losses = {"baseline": {0: 0.5}, "heads4": {0: 0.45}, "deep": {0: 0.55}}
    md, summary, _ = report.build_report(*make_study(losses), tmp_path)
    summary = summary.set_index("variant")
    assert summary.loc[["heads4", "deep"], "verdict"].tolist() == ["undecided"] * 2
    assert summary.loc[["heads4", "deep"], "n_pairs"].tolist() == [1, 1]
    assert summary.loc[["heads4", "deep"], "diff"].tolist() == pytest.approx([-0.05, 0.05])
    assert summary.loc[["heads4", "deep"], ["diff_low", "diff_high", "detectable"]].isna().all().all()
    assert "undecided for 2 variant(s) (`heads4` n=1; `deep` n=1)" in md.read_text()


def test_no_finished_baseline_gives_no_verdicts(tmp_path):
    """With a relative margin and no baseline value nothing can be decided; nothing crashes."""
    losses = {"kernel5": {0: 0.49, 1: 0.50}, "heads4": {0: 0.51, 1: 0.53}}
    md, _, _ = report.build_report(*make_study(losses, failed={("baseline", 0): "diverged", ("baseline", 1): "diverged"}),
                                   tmp_path)
    summary, _ = read_csvs(tmp_path)
    assert summary.index[0] == "baseline" and summary.loc["baseline", "n"] == 0
    assert summary.loc[["kernel5", "heads4"], "verdict"].tolist() == ["undecided"] * 2
    assert summary.loc[["kernel5", "heads4"], "n_pairs"].tolist() == [0, 0]
    text = md.read_text()
    assert "baseline has no finished cell" in text
    assert "`baseline` seed 0 (cell h-baseline-0): failed: diverged" in text


def test_nothing_ran_yet_lists_every_cell_as_missing(tmp_path):
    plan, _, epochs = make_study({"baseline": {0: 0.5, 1: 0.5}, "k5": {0: 0.5, 1: 0.5}})
    md, summary, _ = report.build_report(plan, [], epochs.iloc[:0], tmp_path)
    assert summary["n"].tolist() == [0, 0] and summary["verdict"].tolist()[1].startswith("pending")
    assert (pd.read_csv(tmp_path / "results.csv")["status"] == "missing").all()
    assert "0 of 4 needed cells are in the statistics" in md.read_text()


def test_higher_is_better_metric_flips_the_verdicts(tmp_path):
    """On test_acc (= 0.85 - loss / 10 in make_study) the variant with the lower loss has the higher
    accuracy: still better, and the differences change sign."""
    analysis = {"metric": "test_acc", "margin": 0.001, "relative": False}
    losses = {k: KNOWN[k] for k in ("baseline", "better", "worse")}
    report.build_report(*make_study(losses, analysis=analysis), tmp_path)
    summary, _ = read_csvs(tmp_path)
    assert summary.loc[["better", "worse"], "verdict"].tolist() == ["better", "worse"]
    acc = {v: {s: 0.85 - losses[v][s] / 10 for s in SEEDS} for v in losses}
    ref = reference(acc, "better", ALPHA / 2, 0.001)
    assert summary.loc["better", "diff_low"] == pytest.approx(ref.low) and ref.low > 0
    assert summary.loc["better", "share_better"] == 1.0 and summary.loc["worse", "share_better"] == 0.0
    assert (summary["metric"] == "test_acc").all()


def test_empty_study_is_a_user_error(tmp_path):
    plan, _, epochs = make_study({})
    with pytest.raises(ChaeError, match="nothing to report"):
        report.build_report(plan, [], epochs, tmp_path)


def test_cells_of_an_earlier_version_are_listed_never_counted(tmp_path):
    """The edit-and-rerun case: v1 (2 epochs) finished; v2 (6 epochs, other cell hashes) has one cell
    done when the report is asked for. Only that cell is in the statistics; v1's cells are listed
    apart, with what changed. Before cell identity, the report paired v2's baseline with v1's variant."""
    losses = {"baseline": {0: 0.5, 1: 0.52}, "k5": {0: 0.45, 1: 0.46}}
    old_plan, old_records, _ = make_study(losses, version="v1")
    old_plan = replace(old_plan, settings={v: {"protocol.epochs": 2, "model.resolution": 256} for v in old_plan.seeds})
    plan, records, epochs = make_study({"baseline": {0: 1.1}}, missing=[("baseline", 1), ("k5", 0), ("k5", 1)],
                                       version="v2")
    plan = replace(plan, settings={v: {"protocol.epochs": 6, "model.resolution": 256} for v in plan.seeds})
    known = [new_version(old_plan, None, 0), new_version(plan, None, 0)]
    md, summary, _ = report.build_report(plan, [*records, *old_records], epochs, tmp_path, known)
    text = md.read_text()
    assert "1 of 4 needed cells are in the statistics. The study is not complete" in text
    assert summary.set_index("variant").loc["k5", "n"] == 0 and math.isnan(summary["diff"].iloc[1])
    section = text.split("## Cells of other versions of this study")[1].split("##")[0]
    assert f"from an earlier version of this study (first run {known[0].recorded_at}): 4 cells (4 done); " \
           "changed: protocol.epochs 2 -> 6" in section
    results = pd.read_csv(tmp_path / "results.csv")
    assert set(results["cell_hash"].str[:2]) == {"v2"}  # no cell of v1 in the table or the statistics


def test_cells_of_an_unrecorded_version_are_listed_by_label(tmp_path):
    plan, records, epochs = make_study({"baseline": {0: 0.5}, "k5": {0: 0.4}})
    _, old, _ = make_study({"baseline": {0: 0.9}}, version="old")
    md, _, _ = report.build_report(plan, [*records, *old], epochs, tmp_path, [])
    assert ("from a version of this study whose plan was not recorded: 1 cells (1 done) (baseline/seed0)"
            in md.read_text())


def test_analysis_changed_after_results_is_said_beside_the_verdicts(tmp_path):
    plan, records, epochs = make_study(KNOWN)
    before = new_version(plan, None, 0)
    after_plan = replace(plan, analysis=AnalysisConfig(margin=0.2))
    after = new_version(after_plan, before, results_seen=36)
    assert after.analysis_changed == ("analysis.margin 0.05 -> 0.2",)
    md, _, _ = report.build_report(after_plan, records, epochs, tmp_path, [before, after])
    verdicts = md.read_text().split("## Verdicts against the baseline")[1].split("##")[0]
    assert verdicts.lstrip().startswith("Warning: analysis.margin 0.05 -> 0.2 changed after 36 of this plan's "
                                        "results were seen")
    md, _, _ = report.build_report(plan, records, epochs, tmp_path, [before, after])  # the settings fixed in advance
    assert "Warning" not in md.read_text()


def _log_study(name: str, losses: dict[str, dict[int, float]], failed: dict, tmp_path) -> Plan:
    """Log a study as tracking.StudyLog does: a parent run (role study) holding plan.json, and one
    nested run per cell (role cell, mlflow.parentRunId) with per-epoch metrics as steps."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    plan, records, epochs = make_study(losses, failed=failed, name=name)
    client = MlflowClient()
    exp = client.create_experiment(name, artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp, run_name=name, tags={tracking.ROLE: "study"}).info.run_id
    client.log_dict(parent, plan.to_json(), "plan.json")
    for r in records:
        tags = {"mlflow.parentRunId": parent, tracking.ROLE: "cell", "variant": r.variant, "seed": str(r.seed),
                "cell_hash": r.cell_hash, "description": f"change {r.variant}"}
        if r.failure_reason:
            tags["failure_reason"] = r.failure_reason
        run = client.create_run(exp, run_name=r.label, tags=tags).info.run_id
        metrics = [Metric(k, e[k], 0, e["epoch"]) for e in epochs[epochs["run_id"] == r.run_id].to_dict("records")
                   for k in EPOCH_METRICS]
        metrics += [Metric(k, v, 0, 0) for k, v in r.metrics.items()]
        client.log_batch(run, metrics=metrics)
        client.set_terminated(run, "FINISHED" if r.state == CellState.DONE else "FAILED")
    client.set_terminated(parent, "FINISHED")
    return plan


def test_write_report_from_mlflow(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    losses = {"baseline": {0: 0.50, 1: 0.52, 2: 0.51}, "heads4": {0: 0.60, 1: 0.63, 2: 0.61},
              "kernel5": {0: 0.505, 2: 0.512}, "dim96": {1: 0.40}}
    failed = {("kernel5", 1): "CUDA out of memory", ("dim96", 0): "loss became NaN", ("dim96", 2): "diverged"}
    plan = _log_study("e2e", losses, failed, tmp_path)
    runs = tracking.load_study_runs("e2e")
    assert len(runs.records) == 12 and len(runs.epochs) == 12 * N_EPOCHS and runs.plan == plan
    assert {r.state for r in runs.records} == {CellState.DONE, CellState.FAILED} and runs.versions == []
    done = next(r for r in runs.records if r.cell_hash == "h-heads4-1")
    assert done.metrics["best_val_loss"] == 0.63 and done.source == f"mlflow run {done.run_id}"
    md = report.write_report("e2e")
    assert md.resolve() == (tmp_path / "reports" / "e2e" / "report.md").resolve()
    summary, _ = read_csvs(md.parent)
    assert summary.loc["heads4", "verdict"] == "worse"
    assert (summary.loc["kernel5", "n"], summary.loc["kernel5", "n_needed"]) == (2, 3)
    assert "`kernel5` seed 1 (cell h-kernel5-1): failed: CUDA out of memory" in md.read_text()
    client = MlflowClient()
    exp = client.get_experiment_by_name("e2e")
    parent = client.search_runs([exp.experiment_id], f"tags.`{tracking.ROLE}` = 'study'")[0]
    tags, metrics = parent.data.tags, parent.data.metrics
    assert {k: v for k, v in tags.items() if k.startswith("verdict.")} == {
        f"verdict.{v}": summary.loc[v, "verdict"] for v in ["heads4", "kernel5", "dim96"]}
    for variant, seeds in [("heads4", [0, 1, 2]), ("kernel5", [0, 2])]:
        x, base = paired(variant, losses, seeds)
        ref = reference(losses, variant, ALPHA / 3, 0.05, relative=True)
        assert metrics[f"diff.{variant}"] == pytest.approx(np.mean(x - base))
        assert (metrics[f"diff_low.{variant}"], metrics[f"diff_high.{variant}"]) == pytest.approx((ref.low, ref.high))
        assert metrics[f"n_pairs.{variant}"] == len(seeds)
    assert metrics["diff.dim96"] == pytest.approx(0.40 - 0.52) and metrics["n_pairs.dim96"] == 1
    assert "diff_low.dim96" not in metrics  # one pair has no interval: no metric rather than NaN

    def walk(path=None):
        for f in client.list_artifacts(parent.info.run_id, path):
            yield from walk(f.path) if f.is_dir else [f.path]

    assert {"plan.json", "report/report.md", "report/report.html", "report/summary.csv", "report/results.csv",
            "report/summary.parquet", "report/results.parquet", "report/figures/differences.png", "report/figures/val_loss_curves.png",
            "report/figures/params_vs_metric.png"} == set(walk())  # by name: the latest plan, nothing recorded
    report.write_report("e2e", plan=replace(plan, source="/studies/e2e.yaml"))  # from a study file: its version
    report.write_report("e2e", plan=replace(plan, source="/studies/e2e.yaml"))
    assert [v.fingerprint for v in tracking.load_study_runs("e2e").versions] == [plan.fingerprint]  # recorded once
    other = replace(plan, source="/studies/other.yaml", analysis=AnalysisConfig(alpha=0.01))
    with pytest.raises(ChaeError, match=r"is already used in the MLflow store .*other\.yaml is a different study"):
        report.write_report("e2e", plan=other)


def test_plan_spread_from_an_earlier_study_says_the_seeds_each_variant_needs(tmp_path, monkeypatch):
    """`plan --spread-from`: a variant the earlier study had is judged at its observed difference and
    spread, a new one at the earlier study's shared spread with no effect; the seeds are the normal
    approximation at the new study's last-look level (statsmodels' NormalIndPower, one sample),
    the cost its cells' and the baseline's minutes."""
    from statsmodels.stats.power import NormalIndPower

    from chae_ablate.plan import seeds_from_earlier
    from chae_ablate.study import study_from_dict

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(4)
    losses = {v: {s: 0.5 + shift + rng.normal(0, 0.01) for s in range(6)}
              for v, shift in [("baseline", 0.0), ("heads4", 0.004), ("kernel5", 0.03)]}
    _log_study("before", losses, {}, tmp_path)
    study = study_from_dict({"name": "next", "analysis": {"margin": 0.02, "relative": False},
                             "variants": {"heads4": {"set": {"model.transformer.heads": 4}},
                                          "depth3": {"set": {"model.transformer.depth": 3}}}}, {})
    lines = seeds_from_earlier(study, "before").lines()
    a = ALPHA / 2  # the new study's two variants, one look
    ref = reference(losses, "heads4", ALPHA / 2, 0.02)  # the earlier study's own look: m = 2, one look
    sd = ref.shared_se * math.sqrt(6)  # per-seed spread of a paired difference, shared
    x, base = paired("heads4", losses, range(6))
    mean = float(np.mean(x - base))
    by_effect = NormalIndPower().solve_power(abs(mean) / sd, alpha=a, power=0.8, ratio=0)
    by_margin = NormalIndPower().solve_power((0.02 - abs(mean)) / sd, alpha=2 * a, power=0.8, ratio=0)
    want = max(2, math.ceil(min(by_effect, by_margin) - 1e-9))
    minutes = 2 * 600 / 60  # its cell and the baseline's, 600 s each
    assert f"  heads4: {want} seeds (its earlier difference {mean:+.4g}, about {want * minutes:.0f} cell-minutes" \
        in "\n".join(lines)
    new = NormalIndPower().solve_power(0.02 / sd, alpha=2 * a, power=0.8, ratio=0)
    assert f"  depth3: {max(2, math.ceil(new - 1e-9))} seeds (new here: no effect assumed" in "\n".join(lines)
    assert lines[0].startswith("from study 'before'") and f"margin here {0.02:.4g}" in lines[0]
    with pytest.raises(ChaeError, match="no MLflow experiment named 'nowhere'"):
        seeds_from_earlier(study, "nowhere")

"""The comparison report of an ablation study: did any variant beat the baseline, and by how much?

Turns the study's cells (one row per variant x seed, from tracking.load_study_runs) into
reports/<study>/: report.md, a self-contained report.html, results.csv (one row per needed cell),
summary.csv (per variant: verdict, intervals, seeds, cost) and figures/*.png. The verdicts are
analysis.analyse's, the same the runner used to decide how many seeds each variant got. Every
number is shown with its n; cells that failed or never ran are listed, never silently dropped.
"""
from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import stats
from .analysis import LOWER_IS_BETTER, Outcome, analyse, planned_looks
from .config import AnalysisConfig, parse
from .errors import ChaeError
from .figures import write_report_figures
from .files import atomic_write_text, inside
from .metrics import SUMMARY_METRICS
from .render import Block, render_html, render_markdown
from .study import BASELINE

METRICS = [*SUMMARY_METRICS, "resolution"]
TEXT_COLUMNS = ["run_id", "variant", "cell_hash", "description", "status", "failure_reason"]
REPORT_FILES = ("report.md", "report.html", "results.csv", "summary.csv")
PAPER_EPOCHS = 20  # the paper's claim is about 20-epoch training
SETTLED = ("FINISHED", "FAILED")  # a cell in one of these states will not produce a value later


def study_spec(expected: dict | list) -> tuple[list[dict], AnalysisConfig, dict[str, list[int]]]:
    """(expected cells, analysis settings, seeds per variant in draw order) from plan.json; a plan
    from before the analysis section reads as the default analysis over its listed seeds."""
    if isinstance(expected, list):
        expected = {"cells": expected}
    cells = list(expected.get("cells", []))
    analysis = parse(AnalysisConfig, expected.get("analysis") or {}, "analysis")
    seeds = expected.get("seeds") or {}
    if not seeds:
        for c in cells:
            seeds.setdefault(c["variant"], []).append(int(c["seed"]))
    return cells, analysis, {v: [int(s) for s in ss] for v, ss in seeds.items()}


def cell_table(cells: pd.DataFrame, expected: list[dict], metric: str = "best_val_loss") -> pd.DataFrame:
    """Every expected cell plus any unexpected one, in study order (baseline first).

    Expected cells without a run get status 'MISSING'. `in_stats` marks the cells the statistics
    use (FINISHED with a finite metric); `diff_vs_baseline` is the cell's metric minus the
    baseline's for the same seed.
    """
    df = cells.copy()
    for col in TEXT_COLUMNS:
        df[col] = df[col].fillna("").astype(str) if col in df else ""
    for col in ["seed", *METRICS]:
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df else np.nan
    df["seed"] = df["seed"].astype("Int64")
    df = df.drop_duplicates(["variant", "seed"], keep="last")
    planned = pd.DataFrame(expected, columns=["variant", "seed", "cell_hash", "description"])
    planned["seed"] = planned["seed"].astype("Int64")
    planned = planned.drop_duplicates(["variant", "seed"])
    missing = planned.merge(df[["variant", "seed"]], how="left", on=["variant", "seed"], indicator=True)
    missing = missing[missing["_merge"] == "left_only"].drop(columns="_merge")
    df = pd.concat([df, missing.assign(status="MISSING", run_id="", failure_reason="")], ignore_index=True)
    order = list(dict.fromkeys([BASELINE, *planned["variant"], *df["variant"]]))
    df["in_stats"] = (df["status"] == "FINISHED") & np.isfinite(df[metric].astype(float))
    df["_order"] = df["variant"].map({v: i for i, v in enumerate(order)})
    df = df.sort_values(["_order", "seed"]).drop(columns="_order").reset_index(drop=True)
    base = df[df["in_stats"] & (df["variant"] == BASELINE)].set_index("seed")[metric]
    df["diff_vs_baseline"] = df[metric].where(df["in_stats"]) - df["seed"].map(base).astype(float)
    return df


def outcome_of(table: pd.DataFrame, analysis: AnalysisConfig, seeds: dict[str, list[int]]) -> Outcome:
    """analysis.analyse on the logged cells: the verdicts the runner's looks took."""
    used = table[table["in_stats"]]
    values = {v: dict(zip(g["seed"].astype(int), g[analysis.metric].astype(float))) for v, g in used.groupby("variant")}
    settled = {(r.variant, int(r.seed)) for r in table.itertuples() if r.status in SETTLED}
    variants = list(dict.fromkeys([BASELINE, *seeds, *table["variant"]]))
    all_seeds = {v: seeds.get(v) or sorted(int(s) for s in table.loc[table["variant"] == v, "seed"]) for v in variants}
    return analyse(values, lambda v, s: (v, s) in settled, variants, all_seeds, analysis)


def summarize(table: pd.DataFrame, analysis: AnalysisConfig, outcome: Outcome) -> pd.DataFrame:
    """Per-variant statistics and verdicts: one row per variant, baseline first."""
    used = table[table["in_stats"]]
    rows = []
    for variant in pd.unique(table["variant"]):
        rows_v, g = table[table["variant"] == variant], used[used["variant"] == variant]
        ci = stats.t_interval(g[analysis.metric], stats.CONFIDENCE)
        row: dict[str, Any] = {
            "variant": variant, "description": next((d for d in rows_v["description"] if d), ""),
            "n": ci.n, "n_needed": len(outcome.seeds.get(variant, [])) or len(rows_v),
            "metric": analysis.metric, "mean": ci.mean, "sd": ci.std, "ci_low": ci.low, "ci_high": ci.high}
        for col in ["best_val_loss", "best_epoch", "val_acc_at_best", "test_loss", "test_acc", "images_per_s",
                    "wall_time_s"]:
            row[f"{col}_mean"] = g[col].mean()
        for col in ["n_params", "mflops", "resolution"]:  # properties of the architecture, not of the seed
            row[col] = g[col].median() if len(g) else rows_v[col].median()
        row.update(_decision_columns(variant, outcome))
        rows.append(row)
    return pd.DataFrame(rows)


def _decision_columns(variant: str, outcome: Outcome) -> dict[str, Any]:
    d = outcome.decisions.get(variant)
    if variant == BASELINE or d is None:
        verdict = "baseline" if variant == BASELINE else "pending (its first look is not complete)"
        return {"verdict": verdict, "verdict_code": verdict.split()[0], "within_margin": False, "looks": 0,
                **dict.fromkeys(["n_pairs", "diff", "diff_low", "diff_high", "level", "boot_low", "boot_high",
                                 "share_better", "detectable", "p_diff_adj", "p_equiv_adj"], math.nan)}
    return {"verdict": d.label, "verdict_code": d.verdict, "within_margin": d.within_margin,
            "looks": outcome.looks_taken[variant], "n_pairs": d.n, "diff": d.mean, "diff_low": d.low,
            "diff_high": d.high, "level": d.level, "boot_low": d.boot_low, "boot_high": d.boot_high,
            "share_better": d.share_better, "detectable": d.detectable, "p_diff_adj": d.p_diff_adj,
            "p_equiv_adj": d.p_equiv_adj}


def n_epochs(table: pd.DataFrame, epochs: pd.DataFrame) -> int | None:
    """The epochs every cell in the statistics trained for, or None if unknown or mixed."""
    if epochs.empty or "run_id" not in epochs:
        return None
    last = epochs[epochs["run_id"].isin(table.loc[table["in_stats"], "run_id"])].groupby("run_id")["epoch"].max()
    return int(last.iloc[0]) if last.nunique() == 1 else None


# ---------------------------------------------------------------- text

def _num(x: float, spec: str = ".3f") -> str:
    return format(x, spec) if x is not None and np.isfinite(x) else "–"


def _pct(values: pd.Series) -> list[str]:
    return [_num(100 * x, ".1f") for x in values]


def _mean_sd(mean: float, sd: float, n: int) -> str:
    return f"{_num(mean)} ± {_num(sd)}" if n >= 2 else _num(mean)


def _interval(low: float, high: float, spec: str = "+.3f") -> str:
    return f"[{_num(low, spec)}, {_num(high, spec)}]" if np.isfinite(low) else "–"


def _level(summary: pd.DataFrame) -> str:
    levels = summary["level"].dropna()
    return f"{100 * levels.iloc[0]:.2f}%" if len(levels) else "–"


def _diff_text(r: Any) -> str:
    return (f"`{r.variant}` {_num(r.diff, '+.3f')} {_interval(r.diff_low, r.diff_high)} "
            f"(n={r.n_pairs:.0f})")


def conclusion(summary: pd.DataFrame, analysis: AnalysisConfig, outcome: Outcome, epochs: int | None) -> str:
    """The paper's claim, and which verdicts support or contradict it, with numbers."""
    text = (f"The paper claims that none of its architecture changes beat the baseline at {PAPER_EPOCHS} "
            f"epochs{f' (this study trained {epochs})' if epochs not in (None, PAPER_EPOCHS) else ''}. "
            f"Claims like this are equivalence claims: a change that moves {analysis.metric} by less than the "
            f"margin ({_num(outcome.margin, '.4f')}) does not matter.")
    others = summary[summary["variant"] != BASELINE]
    no_baseline = not (summary.loc[summary["variant"] == BASELINE, "n"] > 0).any()
    if no_baseline or others.empty:
        return text + " This study cannot check it: " + (
            "the baseline has no finished cell." if no_baseline else "it has no variants.")
    code = others["verdict_code"]
    better = others[(code == stats.BETTER) & ~others["within_margin"].astype(bool)]
    slightly = others[(code == stats.BETTER) & others["within_margin"].astype(bool)]
    parts = []
    if len(better):
        parts.append(f"contradicted by {len(better)} variant(s) that beat the baseline by more than noise: "
                     + "; ".join(map(_diff_text, better.itertuples())))
    support = others[code.isin([stats.EQUIVALENT, stats.WORSE])]
    if len(support):
        parts.append(f"supported by {len(support)} variant(s): "
                     + ", ".join(f"`{r.variant}` {r.verdict}" for r in support.itertuples()))
    if len(slightly):
        parts.append(f"{len(slightly)} variant(s) beat it by less than the margin, which the claim allows: "
                     + ", ".join(f"`{v}`" for v in slightly["variant"]))
    open_ = others[code == stats.UNDECIDED]
    if len(open_):
        parts.append(f"undecided for {len(open_)} variant(s) ("
                     + ", ".join(f"`{r.variant}` could detect {_num(r.detectable, '.3f')}" if np.isfinite(r.detectable)
                                 else f"`{r.variant}` n={r.n_pairs:.0f}" for r in open_.itertuples())
                     + "): " + ("more seeds (analysis.max_seeds) would decide them" if analysis.adaptive else
                                "`chae-ablate run STUDY --adaptive` adds seeds where they are undecided"))
    pending = others[code == "pending"]
    if len(pending):
        parts.append(f"pending for {len(pending)} variant(s) whose cells have not all finished: "
                     + ", ".join(f"`{v}`" for v in pending["variant"]))
    verdict = "contradicted" if len(better) else "supported" if not (len(open_) or len(pending)) else "not yet settled"
    return text + f" In this study the claim is {verdict}: " + "; ".join(parts) + "."


def format_summary_table(summary: pd.DataFrame) -> str:
    """A short plain-text table for a terminal: variant, seeds, metric, difference, verdict."""
    rows = [("variant", "seeds", summary["metric"].iloc[0] if len(summary) else "metric",
             f"difference [{_level(summary)} interval]", "verdict")]
    rows += [(r.variant, f"{r.n}/{r.n_needed}", _mean_sd(r.mean, r.sd, r.n),
              "" if r.variant == BASELINE else f"{_num(r.diff, '+.3f')} {_interval(r.diff_low, r.diff_high)}",
              r.verdict) for r in summary.itertuples()]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def summary_table_text(report_dir: Path) -> str:
    """The short per-variant table of a written report (what `run` prints at the end)."""
    return format_summary_table(pd.read_csv(Path(report_dir) / "summary.csv", keep_default_na=False,
                                            na_values=[""]))


def verdict_table(summary: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "variant": summary["variant"], "change": summary["description"],
        "seeds": [f"{r.n}/{r.n_needed}" for r in summary.itertuples()],
        f"{summary['metric'].iloc[0]} (mean ± sd)": [_mean_sd(r.mean, r.sd, r.n) for r in summary.itertuples()],
        "difference": [_num(d, "+.4f") for d in summary["diff"]],
        f"{_level(summary)} interval": [_interval(lo, hi, "+.4f") for lo, hi in zip(summary["diff_low"], summary["diff_high"])],
        "bootstrap check": [_interval(lo, hi, "+.4f") for lo, hi in zip(summary["boot_low"], summary["boot_high"])],
        "seeds better": [_num(100 * x, ".0f") + ("%" if np.isfinite(x) else "") for x in summary["share_better"]],
        "detectable": [_num(x, ".4f") for x in summary["detectable"]],
        "verdict": summary["verdict"]})


def _seeds_table(summary: pd.DataFrame, analysis: AnalysisConfig, outcome: Outcome) -> tuple[pd.DataFrame, str]:
    """Seeds per variant and what adaptive seeding saved against max_seeds everywhere."""
    table = pd.DataFrame({"variant": summary["variant"], "seeds used": summary["n_needed"],
                          "looks": [("–" if v == BASELINE else str(k)) for v, k in zip(summary["variant"], summary["looks"])],
                          "verdict": summary["verdict"]})
    if not analysis.adaptive:
        return table, (f"Fixed design: every variant ran its listed seeds; one look (K = 1). "
                       f"`--adaptive` runs {analysis.min_seeds} seeds first and adds seeds (up to "
                       f"{analysis.max_seeds}) only where the verdict is undecided.")
    used, full = int(summary["n_needed"].sum()), analysis.max_seeds * len(summary)
    per_cell = float(np.nanmean(summary["wall_time_s_mean"])) if summary["wall_time_s_mean"].notna().any() else math.nan
    return table, (f"Adaptive seeding: looks at {', '.join(map(str, planned_looks(analysis, 0)))} seeds (K = {outcome.n_looks}). "
                   f"{used} cells ran, against {full} with {analysis.max_seeds} seeds everywhere: "
                   f"{full - used} cells saved ({(full - used) / full:.0%}), about "
                   f"{_num((full - used) * per_cell / 60, '.1f')} minutes of training at this study's mean cell time.")


def _cost_table(summary: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "variant": summary["variant"], "n": summary["n"].astype(str),
        "best val loss": [_num(x, ".4f") for x in summary["best_val_loss_mean"]],
        "best epoch (mean)": [_num(x, ".1f") for x in summary["best_epoch_mean"]],
        "val acc at best (%)": _pct(summary["val_acc_at_best_mean"]),
        "test loss": [_num(x) for x in summary["test_loss_mean"]], "test acc (%)": _pct(summary["test_acc_mean"]),
        "params": [_num(x, ",.0f") for x in summary["n_params"]],
        "MFLOPs/image": [_num(x, ".1f") for x in summary["mflops"]],
        "resolution": [_num(x, ".0f") for x in summary["resolution"]],
        "train images/s": [_num(x, ".0f") for x in summary["images_per_s_mean"]],
        "wall time (min)": [_num(x / 60, ".1f") for x in summary["wall_time_s_mean"]]})


def _cells_table(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    return pd.DataFrame({
        "variant": table["variant"], "seed": table["seed"].astype(str), "status": table["status"],
        metric: [_num(x, ".4f") for x in table[metric]],
        "difference vs baseline (same seed)": [_num(x, "+.4f") for x in table["diff_vs_baseline"]],
        "best epoch": [_num(x, ".0f") for x in table["best_epoch"]],
        "test acc (%)": _pct(table["test_acc"]), "cell": table["cell_hash"]})


def problem_cells(table: pd.DataFrame) -> list[str]:
    """One line per needed or logged cell the statistics leave out, with the reason."""
    reasons = {"MISSING": "missing: needed, but no run was logged for it",
               "RUNNING": "still running, or interrupted (status RUNNING)",
               "FINISHED": "finished without a finite value of the metric"}
    lines = []
    for r in table[~table["in_stats"]].itertuples():
        why = reasons.get(r.status) or f"{r.status.lower()}: {r.failure_reason or 'no reason recorded'}"
        lines.append(f"`{r.variant}` seed {r.seed} (cell {r.cell_hash or '?'}): {why}")
    return lines


def _settings(analysis: AnalysisConfig, outcome: Outcome) -> str:
    direction = "lower" if LOWER_IS_BETTER[analysis.metric] else "higher"
    margin = (f"{analysis.margin:.0%} of the baseline's mean over its first look = {_num(outcome.margin, '.4f')}"
              if analysis.relative else _num(outcome.margin, ".4f"))
    seeds = (f"adaptive, {analysis.min_seeds} to {analysis.max_seeds} seeds" if analysis.adaptive else "fixed seeds")
    split = (" Each seed draws its own train/val/test split (analysis.vary_split), so the intervals include "
             "split noise." if analysis.vary_split else " Every cell uses the same split.")
    return (f"Metric: {analysis.metric} ({direction} is better). Margin: {margin}. Family-wise alpha: "
            f"{analysis.alpha}. Seeds: {seeds}.{split}")


def _blocks(study_name: str, table: pd.DataFrame, summary: pd.DataFrame, figures: list[tuple[str, str]],
            analysis: AnalysisConfig, outcome: Outcome, epochs: int | None) -> list[Block]:
    done, needed = int(table["in_stats"].sum()), len(table)
    seeds_table, seeds_text = _seeds_table(summary, analysis, outcome)
    state = "" if outcome.complete else " The study is not complete: some verdicts are pending."
    return [
        ("h1", f"Ablation report: {study_name}"),
        ("p", f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from the study's MLflow runs. "
              f"{done} of {needed} needed cells are in the statistics.{state}"),
        ("p", _settings(analysis, outcome)),
        ("h2", "Conclusion"), ("p", conclusion(summary, analysis, outcome, epochs)),
        ("h2", "Verdicts against the baseline"),
        ("p", "Difference = variant − baseline on the same seed. Verdicts: better / worse when the interval "
              "excludes 0; equivalent when it lies inside ±margin; undecided otherwise, with the difference "
              "these seeds could have detected (80% power)."),
        ("table", verdict_table(summary)),
        ("h2", "Seeds per variant"), ("p", seeds_text), ("table", seeds_table),
        ("h2", "Figures"), *[("img", path, caption) for path, caption in figures],
        ("h2", "Accuracy and cost"), ("table", _cost_table(summary)),
        ("h2", "Cells not in the statistics"),
        ("list", problem_cells(table) or [f"None: all {needed} needed cells finished."]),
        ("h2", "Per-cell results"), ("table", _cells_table(table, analysis.metric)),
        ("h2", "Method"), ("p", stats.METHOD)]


# ---------------------------------------------------------------- entry points

def build_report(study_name: str, cells: pd.DataFrame, epochs: pd.DataFrame, expected: dict | list,
                 out_dir: Path) -> tuple[Path, pd.DataFrame, list[Path]]:
    """Write the whole report for these cells into out_dir; returns (report.md, summary, every file
    written)."""
    planned_cells, analysis, seeds = study_spec(expected)
    if cells.empty and not planned_cells:
        raise ChaeError(f"study '{study_name}' has no planned or logged cells: nothing to report; "
                        f"run it first with `chae-ablate run`")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outcome = outcome_of(cell_table(cells, planned_cells, analysis.metric), analysis, seeds)
    needed = {(v, s) for v, ss in outcome.seeds.items() for s in ss}
    if not cells.empty:  # cells beyond the seeds the looks needed (an earlier design's) stay out
        cells = cells[[(v not in outcome.seeds) or (v, int(s)) in needed for v, s in zip(cells["variant"], cells["seed"])]]
    table = cell_table(cells, [c for c in planned_cells if (c["variant"], int(c["seed"])) in needed], analysis.metric)
    summary = summarize(table, analysis, outcome)
    table.to_csv(out_dir / "results.csv", index=False)
    summary.to_csv(out_dir / "summary.csv", index=False)
    figures = write_report_figures(summary, table, epochs, out_dir, outcome.margin)
    blocks = _blocks(study_name, table, summary, figures, analysis, outcome, n_epochs(table, epochs))
    atomic_write_text(out_dir / "report.html", render_html(blocks, out_dir))
    md = atomic_write_text(out_dir / "report.md", render_markdown(blocks))
    return md, summary, [out_dir / name for name in REPORT_FILES] + [out_dir / path for path, _ in figures]


def write_report(study_name: str, out_dir: Path | None = None) -> Path:
    """Load the study's runs from MLflow, write the report (default reports/<study>/), log it and
    the verdicts to the study's parent run, and return report.md's path."""
    from . import tracking  # the only module that imports mlflow; imported here to keep this one light

    cells, epochs, expected = tracking.load_study_runs(study_name)
    out = Path(out_dir) if out_dir is not None else inside(Path("reports"), study_name)
    md, summary, written = build_report(study_name, cells, epochs, expected, out)
    tracking.log_report(study_name, out, written, summary)
    return md

"""The comparison report of an ablation study: did any variant beat the baseline, and by how much?

Turns a study's plan and its cell records (tracking.load_study_runs) into reports/<study>/:
report.md, a self-contained report.html, results.csv (one row per needed cell), summary.csv (per
variant: verdict, intervals, seeds, cost), the same two as Parquet where pyarrow is installed, and
figures/*.png, each written atomically (SLURM tasks
rewrite a report concurrently). Records join the plan on the cell hash alone (analysis.outcome):
cells of an earlier version of the study are listed in their own section, never counted. The
verdicts are the same analysis.outcome the runner used to decide how many seeds each variant got.
Every number is shown with its n; cells that failed or never ran are listed, never silently dropped.
"""
from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import stats, tracking, versions
from .analysis import Outcome, Plan, outcome, planned_looks, seeds_needs
from .config import AnalysisConfig
from .errors import ChaeError
from .figures import write_report_figures
from .files import atomic_write, atomic_write_text, inside
from .metrics import LOWER_IS_BETTER, SUMMARY_METRICS, Metric
from .records import BASELINE, CellRecord, CellState, Verdict
from .render import Block, render_html, render_markdown
from .versions import Version

REPORT_FILES = ("report.md", "report.html", "results.csv", "summary.csv")
PARQUET_FILES = ("results.parquet", "summary.parquet")  # written where pyarrow is installed
PAPER_EPOCHS = 20  # the paper's claim is about 20-epoch training
RESOLUTION = "model.resolution"  # the plan's setting shown beside each variant's cost
BUILDER = "model.builder"  # set in the plan's settings for every builder but CHAE


def cell_table(plan: Plan, standing: Outcome) -> pd.DataFrame:
    """One row per cell the study needs, in plan order (baseline first): its record (`state`, the
    CellState; `status`, the same in words with a divergence), metrics and the architecture's resolution. `in_stats` marks the cells the statistics use (done, with a
    value of the metric; a diverged one's counts as the worst, stats.with_divergence);
    `diff_vs_baseline` is the cell's metric minus the baseline's on the same seed."""
    metric = plan.analysis.metric
    rows = []
    for cell in standing.needed:
        r = standing.records[cell.cell_hash]
        rows.append({"variant": cell.variant, "seed": cell.seed, "cell_hash": cell.cell_hash,
                     "description": cell.description, "state": str(r.state), "status": _status(r), "run_id": r.run_id,
                     "failure_reason": r.failure_reason,
                     **{m: float(r.metrics.get(m, math.nan)) for m in SUMMARY_METRICS},
                     "resolution": float(plan.settings.get(cell.variant, {}).get(RESOLUTION, math.nan)),
                     "in_stats": not math.isnan(standing.value(cell, metric))})  # a diverged cell's is +-inf
    df = pd.DataFrame(rows, columns=["variant", "seed", "cell_hash", "description", "state", "status", "run_id",
                                     "failure_reason", *SUMMARY_METRICS, "resolution", "in_stats"])
    df["in_stats"] = df["in_stats"].astype(bool)
    base = df[df["in_stats"] & (df["variant"] == BASELINE)].set_index("seed")[metric]
    df["diff_vs_baseline"] = df[metric].where(df["in_stats"]) - df["seed"].map(base).astype(float)
    return df


def _status(record: CellRecord) -> str:
    epoch = record.metrics.get(Metric.DIVERGED_EPOCH)
    return f"{record.state}, diverged at epoch {epoch:.0f}" if epoch is not None else str(record.state)


def summarize(table: pd.DataFrame, analysis: AnalysisConfig, standing: Outcome) -> pd.DataFrame:
    """Per-variant statistics and verdicts: one row per variant, baseline first."""
    used = table[table["in_stats"]]
    rows = []
    for variant in pd.unique(table["variant"]):
        rows_v, g = table[table["variant"] == variant], used[used["variant"] == variant]
        ci = stats.t_interval(g[analysis.metric], stats.CONFIDENCE)
        row: dict[str, Any] = {
            "variant": variant, "description": next((d for d in rows_v["description"] if d), ""),
            "n": ci.n, "n_needed": len(rows_v), "metric": analysis.metric, "mean": ci.mean, "sd": ci.std,
            "ci_low": ci.low, "ci_high": ci.high}
        for col in (Metric.BEST_VAL_LOSS, Metric.BEST_EPOCH, Metric.VAL_ACC_AT_BEST, Metric.TEST_LOSS,
                    Metric.TEST_ACC, Metric.IMAGES_PER_S, Metric.WALL_TIME_S):
            row[mean_of(col)] = g[col].mean()
        for col in (Metric.N_PARAMS, Metric.MFLOPS, "resolution"):  # properties of the architecture, not of the seed
            row[col] = g[col].median() if len(g) else rows_v[col].median()
        row.update(_decision_columns(variant, standing))
        rows.append(row)
    summary = pd.DataFrame(rows)
    minutes = dict(zip(summary["variant"], summary[mean_of(Metric.WALL_TIME_S)] / 60))
    needs = {n.variant: n for n in seeds_needs(standing, analysis, minutes)}
    summary["seeds_needed"] = [needs[v].needed if v in needs and needs[v].needed else math.nan for v in summary["variant"]]
    summary["needed_minutes"] = [needs[v].cell_minutes if v in needs else math.nan for v in summary["variant"]]
    summary["needs"] = [needs[v].text if v in needs else "" for v in summary["variant"]]
    return summary


def mean_of(metric: str) -> str:
    """summary.csv's column of a metric's mean over the seeds in the statistics."""
    return f"{metric}_mean"


def _decision_columns(variant: str, standing: Outcome) -> dict[str, Any]:
    d = standing.decisions.get(variant)
    if variant == BASELINE or d is None:
        code = Verdict.BASELINE if variant == BASELINE else Verdict.PENDING
        return {"verdict": code if variant == BASELINE else f"{code} (its first look is not complete)",
                "verdict_code": code, "within_margin": False, "looks": 0, "variance": "",
                **dict.fromkeys(["n_pairs", "diff", "diff_low", "diff_high", "level", "eq_low", "eq_high", "df",
                                 "boot_low", "boot_high", "share_better", "detectable", "diverged"], math.nan)}
    label = f"{d.label} (stopped: unlikely to be decided within max_seeds)" if variant in standing.stopped else d.label
    return {"verdict": label, "verdict_code": d.verdict, "within_margin": d.within_margin,
            "looks": standing.looks_taken[variant], "variance": d.variance, "n_pairs": d.n, "diff": d.mean,
            "diff_low": d.low, "diff_high": d.high, "level": d.level, "eq_low": d.eq_low, "eq_high": d.eq_high,
            "df": d.df, "boot_low": d.boot_low, "boot_high": d.boot_high, "share_better": d.share_better,
            "detectable": d.detectable, "diverged": d.diverged}


def n_epochs(table: pd.DataFrame, epochs: pd.DataFrame) -> int | None:
    """The epochs every cell in the statistics trained for, or None if unknown or mixed."""
    if epochs.empty or "run_id" not in epochs:
        return None
    last = epochs[epochs["run_id"].isin(table.loc[table["in_stats"], "run_id"])].groupby("run_id")["epoch"].max()
    return int(last.iloc[0]) if last.nunique() == 1 else None


# ---------------------------------------------------------------- text

def number_text(x: float, spec: str = ".3f") -> str:
    """A number as every report shows it: `spec`, or '–' when missing or not finite."""
    return format(x, spec) if x is not None and np.isfinite(x) else "–"


def _pct(values: pd.Series) -> list[str]:
    return [number_text(100 * x, ".1f") for x in values]


def _mean_sd(mean: float, sd: float, n: int) -> str:
    return f"{number_text(mean)} ± {number_text(sd)}" if n >= 2 else number_text(mean)


def _interval(low: float, high: float, spec: str = "+.3f") -> str:
    return f"[{number_text(low, spec)}, {number_text(high, spec)}]" if np.isfinite(low) else "–"


def _at_level(low: float, high: float, level: float) -> str:
    """An interval with its confidence, e.g. '[-0.0100, +0.0200] at 99.95%' (levels differ by look)."""
    return f"{_interval(low, high, '+.4f')} at {number_text(100 * level, '.2f')}%" if np.isfinite(low) else "–"


def _seeds(r: Any) -> str:
    diverged = f" ({r.diverged:.0f} diverged)" if np.isfinite(r.diverged) and r.diverged else ""
    return f"{r.n}/{r.n_needed}{diverged}"


def _diff_text(r: Any) -> str:
    return (f"`{r.variant}` {number_text(r.diff, '+.3f')} {_interval(r.diff_low, r.diff_high)} "
            f"(n={r.n_pairs:.0f})")


def conclusion(summary: pd.DataFrame, analysis: AnalysisConfig, standing: Outcome, epochs: int | None,
               papers: bool = True) -> str:
    """The paper's claim (for a study of another model: the same claim, of its own changes), and
    which verdicts support or contradict it, with numbers."""
    claim = (f"The paper claims that none of its architecture changes beat the baseline at {PAPER_EPOCHS} "
             f"epochs{f' (this study trained {epochs})' if epochs not in (None, PAPER_EPOCHS) else ''}. "
             if papers else "The claim tested, as the CHAE paper's: none of this study's changes beats its baseline. ")
    text = (f"{claim}Claims like this are equivalence claims: a change that moves {analysis.metric} by less than the "
            f"margin ({number_text(standing.margin, '.4f')}) does not matter.")
    others = summary[summary["variant"] != BASELINE]
    no_baseline = not (summary.loc[summary["variant"] == BASELINE, "n"] > 0).any()
    if no_baseline or others.empty:
        return text + " This study cannot check it: " + (
            "the baseline has no finished cell." if no_baseline else "it has no variants.")
    code = others["verdict_code"]
    better = others[(code == Verdict.BETTER) & ~others["within_margin"].astype(bool)]
    slightly = others[(code == Verdict.BETTER) & others["within_margin"].astype(bool)]
    parts = []
    if len(better):
        parts.append(f"contradicted by {len(better)} variant(s) that beat the baseline by more than noise: "
                     + "; ".join(map(_diff_text, better.itertuples())))
    support = others[code.isin([Verdict.EQUIVALENT, Verdict.WORSE])]
    if len(support):
        parts.append(f"supported by {len(support)} variant(s): "
                     + ", ".join(f"`{r.variant}` {r.verdict}" for r in support.itertuples()))
    if len(slightly):
        parts.append(f"{len(slightly)} variant(s) beat it by less than the margin, which the claim allows: "
                     + ", ".join(f"`{v}`" for v in slightly["variant"]))
    open_ = others[code == Verdict.UNDECIDED]
    if len(open_):
        parts.append(f"undecided for {len(open_)} variant(s) ("
                     + "; ".join(r.needs or f"`{r.variant}` n={r.n_pairs:.0f}" for r in open_.itertuples())
                     + "): " + ("more seeds (analysis.max_seeds) would decide them" if analysis.adaptive else
                                "`chae-ablate run STUDY --adaptive` adds seeds where they are undecided"))
    pending = others[code == Verdict.PENDING]
    if len(pending):
        parts.append(f"pending for {len(pending)} variant(s) whose cells have not all finished: "
                     + ", ".join(f"`{v}`" for v in pending["variant"]))
    verdict = "contradicted" if len(better) else "supported" if not (len(open_) or len(pending)) else "not yet settled"
    return text + f" In this study the claim is {verdict}: " + "; ".join(parts) + "."


def format_summary_table(summary: pd.DataFrame) -> str:
    """A short plain-text table for a terminal: variant, seeds, metric, difference, verdict."""
    rows = [("variant", "seeds", summary["metric"].iloc[0] if len(summary) else "metric",
             "difference [interval its verdict is read from, at its look's level]", "verdict")]
    rows += [(r.variant, _seeds(r), _mean_sd(r.mean, r.sd, r.n),
              "" if r.variant == BASELINE else f"{number_text(r.diff, '+.3f')} {_verdict_interval(r)}",
              r.verdict) for r in summary.itertuples()]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _verdict_interval(r: Any) -> str:
    """An equivalent variant's 1 - 2a interval (TOST, inside the margin); any other's 1 - a interval
    (better or worse when it excludes 0). Before, an equivalent variant showed its 1 - a interval,
    which may reach past the margin."""
    if r.verdict_code == Verdict.EQUIVALENT:
        return f"{_interval(r.eq_low, r.eq_high)} (TOST)"
    return _interval(r.diff_low, r.diff_high)


def read_summary(report_dir: Path) -> pd.DataFrame:
    """A written report's summary.csv, as summarize made it (empty cells as NaN, text as text)."""
    return pd.read_csv(Path(report_dir) / "summary.csv", keep_default_na=False, na_values=[""])


def summary_table_text(report_dir: Path) -> str:
    """The short per-variant table of a written report (what `run` prints at the end)."""
    return format_summary_table(read_summary(report_dir))


def verdict_table(summary: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "variant": summary["variant"], "change": summary["description"],
        "seeds": [_seeds(r) for r in summary.itertuples()],
        f"{summary['metric'].iloc[0]} (mean ± sd)": [_mean_sd(r.mean, r.sd, r.n) for r in summary.itertuples()],
        "difference": [number_text(d, "+.4f") for d in summary["diff"]],
        "interval (better/worse)": [_at_level(r.diff_low, r.diff_high, r.level) for r in summary.itertuples()],
        "equivalence interval": [_at_level(r.eq_low, r.eq_high, 1 - 2 * (1 - r.level)) for r in summary.itertuples()],
        "noise": [f"{r.variance} (df {r.df:.0f})" if r.variance else "–" for r in summary.itertuples()],
        "bootstrap check": [_interval(lo, hi, "+.4f") for lo, hi in zip(summary["boot_low"], summary["boot_high"])],
        "seeds better": [number_text(100 * x, ".0f") + ("%" if np.isfinite(x) else "") for x in summary["share_better"]],
        "verdict": summary["verdict"],
        "seeds needed": [_needed(r) for r in summary.itertuples()]})


def _needed(r: Any) -> str:
    if r.verdict_code != Verdict.UNDECIDED:
        return "–"
    if not np.isfinite(r.seeds_needed):
        return "over 100"
    return f"{r.seeds_needed:.0f}" + (f" (~{r.needed_minutes:.0f} cell-min)" if np.isfinite(r.needed_minutes) else "")


def _seeds_table(summary: pd.DataFrame, analysis: AnalysisConfig, standing: Outcome) -> tuple[pd.DataFrame, str]:
    """Seeds per variant and what adaptive seeding saved against max_seeds everywhere."""
    table = pd.DataFrame({"variant": summary["variant"], "seeds used": summary["n_needed"],
                          "looks": [("–" if v == BASELINE else str(k)) for v, k in zip(summary["variant"], summary["looks"])],
                          "verdict": summary["verdict"]})
    if not analysis.adaptive:
        return table, (f"Fixed design: every variant ran its listed seeds; one look (K = 1). "
                       f"`--adaptive` runs {analysis.min_seeds} seeds first and adds seeds (up to "
                       f"{analysis.max_seeds}) only where the verdict is undecided.")
    used, full = int(summary["n_needed"].sum()), analysis.max_seeds * len(summary)
    times = summary[mean_of(Metric.WALL_TIME_S)]
    per_cell = float(np.nanmean(times)) if times.notna().any() else math.nan
    stopped = (f" {len(standing.stopped)} undecided variant(s) stopped early because they would likely need more "
               f"than {stats.FUTILITY:g} x {analysis.max_seeds} seeds: {', '.join(standing.stopped)}."
               if standing.stopped else "")
    return table, (f"Adaptive seeding: looks at {', '.join(map(str, planned_looks(analysis, 0)))} seeds (K = {standing.n_looks}).{stopped} "
                   f"{used} cells ran, against {full} with {analysis.max_seeds} seeds everywhere: "
                   f"{full - used} cells saved ({(full - used) / full:.0%}), about "
                   f"{number_text((full - used) * per_cell / 60, '.1f')} minutes of training at this study's mean cell time.")


def _cost_table(summary: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "variant": summary["variant"], "n": summary["n"].astype(str),
        "best val loss": [number_text(x, ".4f") for x in summary[mean_of(Metric.BEST_VAL_LOSS)]],
        "best epoch (mean)": [number_text(x, ".1f") for x in summary[mean_of(Metric.BEST_EPOCH)]],
        "val acc at best (%)": _pct(summary[mean_of(Metric.VAL_ACC_AT_BEST)]),
        "test loss": [number_text(x) for x in summary[mean_of(Metric.TEST_LOSS)]],
        "test acc (%)": _pct(summary[mean_of(Metric.TEST_ACC)]),
        "params": [number_text(x, ",.0f") for x in summary[Metric.N_PARAMS]],
        "MFLOPs/image": [number_text(x, ".1f") for x in summary[Metric.MFLOPS]],
        "resolution": [number_text(x, ".0f") for x in summary["resolution"]],
        "train images/s": [number_text(x, ".0f") for x in summary[mean_of(Metric.IMAGES_PER_S)]],
        "wall time (min)": [number_text(x / 60, ".1f") for x in summary[mean_of(Metric.WALL_TIME_S)]]})


def _cells_table(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    return pd.DataFrame({
        "variant": table["variant"], "seed": table["seed"].astype(str), "status": table["status"],
        metric: [number_text(x, ".4f") for x in table[metric]],
        "difference vs baseline (same seed)": [number_text(x, "+.4f") for x in table["diff_vs_baseline"]],
        "best epoch": [number_text(x, ".0f") for x in table[Metric.BEST_EPOCH]],
        "test acc (%)": _pct(table[Metric.TEST_ACC]), "cell": table["cell_hash"]})


def problem_cells(table: pd.DataFrame) -> list[str]:
    """One line per needed cell the statistics leave out, with the reason."""
    reasons = {CellState.MISSING: "missing: needed, but no run was logged for it",
               CellState.RUNNING: "still running, or interrupted (status running)",
               CellState.QUEUED: "queued, not started",
               CellState.DONE: "finished without a finite value of the metric"}
    lines = []
    for r in table[~table["in_stats"]].itertuples():
        why = reasons.get(r.status) or f"{r.status}: {r.failure_reason or 'no reason recorded'}"
        lines.append(f"`{r.variant}` seed {r.seed} (cell {r.cell_hash}): {why}")
    return lines


def other_cells(plan: Plan, standing: Outcome, known: list[Version]) -> list[str]:
    """The cells kept but never counted: those of earlier versions of the study (grouped by the
    version that planned them, with what changed since), and this plan's cells its looks did not need."""
    lines = []
    planned_by = {c.cell_hash: v.fingerprint for v in known if v.plan for c in v.plan.cells}  # the latest that planned it
    by_version: dict[str, list[CellRecord]] = {}
    for r in standing.earlier:
        by_version.setdefault(planned_by.get(r.cell_hash, ""), []).append(r)
    for fingerprint, records in by_version.items():
        version = next((v for v in known if v.fingerprint == fingerprint), None)
        what = (f"from an earlier version of this study (first run {version.recorded_at}): {_cells_count(records)}; "
                f"changed: {'; '.join(versions.changes(version.plan, plan)) or 'nothing recorded'}" if version else
                f"from a version of this study whose plan was not recorded: {_cells_count(records)} "
                f"({', '.join(r.label for r in records[:6])}{', ...' if len(records) > 6 else ''})")
        lines.append(what)
    if standing.unneeded:
        lines.append(f"of this plan but not needed by its looks (an earlier design's seeds): "
                     f"{_cells_count(standing.unneeded)}")
    return lines


def _cells_count(records: Iterable[CellRecord]) -> str:
    states = pd.Series([str(r.state) for r in records]).value_counts()
    return f"{states.sum()} cells ({', '.join(f'{n} {state}' for state, n in states.items())})"


def analysis_note(plan: Plan, known: list[Version]) -> str:
    """A warning beside the verdicts when their decision settings were changed after results were seen."""
    version = next((v for v in known if v.fingerprint == plan.fingerprint), None)
    if version is None or not version.analysis_changed:
        return ""
    return (f"Warning: {', '.join(version.analysis_changed)} changed after {version.results_seen} of this plan's "
            f"results were seen (recorded {version.recorded_at}). The error guarantee below assumes settings "
            "fixed before any result; read these verdicts as exploratory, or rerun on fresh seeds.")


def _settings(analysis: AnalysisConfig, standing: Outcome) -> str:
    direction = "lower" if LOWER_IS_BETTER[analysis.metric] else "higher"
    margin = (f"{analysis.margin:.0%} of the baseline's mean = {number_text(standing.margin, '.4f')} (tested per seed "
              f"against (1 ± {analysis.margin:g}) × the baseline, so the baseline's own noise counts)"
              if analysis.relative else number_text(standing.margin, ".4f"))
    seeds = (f"adaptive, {analysis.min_seeds} to {analysis.max_seeds} seeds" if analysis.adaptive else "fixed seeds")
    split = (" Each seed draws its own train/val/test split (analysis.vary_split), so the intervals include "
             "split noise." if analysis.vary_split else " Every cell uses the same split.")
    return (f"Metric: {analysis.metric} ({direction} is better). Margin: {margin}. Family-wise alpha: "
            f"{analysis.alpha}. Seeds: {seeds}.{split}")


def studies_chae(plan: Plan) -> bool:
    """Whether the study's baseline is CHAE (another builder's config names its builder)."""
    return BUILDER not in plan.settings.get(BASELINE, {})


def _blocks(plan: Plan, table: pd.DataFrame, summary: pd.DataFrame, figures: list[tuple[str, str]],
            standing: Outcome, epochs: int | None, known: list[Version]) -> list[Block]:
    analysis = plan.analysis
    done, needed = int(table["in_stats"].sum()), len(table)
    seeds_table, seeds_text = _seeds_table(summary, analysis, standing)
    state = "" if standing.complete else " The study is not complete: some verdicts are pending."
    others = other_cells(plan, standing, known)
    kept = f" {len(others)} group(s) of other cells are kept apart (below)." if others else ""
    note = analysis_note(plan, known)
    return [
        ("h1", f"Ablation report: {plan.study}"),
        ("p", f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from the study's MLflow runs. "
              f"{done} of {needed} needed cells are in the statistics.{state}{kept}"),
        ("p", _settings(analysis, standing)),
        ("h2", "Conclusion"), ("p", conclusion(summary, analysis, standing, epochs, papers=studies_chae(plan))),
        ("h2", "Verdicts against the baseline"),
        *([("p", note)] if note else []),
        ("p", "Difference = variant − baseline on the same seed. Verdicts: better / worse when the interval "
              "excludes 0; equivalent when the equivalence interval (two one-sided tests) lies inside ±margin; "
              "undecided otherwise, with the seeds it would likely need for a verdict (80% power at its "
              "observed difference and spread) and what they would cost. Levels differ by look: early looks "
              "spend little of alpha. Noise: 'shared' is the study's residual variance (its df), 'own' the "
              "variant's paired spread, used when it is larger. A diverged cell counts as the worst value of "
              "its look."),
        ("table", verdict_table(summary)),
        ("h2", "Seeds per variant"), ("p", seeds_text), ("table", seeds_table),
        ("h2", "Figures"), *[("img", path, caption) for path, caption in figures],
        ("h2", "Accuracy and cost"), ("table", _cost_table(summary)),
        ("h2", "Cells not in the statistics"),
        ("list", problem_cells(table) or [f"None: all {needed} needed cells finished."]),
        ("h2", "Cells of other versions of this study"),
        ("p", "Cells are identified by the configuration they trained (the cell hash): a cell trained under "
              "another version of the study is a different cell, kept in MLflow and listed here, never counted."),
        ("list", others or ["None."]),
        ("h2", "Per-cell results"), ("table", _cells_table(table, analysis.metric)),
        ("h2", "Method"), ("p", stats.METHOD)]


# ---------------------------------------------------------------- entry points

@dataclass(frozen=True)
class ReportTables:
    """What a report is made of: the plan's cells joined to their records, and the verdicts."""

    standing: Outcome  # the looks replayed on the records (analysis.outcome)
    cells: pd.DataFrame  # one row per needed cell (results.csv)
    summary: pd.DataFrame  # one row per variant (summary.csv)


def report_tables(plan: Plan, records: Iterable[CellRecord]) -> ReportTables:
    """Join the records to the plan on the cell hash and decide: what the report, `run`, `status
    --json` and chae_ablate.api all read (one join, one set of verdicts)."""
    if not plan.cells:
        raise ChaeError(f"study '{plan.study}' has no planned cells: nothing to report; "
                        f"run it first with `chae-ablate run`")
    standing = outcome(plan, records)
    table = cell_table(plan, standing)
    return ReportTables(standing, table, summarize(table, plan.analysis, standing))


def write_table(table: pd.DataFrame, path_csv: Path) -> list[Path]:
    """A table as CSV and, where pyarrow is installed (`pip install 'chae-ablate[parquet]'`), as
    Parquet beside it with the same columns; returns the files written."""
    written = [atomic_write_text(path_csv, table.to_csv(index=False))]
    if parquet_available():
        parquet = path_csv.with_suffix(".parquet")
        written.append(atomic_write(parquet, lambda f: table.to_parquet(f, index=False)))
    return written


def parquet_available() -> bool:
    return importlib.util.find_spec("pyarrow") is not None


def build_report(plan: Plan, records: list[CellRecord], epochs: pd.DataFrame, out_dir: Path,
                 known: list[Version] = ()) -> tuple[Path, pd.DataFrame, list[Path]]:
    """Write the whole report of `plan` from these records into out_dir (known: the study's
    recorded versions); returns (report.md, summary, every file written)."""
    out_dir = Path(out_dir)
    tables = report_tables(plan, records)
    standing, table, summary = tables.standing, tables.cells, tables.summary
    written = write_table(table, out_dir / "results.csv") + write_table(summary, out_dir / "summary.csv")
    figures = write_report_figures(summary, table, epochs, out_dir, standing.margin)
    blocks = _blocks(plan, table, summary, figures, standing, n_epochs(table, epochs), list(known))
    written.append(atomic_write_text(out_dir / "report.html", render_html(blocks, out_dir)))
    md = atomic_write_text(out_dir / "report.md", render_markdown(blocks))
    return md, summary, [md, *written] + [out_dir / path for path, _ in figures]


def write_report(study_name: str, out_dir: Path | None = None, plan: Plan | None = None) -> Path:
    """Load the study's runs from MLflow, write the report of `plan` (a study file's; default: the
    plan of the study's latest run) into out_dir (default reports/<study>/), log it and the verdicts
    to the study's parent run, and return report.md's path. A study file's plan not run before is
    recorded as a version first (so a margin changed after results were seen is said so); another
    study file under this name is refused."""
    runs = tracking.load_study_runs(study_name)
    known = runs.versions
    if plan is not None:
        versions.refuse_other_file(plan, known, f"the MLflow store {tracking.tracking_uri()}")
    plan = plan or runs.plan
    if plan is None:
        raise ChaeError(f"study '{study_name}' has no recorded plan in MLflow (it was run by an older chae-ablate); "
                        f"report it from its study file: chae-ablate report STUDY.yaml")
    if plan is not runs.plan and plan.fingerprint not in {v.fingerprint for v in known}:
        version = versions.first_run(plan, known, runs.records)
        tracking.record_version(study_name, version)
        known = [*known, version]
    out = Path(out_dir) if out_dir is not None else inside(Path("reports"), study_name)
    md, summary, written = build_report(plan, runs.records, runs.epochs, out, known)
    tracking.log_report(study_name, out, written, summary)
    return md

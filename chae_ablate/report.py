"""The comparison report of an ablation study: did any variant beat the baseline?

Turns the study's cells (one row per variant x seed, from tracking.load_study_runs) into
reports/<study>/: report.md, a self-contained report.html (figures inlined as base64),
results.csv (one row per planned cell), summary.csv (per-variant statistics) and
figures/*.png. The ranking metric is each cell's lowest validation loss over its epochs;
the statistics live in stats.py. Every number is shown with its n, and cells that failed
or never ran are listed rather than silently dropped, so a partial study still reports.
"""
from __future__ import annotations

import base64
import html
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import stats
from .errors import ChaeError
from .files import inside
from .figures import FIGURES, write_report_figures
from .metrics import SUMMARY_METRICS
from .study import BASELINE

METRICS = [*SUMMARY_METRICS, "resolution"]
TEXT_COLUMNS = ["run_id", "variant", "cell_hash", "description", "status", "failure_reason"]
PAPER_EPOCHS = 20  # the paper's claim is about 20-epoch training
REPORT_FILES = ("report.md", "report.html", "results.csv", "summary.csv")
Block = tuple  # ("h1"|"h2"|"p", text) | ("table", DataFrame) | ("img", path, caption) | ("list", items)


# ---------------------------------------------------------------- cells and statistics

def cell_table(cells: pd.DataFrame, expected: list[dict]) -> pd.DataFrame:
    """Every expected cell plus any unexpected one, in study order (baseline first).

    Planned cells without a run get status 'MISSING'. `in_stats` marks the cells the
    statistics use (FINISHED with a finite best_val_loss); `diff_vs_baseline` is the cell's
    best_val_loss minus the baseline's for the same seed.
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
    df = pd.concat([df, missing.assign(status="MISSING", run_id="", failure_reason="")],
                   ignore_index=True)
    order = list(dict.fromkeys([BASELINE, *planned["variant"], *df["variant"]]))
    df["in_stats"] = (df["status"] == "FINISHED") & np.isfinite(df["best_val_loss"].astype(float))
    df["_order"] = df["variant"].map({v: i for i, v in enumerate(order)})
    df = df.sort_values(["_order", "seed"]).drop(columns="_order").reset_index(drop=True)
    base = df[df["in_stats"] & (df["variant"] == BASELINE)].set_index("seed")["best_val_loss"]
    df["diff_vs_baseline"] = df["best_val_loss"].where(df["in_stats"]) - df["seed"].map(base).astype(float)
    return df


def summarize(table: pd.DataFrame, confidence: float = stats.CONFIDENCE,
              alpha: float = stats.ALPHA) -> pd.DataFrame:
    """Per-variant statistics from a cell_table(): one row per variant, baseline first."""
    used = table[table["in_stats"]]
    base = _by_seed(used, BASELINE)
    rows = [_variant_row(v, table, used, base, confidence) for v in pd.unique(table["variant"])]
    summary = pd.DataFrame(rows)
    summary["p_holm"] = stats.holm(summary["p_value"])
    summary["verdict"] = [_verdict(r, alpha, has_baseline=len(base) > 0) for r in summary.itertuples()]
    _add_seed_advice(summary, used, alpha)
    return summary


def _by_seed(used: pd.DataFrame, variant: str) -> pd.Series:
    return used[used["variant"] == variant].set_index("seed")["best_val_loss"].astype(float)


def _variant_row(variant: str, table: pd.DataFrame, used: pd.DataFrame, base: pd.Series,
                 confidence: float) -> dict[str, Any]:
    rows, g = table[table["variant"] == variant], used[used["variant"] == variant]
    ci = stats.t_interval(g["best_val_loss"], confidence)
    row = {"variant": variant, "description": next((d for d in rows["description"] if d), ""),
           "n": ci.n, "n_planned": len(rows), "best_val_loss_mean": ci.mean,
           "best_val_loss_std": ci.std, "best_val_loss_ci_low": ci.low, "best_val_loss_ci_high": ci.high}
    for col in ["best_epoch", "val_acc_at_best", "test_loss", "test_acc", "images_per_s", "wall_time_s"]:
        row[f"{col}_mean"] = g[col].mean()
    for col in ["n_params", "mflops", "resolution"]:  # properties of the architecture, not of the seed
        row[col] = g[col].median() if len(g) else rows[col].median()
    cmp = (stats.Comparison("", 0, math.nan, math.nan, math.nan, math.nan) if variant == BASELINE
           else stats.compare_to_baseline(_by_seed(used, variant), base, confidence))
    row.update(test=cmp.test, n_pairs=cmp.n_pairs, diff_vs_baseline=cmp.diff, diff_ci_low=cmp.low,
               diff_ci_high=cmp.high, p_value=cmp.p)
    return row


def _verdict(row: Any, alpha: float, has_baseline: bool) -> str:
    if row.variant == BASELINE:
        return "baseline"
    if not has_baseline:
        return "n/a (no baseline)"
    cmp = stats.Comparison(row.test, row.n_pairs, row.diff_vs_baseline, row.diff_ci_low, row.diff_ci_high,
                           row.p_value)
    return stats.verdict(cmp, row.p_holm, alpha)


def _add_seed_advice(summary: pd.DataFrame, used: pd.DataFrame, alpha: float) -> None:
    """For single-seed comparisons, estimate the paired seeds a test would need from the
    study's pooled seed-to-seed spread (differences of two cells: sd * sqrt(2)), at the
    strictest Holm level alpha / m; without any spread, state the MIN_SEEDS rule."""
    pooled = stats.pooled_std([g["best_val_loss"] for _, g in used.groupby("variant")])
    m = max(1, int((summary["variant"] != BASELINE).sum()))
    needed, notes = [], []
    for row in summary.itertuples():
        n, note = math.nan, ""
        if row.verdict == "n/a (1 seed)" and np.isfinite(pooled):
            k = stats.seeds_needed(row.diff_vs_baseline, pooled * math.sqrt(2), alpha / m)
            n = k if k is not None else math.nan
            note = (f"about {k} paired seeds per variant, to detect a difference of "
                    f"{row.diff_vs_baseline:+.3f} with {stats.POWER:.0%} power" if k is not None else
                    "more than 100 seeds (the difference is small against the seed spread)")
        elif row.verdict == "n/a (1 seed)":
            note = (f"at least {stats.MIN_SEEDS} seeds per variant, e.g. `--seeds 0,1,2` "
                    "(one seed gives no estimate of the seed-to-seed spread)")
        needed.append(n)
        notes.append(note)
    summary["seeds_needed"], summary["seeds_note"] = needed, notes
    summary.attrs.update(pooled_std=pooled, comparisons=m)


def n_epochs(table: pd.DataFrame, epochs: pd.DataFrame) -> int | None:
    """The epochs every cell in the statistics trained for, or None if unknown or mixed."""
    if epochs.empty or "run_id" not in epochs:
        return None
    last = epochs[epochs["run_id"].isin(table.loc[table["in_stats"], "run_id"])].groupby("run_id")["epoch"].max()
    return int(last.iloc[0]) if last.nunique() == 1 else None


# ---------------------------------------------------------------- text

def _num(x: float, spec: str = ".3f") -> str:
    return format(x, spec) if x is not None and np.isfinite(x) else "–"


def _pval(p: float) -> str:
    return "–" if not np.isfinite(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def _pct(values: pd.Series) -> list[str]:
    return [_num(100 * x, ".1f") for x in values]


def _mean_sd(mean: float, sd: float, n: int) -> str:
    return f"{_num(mean)} ± {_num(sd)}" if n >= 2 else _num(mean)


def _interval(low: float, high: float, spec: str = ".3f") -> str:
    return f"[{_num(low, spec)}, {_num(high, spec)}]" if np.isfinite(low) else "–"


def _diff_text(r: Any) -> str:
    """'heads4 0.519 (n=3, difference +0.007 [-0.010, +0.024], p_holm=0.800)' for a summary row."""
    return (f"{r.variant} {_num(r.best_val_loss_mean)} (n={r.n}, difference {_num(r.diff_vs_baseline, '+.3f')} "
            f"{_interval(r.diff_ci_low, r.diff_ci_high, '+.3f')}, p_holm={_pval(r.p_holm)})")


def conclusion(summary: pd.DataFrame, epochs_trained: int | None = None) -> str:
    """A paragraph: the paper's claim and whether this study supports it, with numbers."""
    text = f"The paper claims that none of its architecture changes beat the baseline at {PAPER_EPOCHS} epochs."
    if epochs_trained is not None and epochs_trained != PAPER_EPOCHS:
        text += f" (This study trained for {epochs_trained} epochs.)"
    base = summary.iloc[0]
    others = summary[(summary["variant"] != BASELINE) & (summary["n"] > 0)]
    if base["n"] == 0 or others.empty:
        missing = "the baseline has no finished cell" if base["n"] == 0 else "no variant has a finished cell"
        return text + f" This study cannot check it: {missing}, so no variant was compared with the baseline."
    base_txt = f"baseline {_mean_sd(base.best_val_loss_mean, base.best_val_loss_std, base.n)}, n={base.n}"
    tested, better = others[others["test"] != ""], others[others["verdict"] == "better"]
    if not better.empty:
        text += (f" This study does not support it: {len(better)} of {len(others)} variants beat the baseline "
                 f"({base_txt}): {'; '.join(map(_diff_text, better.itertuples()))}.")
    elif tested.empty:
        best = others.loc[others["best_val_loss_mean"].idxmin()]
        text += (f" With one seed, no significance can be claimed, so this study neither supports nor refutes it "
                 f"({base_txt}; lowest variant {best.variant} {_num(best.best_val_loss_mean)}, n={best.n}). "
                 f"Needed: {best.seeds_note}.")
    else:
        best = next(tested.loc[[tested["diff_vs_baseline"].idxmin()]].itertuples())
        text += (f" This study is consistent with it: no variant beat the baseline significantly ({base_txt}; "
                 f"best variant {_diff_text(best)}). No significant difference is not proof of none: "
                 f"the intervals show how large a difference the seeds could have missed.")
    for label, rows in [("were significantly worse", others[others["verdict"] == "worse"]),
                        ("had one seed, so no test", others[(others["test"] == "") & (len(tested) > 0)])]:
        if not rows.empty:
            text += f" {len(rows)} variant(s) {label}: {', '.join(rows['variant'])}."
    return text


def format_summary_table(summary: pd.DataFrame) -> str:
    """A short plain-text table (variant, n, best val loss, test acc, verdict) for a terminal."""
    rows = [("variant", "n", "best val loss", "test acc", "verdict")]
    rows += [(r.variant, f"{r.n}/{r.n_planned}", _mean_sd(r.best_val_loss_mean, r.best_val_loss_std, r.n),
              _num(100 * r.test_acc_mean, ".1f") + ("%" if np.isfinite(r.test_acc_mean) else ""), r.verdict)
             for r in summary.itertuples()]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def summary_table_text(report_dir: Path) -> str:
    """The short per-variant table of a written report (what `run` prints at the end)."""
    return format_summary_table(pd.read_csv(Path(report_dir) / "summary.csv"))


def _intervals(summary: pd.DataFrame, prefix: str, spec: str) -> list[str]:
    return [_interval(lo, hi, spec) for lo, hi in zip(summary[f"{prefix}_low"], summary[f"{prefix}_high"])]


def _comparison_table(summary: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "variant": summary["variant"], "change": summary["description"],
        "n": [f"{r.n}/{r.n_planned}" for r in summary.itertuples()],
        "best val loss (mean ± sd)": [_mean_sd(r.best_val_loss_mean, r.best_val_loss_std, r.n)
                                      for r in summary.itertuples()],
        "95% CI": _intervals(summary, "best_val_loss_ci", ".3f"),
        "difference vs baseline": [_num(d, "+.3f") for d in summary["diff_vs_baseline"]],
        "95% CI of difference": _intervals(summary, "diff_ci", "+.3f"),
        "test": [f"{t} (n={k})" if t else "–" for t, k in zip(summary["test"], summary["n_pairs"])],
        "p": summary["p_value"].map(_pval), "p (Holm)": summary["p_holm"].map(_pval),
        "verdict": summary["verdict"]})


def _cost_table(summary: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "variant": summary["variant"], "n": summary["n"].astype(str),
        "best epoch (mean)": [_num(x, ".1f") for x in summary["best_epoch_mean"]],
        "val acc at best (%)": _pct(summary["val_acc_at_best_mean"]),
        "test loss": [_num(x) for x in summary["test_loss_mean"]], "test acc (%)": _pct(summary["test_acc_mean"]),
        "params": [_num(x, ",.0f") for x in summary["n_params"]],
        "MFLOPs/image": [_num(x, ".1f") for x in summary["mflops"]],
        "resolution": [_num(x, ".0f") for x in summary["resolution"]],
        "train images/s": [_num(x, ".0f") for x in summary["images_per_s_mean"]],
        "wall time (min)": [_num(x / 60, ".1f") for x in summary["wall_time_s_mean"]]})


def _cells_table(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "variant": table["variant"], "seed": table["seed"].astype(str), "status": table["status"],
        "best val loss": [_num(x) for x in table["best_val_loss"]],
        "difference vs baseline (same seed)": [_num(x, "+.3f") for x in table["diff_vs_baseline"]],
        "best epoch": [_num(x, ".0f") for x in table["best_epoch"]],
        "test acc (%)": _pct(table["test_acc"]), "cell": table["cell_hash"]})


def problem_cells(table: pd.DataFrame) -> list[str]:
    """One line per planned or logged cell the statistics leave out, with the reason."""
    reasons = {"MISSING": "missing: planned, but no run was logged for it",
               "RUNNING": "still running, or interrupted (status RUNNING)",
               "FINISHED": "finished without a finite best_val_loss"}
    lines = []
    for r in table[~table["in_stats"]].itertuples():
        why = reasons.get(r.status) or f"{r.status.lower()}: {r.failure_reason or 'no reason recorded'}"
        lines.append(f"`{r.variant}` seed {r.seed} (cell {r.cell_hash or '?'}): {why}")
    return lines


def _method(summary: pd.DataFrame) -> str:
    return (f"Each cell's metric is its lowest validation loss over the epochs. Per variant: mean, sample sd and "
            f"{stats.CONFIDENCE:.0%} t-interval over seeds (n = finished seeds / planned seeds). The difference from "
            f"the baseline (variant − baseline, negative = better) is paired by seed with a paired t-test when both "
            f"share ≥ 2 seeds, otherwise with Welch's t-test when both have ≥ 2 seeds; with one seed no test is "
            f"possible. P-values are Holm-corrected over the {summary.attrs.get('comparisons', 0)} comparisons; "
            f"a verdict of better or worse needs a corrected p < {stats.ALPHA}. Seed estimates target "
            f"{stats.POWER:.0%} power at the strictest Holm level, from the study's pooled seed-to-seed sd "
            f"({_num(summary.attrs.get('pooled_std', math.nan), '.4f')}).")


def _blocks(study_name: str, table: pd.DataFrame, summary: pd.DataFrame, figures: list[tuple[str, str]],
            epochs_trained: int | None) -> list[Block]:
    done, planned = int(table["in_stats"].sum()), len(table)
    blocks: list[Block] = [
        ("h1", f"Ablation report: {study_name}"),
        ("p", f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from the study's MLflow runs. "
              f"{done} of {planned} cells are in the statistics; metric: lowest validation loss over "
              f"{epochs_trained or 'the'} epochs (lower is better)."),
        ("h2", "Conclusion"), ("p", conclusion(summary, epochs_trained)),
        ("h2", "Best validation loss against the baseline"), ("table", _comparison_table(summary))]
    single = summary[summary["verdict"] == "n/a (1 seed)"]
    if not single.empty:
        blocks += [("p", f"No significance can be claimed for {', '.join(single['variant'])}: with one seed "
                         "on a side of the comparison no test is possible. Seeds needed:"),
                   ("list", [", ".join(f"`{v}`" for v in g["variant"]) + f": {note}"
                             for note, g in single.groupby("seeds_note", sort=False)])]
    blocks += [("h2", "Accuracy and cost"), ("table", _cost_table(summary)), ("h2", "Figures")]
    blocks += [("img", path, caption) for path, caption in figures]
    blocks += [("h2", "Cells not in the statistics"),
               ("list", problem_cells(table) or [f"None: all {planned} planned cells finished."]),
               ("h2", "Per-cell results"), ("table", _cells_table(table)),
               ("h2", "Method"), ("p", _method(summary))]
    return blocks


# ---------------------------------------------------------------- rendering

def _md_table(df: pd.DataFrame) -> str:
    cell = lambda x: str(x).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def render_markdown(blocks: list[Block]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append("#" * int(kind[1]) + " " + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "table":
            out.append(_md_table(rest[0]))
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})\n\n*{rest[1]}*")
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in rest[0]))
    return "\n\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:0.85em;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}th{background:#f0f0f0}
img{max-width:100%}figure{margin:1.5em 0}
figcaption{font-size:0.9em;color:#555}code{background:#f4f4f4;padding:0 3px}"""


def render_html(blocks: list[Block], root: Path) -> str:
    """Self-contained HTML: figures (paths relative to root) inlined as base64 PNG data URIs."""
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(rest[0])}</p>")
        elif kind == "table":
            body.append(rest[0].to_html(index=False, border=0))
        elif kind == "img":
            data = base64.b64encode((root / rest[0]).read_bytes()).decode()
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(rest[1])}">'
                        f"<figcaption>{html.escape(rest[1])}</figcaption></figure>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in rest[0]) + "</ul>")
    title = html.escape(blocks[0][1])
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ---------------------------------------------------------------- figures

# ---------------------------------------------------------------- entry points

def build_report(study_name: str, cells: pd.DataFrame, epochs: pd.DataFrame, expected: list[dict],
                 out_dir: Path) -> Path:
    """Write the whole report for these cells into out_dir; returns report.md's path."""
    if cells.empty and not expected:
        raise ChaeError(f"study '{study_name}' has no planned or logged cells: nothing to report; "
                        f"run it first with `chae-ablate run`")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = cell_table(cells, expected)
    summary = summarize(table)
    table.to_csv(out_dir / "results.csv", index=False)
    summary.to_csv(out_dir / "summary.csv", index=False)
    figures = write_report_figures(summary, table, epochs, out_dir)
    blocks = _blocks(study_name, table, summary, figures, n_epochs(table, epochs))
    (out_dir / "report.html").write_text(render_html(blocks, out_dir), encoding="utf-8")
    md = out_dir / "report.md"
    md.write_text(render_markdown(blocks), encoding="utf-8")
    return md


def write_report(study_name: str, out_dir: Path | None = None) -> Path:
    """Load the study's runs from MLflow, write the report (default reports/<study>/), log
    it as artifacts of the study's parent run, and return report.md's path."""
    from . import tracking  # the only module that imports mlflow; imported here to keep this one light

    cells, epochs, expected = tracking.load_study_runs(study_name)
    out = Path(out_dir) if out_dir is not None else inside(Path("reports"), study_name)
    md = build_report(study_name, cells, epochs, expected, out)
    written = [out / name for name in REPORT_FILES] + [out / path for path in FIGURES]
    tracking.log_report_artifacts(study_name, out, [p for p in written if p.exists()])
    return md

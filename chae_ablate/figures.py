"""Figures: the report's comparison plots and each cell's learning curve.

Built on matplotlib's Figure directly (no pyplot state), so workers and threads never share one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from . import stats
from .files import atomic_write
from .metrics import Metric
from .records import BASELINE, Verdict

DPI = 120
VERDICT_COLOURS = {Verdict.BASELINE: "black", Verdict.BETTER: "tab:green", Verdict.WORSE: "tab:red",
                   Verdict.EQUIVALENT: "tab:blue"}  # undecided, pending: grey


def learning_curve(history: list[dict[str, float]], title: str, path: Path,
                   diverged_epoch: int | None = None) -> Path:
    """Train and validation loss and accuracy per epoch, the best validation epoch marked, and the
    epoch whose loss went non-finite when the cell diverged (its history ends before it)."""
    epochs = range(1, len(history) + 1)
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for key, loss, acc, style in (("train", Metric.TRAIN_LOSS, Metric.TRAIN_ACC, "--"),
                                  ("val", Metric.VAL_LOSS, Metric.VAL_ACC, "-")):
        loss_ax.plot(epochs, [h[loss] for h in history], style, label=key)
        acc_ax.plot(epochs, [h[acc] for h in history], style, label=key)
    if history:
        best = min(epochs, key=lambda e: history[e - 1][Metric.VAL_LOSS])
        loss_ax.axvline(best, color="grey", lw=0.8, ls=":", label=f"best val (epoch {best})")
    if diverged_epoch is not None:
        for ax in (loss_ax, acc_ax):
            ax.axvline(diverged_epoch, color="tab:red", lw=0.8, label=f"diverged (epoch {diverged_epoch})")
            ax.set_xlim(0.5, diverged_epoch + 0.5)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title=f"{title}: loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title=f"{title}: accuracy")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.legend()
        ax.grid(alpha=0.3)
    return save_png(fig, path, dpi=100)


def _colour(verdict: str) -> str:
    return VERDICT_COLOURS.get(verdict, "tab:gray")


def fig_forest(summary: pd.DataFrame, margin: float) -> Figure:
    """Paired differences from the baseline with the intervals their verdicts were read from, the ±margin band
    and zero line; colour = verdict. Left of zero is better for a loss, right for an accuracy."""
    rows = summary[summary["variant"] != BASELINE]
    fig = Figure(figsize=(8, 1.8 + 0.42 * max(1, len(rows))), layout="constrained")
    ax = fig.subplots()
    if np.isfinite(margin):
        ax.axvspan(-margin, margin, color="tab:blue", alpha=0.08, label=f"±margin ({margin:.3g})")
    ax.axvline(0, color="black", lw=1)
    for y, r in enumerate(rows.itertuples()):
        colour = _colour(r.verdict_code)
        if np.isfinite(r.diff_low):
            ax.errorbar(r.diff, y, xerr=[[r.diff - r.diff_low], [r.diff_high - r.diff]], fmt="D", ms=7,
                        capsize=4, color=colour)
        elif np.isfinite(r.diff):
            ax.plot(r.diff, y, "D", ms=7, color=colour, mfc="none")
    for verdict in dict.fromkeys(rows["verdict_code"]):
        ax.errorbar([], [], fmt="D", color=_colour(verdict), label=verdict)
    level = rows["level"].dropna()
    ax.set_yticks(range(len(rows)), [f"{v} (n={n:.0f})" for v, n in zip(rows["variant"], rows["n_pairs"].fillna(0))])
    ax.invert_yaxis()
    metric = summary["metric"].iloc[0]
    ax.set_xlabel(f"{metric}: variant − baseline (same seed)")
    levels = ", ".join(f"{100 * x:.2f}%" for x in sorted(set(level), reverse=True))
    ax.set_title(f"Paired differences, intervals at {levels}" + (" (by the look that decided)" if level.nunique() > 1
                                                                   else "") if len(level)
                 else "Paired differences (no interval: fewer than 2 paired seeds)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig


def fig_curves(summary: pd.DataFrame, table: pd.DataFrame, epochs: pd.DataFrame) -> Figure:
    """Validation loss per epoch, mean over seeds with a ±1 sd band (the seed spread; a t-interval
    of two seeds would cover the plot); baseline in black."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    counted = table[table["in_stats"]]
    variant_of = dict(zip(counted["run_id"], counted["variant"]))  # the plan's names, not the runs' tags
    ep = epochs[epochs["run_id"].isin(variant_of)] if not epochs.empty else epochs
    ep = ep.assign(variant=ep["run_id"].map(variant_of))
    palette = iter(sns.color_palette("husl", max(1, len(summary))))
    for r in summary.itertuples():
        is_base = r.variant == BASELINE
        colour = "black" if is_base else next(palette)
        g = ep[ep["variant"] == r.variant] if not ep.empty else ep
        if g.empty:
            continue
        curve = g.groupby("epoch")[Metric.VAL_LOSS].agg(["mean", "std"])
        ax.plot(curve.index, curve["mean"], color=colour, lw=2.6 if is_base else 1.3,
                zorder=3 if is_base else 2, label=f"{r.variant} (n={r.n})")
        if r.n >= 2:
            ax.fill_between(curve.index, curve["mean"] - curve["std"], curve["mean"] + curve["std"],
                            color=colour, alpha=0.1, lw=0)
    if ep.empty:
        ax.text(0.5, 0.5, "no per-epoch metrics logged", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Validation loss per epoch (mean over seeds, band = ±1 sd)")
    return fig


def fig_cost(summary: pd.DataFrame) -> Figure:
    """Parameters (and MFLOPs per image, when logged) against the study's metric."""
    axes_for = [(Metric.N_PARAMS, "parameters (thousands)", 1e-3), (Metric.MFLOPS, "MFLOPs per image", 1.0)]
    axes_for = [a for a in axes_for if summary[a[0]].notna().any()] or axes_for[:1]
    fig = Figure(figsize=(6 * len(axes_for), 5), layout="constrained")
    axs = np.atleast_1d(fig.subplots(1, len(axes_for), sharey=True))
    s = summary[summary["n"] > 0]
    metric = summary["metric"].iloc[0]
    for ax, (col, label, scale) in zip(axs, axes_for):
        for r in s.itertuples():
            x = getattr(r, col) * scale
            err = [[r.mean - r.ci_low], [r.ci_high - r.mean]] if r.n >= 2 else None
            ax.errorbar(x, r.mean, yerr=err, fmt="o", capsize=3, color=_colour(r.verdict_code),
                        ms=8 if r.variant == BASELINE else 6)
            ax.annotate(r.variant, (x, r.mean), xytext=(5, 4), textcoords="offset points", fontsize=8)
        if len(s) and s.iloc[0]["variant"] == BASELINE:
            ax.axhline(s.iloc[0]["mean"], color="black", ls="--", lw=1)
        ax.set_xlabel(label)
        ax.set_title(f"{label.split(' (')[0]} vs {metric}")
    axs[0].set_ylabel(f"{metric} (mean, {stats.CONFIDENCE:.0%} t-interval)")
    return fig


def write_report_figures(summary: pd.DataFrame, table: pd.DataFrame, epochs: pd.DataFrame,
                         out_dir: Path, margin: float) -> list[tuple[str, str]]:
    """The report's three figures under out_dir/figures; returns (relative path, caption) pairs."""
    with sns.axes_style("whitegrid"):
        figures = [("differences.png", fig_forest(summary, margin),
                    "Difference from the baseline per variant with the interval its verdict was read from; "
                    "shaded: ±margin. Colour: verdict."),
                   ("val_loss_curves.png", fig_curves(summary, table, epochs),
                    "Validation loss per epoch, mean over seeds ± 1 sd; baseline in black."),
                   ("params_vs_metric.png", fig_cost(summary),
                    "Model size and compute against the study's metric; dashed line = baseline.")]
    for name, fig, _ in figures:
        save_png(fig, out_dir / "figures" / name)
    return [(f"figures/{name}", caption) for name, _, caption in figures]


def save_png(fig: Figure, path: Path, dpi: int = DPI) -> Path:
    """A figure as a PNG file, written atomically (a report rewritten by several SLURM tasks at once
    never shows half a picture)."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))

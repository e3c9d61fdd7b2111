"""Figures: the report's comparison plots and each cell's learning curve.

Built on matplotlib's Figure directly (no pyplot state), so workers and threads never share one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
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


CURVE_COLUMNS = 4  # panels per row of the curves figure
VARIANT_COLOUR = "tab:orange"  # every panel's variant curve (the baseline's is black; the verdict colours the title)
OFF_SCALE = 3.0  # a curve rising more than this many times as far as the typical one is left off the shared y-axis


def _curves(table: pd.DataFrame, epochs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Validation loss per epoch of each variant's cells in the statistics: mean, sd and count of seeds
    by epoch (a diverged seed's history ends early). Grouped by the plan's names, not the runs' tags."""
    if epochs.empty:
        return {}
    counted = table[table["in_stats"]]
    variant_of = dict(zip(counted["run_id"], counted["variant"]))
    ep = epochs[epochs["run_id"].isin(variant_of)]
    ep = ep.assign(variant=ep["run_id"].map(variant_of))
    return {v: g.groupby("epoch")[Metric.VAL_LOSS].agg(["mean", "std", "count"])
            for v, g in ep.groupby("variant", sort=False)}


def _shared_ylim(curves: dict[str, pd.DataFrame]) -> tuple[tuple[float, float], set[str]]:
    """y-limits that resolve the typical curves, and the curves left (partly) above them: a curve
    whose top (mean + sd) rises more than OFF_SCALE times as far above the lowest mean as the
    typical curve's (the lower median, so with two curves the lower one sets the scale)."""
    means = {v: c["mean"][np.isfinite(c["mean"])] for v, c in curves.items()}
    floor = min(m.min() for m in means.values() if len(m))
    top = {v: np.nanmax(c["mean"] + c["std"].fillna(0)) for v, c in curves.items() if len(means[v])}
    rises = sorted(t - floor for t in top.values())
    typical = rises[(len(rises) - 1) // 2]
    off = {v for v, t in top.items() if typical > 0 and t - floor > OFF_SCALE * typical}
    kept = [v for v in top if v not in off]
    low = min(np.nanmin(curves[v]["mean"] - curves[v]["std"].fillna(0)) for v in kept)
    low = max(low, 0.0) if floor >= 0 else low  # a loss's band stops at 0
    high = max(top[v] for v in kept)
    pad = 0.04 * (high - low) or 0.05 * abs(high) or 0.05
    return (low - pad, high + pad), off


def _draw_curve(ax, curve: pd.DataFrame, colour: str, label: str, z: int) -> None:
    ax.fill_between(curve.index, curve["mean"] - curve["std"], curve["mean"] + curve["std"], color=colour,
                    alpha=0.15, lw=0, zorder=z - 1)
    ax.plot(curve.index, curve["mean"], color=colour, lw=1.8, label=label, zorder=z)


def _panel_notes(variant: str, drawn: dict[str, pd.DataFrame | None], off: set[str], top: float) -> list[str]:
    """What a panel's curves hide: a curve above the shared axis, a mean that loses seeds (their
    histories ended: diverged), a variant with no seeds yet. The panel's own variant goes unnamed."""
    notes = []
    for name, curve in drawn.items():
        who = "" if name == variant else f"{name}: "
        if curve is None:
            notes.append(f"{who}no finished seeds")
            continue
        if name in off:
            peak = curve["mean"].max()
            notes.append(f"↑ {who}off scale, mean peaks at {peak:.3g}" if peak > top else
                         f"↑ {who}off scale, ±1 sd reaches {np.nanmax(curve['mean'] + curve['std']):.3g}")
        fewer = curve.index[curve["count"] < curve["count"].max()]
        if len(fewer):
            notes.append(f"{who}from epoch {fewer[0]}: mean of fewer seeds")
    return notes


def fig_curves(summary: pd.DataFrame, table: pd.DataFrame, epochs: pd.DataFrame) -> Figure:
    """Validation loss per epoch as small multiples: one panel per variant (the baseline alone when it
    is the only one), its mean over seeds beside the baseline's in every panel, each with a ±1 sd band
    (the seed spread; a t-interval of two seeds would cover the plot). The title names the variant, its
    seeds and its verdict, in the verdict's colour; panels share both axes, up to CURVE_COLUMNS a row.

    The shared y-axis is linear and clipped to the typical curves (_shared_ylim): a variant that
    diverges or barely learns (a loss 10x the others') is noted in its panel as off scale instead of
    flattening every other curve. A log scale was the alternative; it keeps every curve in view but
    compresses the small differences between the normal curves, which are what this figure is read for.
    """
    curves = _curves(table, epochs)
    if not curves:
        fig = Figure(figsize=(9, 4), layout="constrained")
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no per-epoch metrics logged", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlabel="epoch", ylabel="validation loss", title="Validation loss per epoch")
        return fig
    panels = [r for r in summary.itertuples() if r.variant != BASELINE] or list(summary.itertuples())
    ncols = min(CURVE_COLUMNS, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(max(7.0, 3.1 * ncols + 0.6), 1.3 + 2.4 * nrows), layout="constrained")
    axs = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    (low, high), off = _shared_ylim(curves)
    base = curves.get(BASELINE)
    for i, ax in enumerate(axs.flat):
        if i >= len(panels):
            ax.set_visible(False)
            axs.flat[i - ncols].tick_params(labelbottom=True)  # the column's lowest panel shows the epochs
            axs.flat[i - ncols].set_xlabel("epoch")
            continue
        r = panels[i]
        curve = curves.get(r.variant)
        if base is not None:
            _draw_curve(ax, base, "black", BASELINE, z=2)
        if curve is not None and r.variant != BASELINE:
            _draw_curve(ax, curve, VARIANT_COLOUR, r.variant, z=4)
        n = int(curve["count"].max()) if curve is not None else 0
        verdict = "" if r.variant == BASELINE else f": {r.verdict_code}"
        ax.set_title(f"{r.variant} (n={n}){verdict}", color=_colour(r.verdict_code), fontsize=9.5,
                     fontweight="bold" if verdict else "normal")
        notes = _panel_notes(r.variant, {BASELINE: base, r.variant: curve}, off, high)
        if notes:
            ax.text(0.97, 0.95, "\n".join(notes), transform=ax.transAxes, ha="right", va="top", fontsize=7.5,
                    bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="0.7", alpha=0.9), zorder=6)
        ax.grid(alpha=0.3)
        if i >= len(axs.flat) - ncols:
            ax.set_xlabel("epoch")
    axs.flat[0].set_ylim(low, high)
    axs.flat[0].xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    handles = [Line2D([], [], color="black", lw=1.8, label=BASELINE)] if base is not None else []
    if any(r.variant != BASELINE for r in panels):
        handles.append(Line2D([], [], color=VARIANT_COLOUR, lw=1.8, label="variant"))
    handles.append(Patch(color="0.5", alpha=0.3, label="±1 sd over seeds"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False, fontsize=9)
    fig.suptitle("Validation loss per epoch, mean over seeds" if len(handles) < 3 else
                 "Validation loss per epoch: variant vs baseline, mean over seeds", fontsize=11)
    fig.supylabel("validation loss", fontsize=10)
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


def report_figures(summary: pd.DataFrame, table: pd.DataFrame, epochs: pd.DataFrame,
                   margin: float) -> list[tuple[str, Figure, str]]:
    """The report's three figures: (name, figure, caption) each (the report saves them, the API
    returns them)."""
    import seaborn as sns  # 0.3 s: a worker that only draws learning curves never needs it
    with sns.axes_style("whitegrid"):
        return [("differences", fig_forest(summary, margin),
                 "Difference from the baseline per variant with the interval its verdict was read from; "
                 "shaded: ±margin. Colour: verdict."),
                ("val_loss_curves", fig_curves(summary, table, epochs),
                    "Validation loss per epoch, one panel per variant (orange) beside the baseline (black): "
                    "mean over seeds ± 1 sd, shared axes; title colour: verdict. A curve far above the "
                    "others is marked off scale in its panel rather than squashing the rest."),
                ("params_vs_metric", fig_cost(summary),
                 "Model size and compute against the study's metric; dashed line = baseline.")]


def write_report_figures(summary: pd.DataFrame, table: pd.DataFrame, epochs: pd.DataFrame,
                         out_dir: Path, margin: float) -> list[tuple[str, str]]:
    """The report's figures as PNGs under out_dir/figures; returns (relative path, caption) pairs."""
    figures = report_figures(summary, table, epochs, margin)
    for name, fig, _ in figures:
        save_png(fig, out_dir / "figures" / f"{name}.png")
    return [(f"figures/{name}.png", caption) for name, _, caption in figures]


def save_png(fig: Figure, path: Path, dpi: int = DPI) -> Path:
    """A figure as a PNG file, written atomically (a report rewritten by several SLURM tasks at once
    never shows half a picture)."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))

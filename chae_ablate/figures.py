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
from .study import BASELINE

DPI = 120
VERDICT_COLOURS = {"baseline": "black", "better": "tab:green", "worse": "tab:red",
                   "no significant difference": "tab:blue"}  # anything else: grey


def learning_curve(history: list[dict[str, float]], title: str, path: Path) -> Path:
    """Train and validation loss and accuracy per epoch, best validation epoch marked."""
    epochs = range(1, len(history) + 1)
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for key, style in (("train", "--"), ("val", "-")):
        loss_ax.plot(epochs, [h[f"{key}_loss"] for h in history], style, label=key)
        acc_ax.plot(epochs, [h[f"{key}_acc"] for h in history], style, label=key)
    best = min(epochs, key=lambda e: history[e - 1]["val_loss"])
    loss_ax.axvline(best, color="grey", lw=0.8, ls=":", label=f"best val (epoch {best})")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title=f"{title}: loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title=f"{title}: accuracy")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _colour(verdict: str) -> str:
    return VERDICT_COLOURS.get(verdict, "tab:gray")


def _labels(summary: pd.DataFrame) -> list[str]:
    return [f"{v} (n={n})" for v, n in zip(summary["variant"], summary["n"])]


def fig_best_val_loss(summary: pd.DataFrame, table: pd.DataFrame) -> Figure:
    """Seeds as dots, mean with its t-interval, baseline mean and interval as a band."""
    fig = Figure(figsize=(8, 1.6 + 0.42 * len(summary)), layout="constrained")
    ax = fig.subplots()
    used = table[table["in_stats"]]
    for y, r in enumerate(summary.itertuples()):
        seeds = used.loc[used["variant"] == r.variant, "best_val_loss"]
        ax.scatter(seeds, np.full(len(seeds), y), s=18, color=_colour(r.verdict), alpha=0.35, zorder=2)
        err = [[r.best_val_loss_mean - r.best_val_loss_ci_low], [r.best_val_loss_ci_high - r.best_val_loss_mean]]
        ax.errorbar(r.best_val_loss_mean, y, xerr=err if r.n >= 2 else None, fmt="D", ms=7, capsize=4,
                    color=_colour(r.verdict), zorder=3)
    base = summary.iloc[0]
    if base["n"] > 0:
        ax.axvline(base["best_val_loss_mean"], color="black", ls="--", lw=1, label="baseline mean")
        if base["n"] >= 2:
            ax.axvspan(base["best_val_loss_ci_low"], base["best_val_loss_ci_high"], color="black",
                       alpha=0.08, label=f"baseline {stats.CONFIDENCE:.0%} CI")
    for verdict in dict.fromkeys(summary["verdict"]):
        ax.scatter([], [], marker="D", color=_colour(verdict), label=verdict)
    ax.set_yticks(range(len(summary)), _labels(summary))
    ax.invert_yaxis()
    ax.set_xlabel("lowest validation loss (lower is better)")
    ax.set_title(f"Best validation loss per variant: mean, {stats.CONFIDENCE:.0%} t-interval, dots = seeds")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    return fig


def fig_curves(summary: pd.DataFrame, table: pd.DataFrame, epochs: pd.DataFrame) -> Figure:
    """Validation loss per epoch, mean over seeds with a ±1 sd band (the seed spread; a t-interval
    of two seeds would cover the plot); baseline in black."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    runs = set(table.loc[table["in_stats"], "run_id"])
    ep = epochs[epochs["run_id"].isin(runs)] if not epochs.empty else epochs
    palette = iter(sns.color_palette("husl", max(1, len(summary) - 1)))
    for r in summary.itertuples():
        is_base = r.variant == BASELINE
        colour = "black" if is_base else next(palette)
        g = ep[ep["variant"] == r.variant] if not ep.empty else ep
        if g.empty:
            continue
        curve = g.groupby("epoch")["val_loss"].agg(["mean", "std"])
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
    """Parameters (and MFLOPs per image, when logged) against best validation loss."""
    axes_for = [("n_params", "parameters (thousands)", 1e-3), ("mflops", "MFLOPs per image", 1.0)]
    axes_for = [a for a in axes_for if summary[a[0]].notna().any()] or axes_for[:1]
    fig = Figure(figsize=(6 * len(axes_for), 5), layout="constrained")
    axs = np.atleast_1d(fig.subplots(1, len(axes_for), sharey=True))
    s = summary[summary["n"] > 0]
    for ax, (col, label, scale) in zip(axs, axes_for):
        for r in s.itertuples():
            x = getattr(r, col) * scale
            err = [[r.best_val_loss_mean - r.best_val_loss_ci_low], [r.best_val_loss_ci_high - r.best_val_loss_mean]]
            ax.errorbar(x, r.best_val_loss_mean, yerr=err if r.n >= 2 else None, fmt="o", capsize=3,
                        color=_colour(r.verdict), ms=8 if r.variant == BASELINE else 6)
            ax.annotate(r.variant, (x, r.best_val_loss_mean), xytext=(5, 4), textcoords="offset points", fontsize=8)
        if len(s) and s.iloc[0]["variant"] == BASELINE:
            ax.axhline(s.iloc[0]["best_val_loss_mean"], color="black", ls="--", lw=1)
        ax.set_xlabel(label)
        ax.set_title(f"{label.split(' (')[0]} vs best validation loss")
    axs[0].set_ylabel(f"lowest validation loss (mean, {stats.CONFIDENCE:.0%} CI)")
    return fig


FIGURES = ("figures/best_val_loss.png", "figures/val_loss_curves.png", "figures/params_vs_loss.png")


def write_report_figures(summary: pd.DataFrame, table: pd.DataFrame, epochs: pd.DataFrame,
                         out_dir: Path) -> list[tuple[str, str]]:
    """The report's three figures under out_dir/figures; returns (relative path, caption) pairs."""
    with sns.axes_style("whitegrid"):
        figures = [("best_val_loss.png", fig_best_val_loss(summary, table),
                    "Lowest validation loss per variant; baseline mean dashed, its interval shaded."),
                   ("val_loss_curves.png", fig_curves(summary, table, epochs),
                    "Validation loss per epoch, mean over seeds ± 1 sd; baseline in black."),
                   ("params_vs_loss.png", fig_cost(summary),
                    "Model size and compute against lowest validation loss; dashed line = baseline.")]
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    for name, fig, _ in figures:
        fig.savefig(out_dir / "figures" / name, dpi=DPI)
    return [(f"figures/{name}", caption) for name, _, caption in figures]

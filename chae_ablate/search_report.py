"""The report of a search: what was tried, which knobs mattered, and whether the best held up.

reports/<study>-search/: report.md, report.html, trials.csv and figures (optimisation history,
fANOVA importances, one slice per knob). Its last section is the confirmation study's verdicts:
the search's best configurations re-tested against the baseline on fresh seeds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .figures import save_png
from .ledger import OVER_BUDGET, PRUNERS, REJECTED
from .records import CellState
from .files import atomic_write_text, inside
from .render import Block, render_html, render_markdown
from .report import verdict_table

STATE_COLOURS = {CellState.DONE: "tab:blue", CellState.PRUNED: "tab:orange", CellState.FAILED: "tab:red"}


def trials_table(trials: list[dict]) -> pd.DataFrame:
    """One row per trial, one column per knob."""
    rows = [{"trial": t["number"], "state": t["state"], "value": t["value"], "pruned_at_epoch": t["pruned_at_epoch"],
             "loss_when_pruned": t["loss_when_pruned"], "retry_of": t["retry_of"], "reason": t["reason"],
             **t["params"]} for t in trials]
    return pd.DataFrame(rows).sort_values("trial").reset_index(drop=True) if rows else pd.DataFrame(
        columns=["trial", "state", "value", "pruned_at_epoch", "loss_when_pruned", "retry_of", "reason"])


def fig_history(table: pd.DataFrame) -> Figure:
    """Each trial's value (pruned trials at the top edge, marked) and the best so far."""
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    done = table[table["state"] == CellState.DONE]
    ax.scatter(done["trial"], done["value"], color=STATE_COLOURS[CellState.DONE], label="trained", zorder=3)
    if len(done):
        best = done["value"].cummin()
        ax.step(done["trial"], best, where="post", color="black", lw=1.2, label="best so far")
    pruned = table[table["state"] == CellState.PRUNED]
    if len(pruned):
        top = done["value"].max() if len(done) else 1.0
        ax.scatter(pruned["trial"], np.full(len(pruned), top), marker="x", color=STATE_COLOURS[CellState.PRUNED],
                   label=f"pruned ({len(pruned)})", zorder=3)
    ax.set(xlabel="trial", ylabel="best validation loss (mean over the trial's seeds)", title="Optimisation history")
    ax.legend(fontsize=8, frameon=False)
    return fig


def fig_importances(importances: dict[str, float]) -> Figure:
    fig = Figure(figsize=(7, 1.2 + 0.4 * max(1, len(importances))), layout="constrained")
    ax = fig.subplots()
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:blue")
    else:
        ax.text(0.5, 0.5, "fewer than two finished trials with different values", ha="center", va="center",
                transform=ax.transAxes)
    ax.set(xlabel="importance (fANOVA, share of the value's variance)", title="Which knobs mattered")
    return fig


def fig_slices(table: pd.DataFrame, knobs: list) -> Figure:
    """Value against each knob (a config.Knob), one panel per knob (finished trials)."""
    cols = min(3, max(1, len(knobs)))
    rows = -(-max(1, len(knobs)) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    done = table[table["state"] == CellState.DONE]
    for ax, knob in zip(axes, knobs):
        values = done[knob.path] if knob.path in done else pd.Series(dtype=float)
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        ax.scatter(values if numeric else values.astype(str), done["value"], c=done["trial"], cmap="viridis", s=24)
        if knob.log:
            ax.set_xscale("log")
        ax.set(xlabel=knob.path, ylabel="value", title=knob.path)
    for ax in axes[len(knobs):]:
        ax.set_visible(False)
    fig.suptitle("Slices: value against each knob (colour = trial number)")
    return fig


def write_search_report(study, summary, importances: dict[str, float], curve: dict[int, float],
                        margin: float, out_dir: Path | None = None) -> Path:
    """Write the search report; returns report.md's path."""
    out = Path(out_dir) if out_dir is not None else inside(Path("reports"), summary.name)
    table = trials_table(summary.trials)
    atomic_write_text(out / "trials.csv", table.to_csv(index=False))
    with sns.axes_style("whitegrid"):
        figures = [("history.png", fig_history(table), "Each trained trial's value and the best so far; x: pruned."),
                   ("importances.png", fig_importances(importances), "fANOVA importance of each knob."),
                   ("slices.png", fig_slices(table, list(study.space)), "Value against each knob.")]
    for name, fig, _ in figures:
        save_png(fig, out / "figures" / name)
    blocks = _blocks(study, summary, table, importances, curve, margin,
                     [(f"figures/{name}", caption) for name, _, caption in figures])
    atomic_write_text(out / "report.html", render_html(blocks, out))
    return atomic_write_text(out / "report.md", render_markdown(blocks))


def _blocks(study, summary, table: pd.DataFrame, importances, curve, margin, figures) -> list[Block]:
    s = study.search
    counts = table["state"].value_counts()
    done = table[table["state"] == CellState.DONE].sort_values(["value", "trial"])
    rejected = table[table["state"] == REJECTED]
    knobs = [k.path for k in study.space]
    best = done.head(10)[["trial", "value", *knobs]].copy()
    best["value"] = best["value"].map(lambda v: f"{v:.4f}")
    for knob in knobs:
        best[knob] = best[knob].map(lambda v: f"{v:.4g}" if isinstance(v, float) else str(v))
    pruner = PRUNERS[s.pruner].about.format(margin=margin, epochs=len(curve), seeds=list(s.seeds))
    blocks: list[Block] = [
        ("h1", f"Search report: {study.name}"),
        ("p", f"Sampler: {s.sampler}; pruner: {pruner}. Budget: {summary.budget} trained trials"
              f"{f' (--trials; the study file says {s.trials})' if summary.budget != s.trials else ''} (rejected "
              f"combinations do not count), seeds per trial: {list(s.seeds)}."),
        ("p", f"Trials: {int(counts.get(CellState.DONE, 0))} finished, {int(counts.get(CellState.PRUNED, 0))} pruned, "
              f"{len(rejected)} rejected by the builder, {int(counts.get(OVER_BUDGET, 0))} over the budget "
              f"(asked by racing workers), {int(counts.get(CellState.FAILED, 0))} failed or interrupted "
              f"(an interrupted trial is re-run with the same knobs)."),
        ("h2", "Best trials"), ("table", best),
        ("h2", "Which knobs mattered"),
        ("p", ", ".join(f"`{k}` {v:.2f}" for k, v in importances.items()) or "Not enough finished trials."),
        ("h2", "Figures"), *[("img", path, caption) for path, caption in figures]]
    if len(rejected):
        reasons = rejected["reason"].str.replace(r"^trial \d+\.", "", regex=True).value_counts()
        blocks += [("h2", "Rejected combinations"), ("list", [f"{n} x {why}" for why, n in reasons.items()])]
    blocks += [("h2", "Confirmation on fresh seeds")]
    confirmation = summary.confirmation
    if confirmation is None or confirmation.report is None:
        blocks.append(("p", "Nothing to confirm: no trial finished, or the best configuration was the "
                            "baseline itself."))
    else:
        confirm = pd.read_csv(confirmation.report.parent / "summary.csv", keep_default_na=False, na_values=[""])
        blocks += [("p", f"The top {len(confirm) - 1} configurations, re-tested against the baseline as the "
                         f"study `{confirmation.study}` with fresh seeds from {s.confirm_seed} and adaptive seeding "
                         f"(full report: {confirmation.report}). Only these verdicts are findings; the search values "
                         "above are the best of many tries and overstate them."),
                   ("table", verdict_table(confirm))]
    blocks += [("h2", "All trials"),
               ("p", "value: a finished trial's mean lowest validation loss; a pruned trial has none, only its first "
                     "seed's validation loss at the epoch it was stopped (loss_when_pruned), which is not comparable."),
               ("table", table.drop(columns=["reason"]).astype(str)),
               ("h2", "Method"),
               ("p", "Trials are asked from Optuna's sampler over the knobs of `search.space`; each trains the "
                     "search's seeds and its value is the mean lowest validation loss. A trial whose worker died "
                     "is re-queued with the same knobs and resumes from its checkpoint; its budget slot carries "
                     "over. Parameter importances: Optuna's fANOVA evaluator (Hutter et al. 2014) over the finished "
                     "trials. The confirmation study's method is in its own report.")]
    return blocks

"""The report of a search: what was tried, which knobs mattered, and whether the best held up.

reports/<study>-search/: report.md, report.html, trials.csv and figures (optimisation history,
parallel coordinates, fANOVA importances, one slice per knob). Its last section is the confirmation
study's verdicts: the search's best configurations re-tested against the baseline on fresh seeds.
An interrupted search writes the same report of the trials done so far, and says that it is partial.

Only a finished trial has a value (the mean of its seeds' lowest validation loss). A pruned trial's
loss at the epoch it was stopped is shown apart, never plotted or tabled as a value.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .figures import save_png
from .files import atomic_write_text, inside
from .ledger import OVER_BUDGET, PRUNERS, REJECTED
from .records import CellState
from .render import Block, render_html, render_markdown
from .report import number_text as num, read_summary, verdict_table

STATE_COLOURS = {CellState.DONE: "tab:blue", CellState.PRUNED: "tab:orange", CellState.FAILED: "tab:red",
                 REJECTED: "tab:gray"}
LABEL_BOX = {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85}  # a label over the lines
COLUMNS = ["trial", "state", "value", "pruned_at_epoch", "loss_when_pruned", "retry_of", "reason"]


# --- how a search's trials read, in the report and in the progress lines ---------------------------

def value_text(value) -> str:
    """A knob's value: a float to 4 significant digits, a missing one as '–'."""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "–"
    return str(value)


def short_names(paths: Iterable[str]) -> dict[str, str]:
    """Each knob path's shortest dotted suffix that no other knob's path ends with
    (model.transformer.depth -> depth; stages.0.kernel and stages.1.kernel keep their index)."""
    paths = list(paths)
    out = {}
    for path in paths:
        parts = path.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != path and (other == suffix or other.endswith("." + suffix)) for other in paths):
                break
        out[path] = suffix
    return out


def knobs_text(params: Mapping[str, object]) -> str:
    """A trial's knobs on one line, e.g. 'depth=2 heads=4 lr=0.0003162'."""
    names = short_names(params)
    return " ".join(f"{names[path]}={value_text(value)}" for path, value in params.items())


def without_trial(reason: str) -> str:
    """A builder's rejection without the 'trial N.' its message starts with (the line names the trial)."""
    return re.sub(r"^trial \d+\.", "", reason)


def loss_text(value: float | None) -> str:
    """A trial's value as its progress line says it: 4 decimals; '–' for none."""
    return num(value, ".4f") if value is None or math.isfinite(value) else "– (a seed diverged)"


# --- the table ----------------------------------------------------------------------------------

def trials_table(trials: list[dict]) -> pd.DataFrame:
    """One row per trial, one column per knob (trials.csv: the raw numbers)."""
    rows = [{"trial": t["number"], "state": t["state"], "value": t["value"], "pruned_at_epoch": t["pruned_at_epoch"],
             "loss_when_pruned": t["loss_when_pruned"], "retry_of": t["retry_of"], "reason": t["reason"],
             **t["params"]} for t in trials]
    table = pd.DataFrame(rows).sort_values("trial").reset_index(drop=True) if rows else pd.DataFrame(columns=COLUMNS)
    return table.astype({c: float for c in ("value", "pruned_at_epoch", "loss_when_pruned", "retry_of")})


def finished(table: pd.DataFrame) -> pd.DataFrame:
    """The trials with a value: finished, and no seed diverged."""
    return table[(table["state"] == CellState.DONE) & np.isfinite(table["value"].astype(float))]


def state_text(row) -> str:
    """A trial's state in words; a failed trial without a reason is one whose worker stopped or died
    (re-queued, and re-run as a later trial with the same knobs)."""
    if row.state == CellState.DONE and not math.isfinite(row.value):
        return "finished, a seed diverged"
    if row.state == CellState.FAILED and not row.reason:
        return "interrupted, re-queued"
    return {CellState.DONE: "finished", OVER_BUDGET: "over the budget"}.get(row.state, str(row.state))


def shown_table(table: pd.DataFrame, knobs: list[str]) -> pd.DataFrame:
    """The trials as the report shows them: formatted numbers, a pruned trial's partial loss in its
    own column, never in the value column."""
    return pd.DataFrame({
        "trial": table["trial"].astype(int).astype(str), "state": [state_text(r) for r in table.itertuples()],
        "value": [num(v, ".4f") for v in table["value"]],
        "loss when pruned (epoch, first seed)": [
            f"{num(loss, '.4f')} (epoch {epoch:.0f})" if np.isfinite(epoch) else "–"
            for loss, epoch in zip(table["loss_when_pruned"], table["pruned_at_epoch"])],
        "re-run of": [num(x, ".0f") for x in table["retry_of"]],
        **{k: [value_text(v) for v in table[k]] if k in table else "–" for k in knobs}})


# --- the figures --------------------------------------------------------------------------------

def fig_history(table: pd.DataFrame) -> Figure:
    """Each finished trial's value and the best so far, on an integer trial axis. Trials without a
    value (pruned, failed, rejected) are ticks on a strip of their own below it, at their trial
    number: never at a made-up loss. A pruned tick is labelled with the epoch it was stopped at."""
    fig = Figure(figsize=(8, 4.6), layout="constrained")
    ax, strip = fig.subplots(2, 1, sharex=True, height_ratios=[6, 1])
    done = finished(table)
    if len(done):
        ax.scatter(done["trial"], done["value"], color=STATE_COLOURS[CellState.DONE], label=f"finished ({len(done)})",
                   zorder=3)
        ax.step(done["trial"], done["value"].cummin(), where="post", color="black", lw=1.2, label="best so far")
    else:
        ax.text(0.5, 0.5, "no finished trial", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    pruned = table[table["state"] == CellState.PRUNED]
    failed = table[table["state"] == CellState.FAILED]
    for rows, state, label in ((pruned, CellState.PRUNED, f"pruned ({len(pruned)}; number: the epoch it was "
                                                          "stopped at)"),
                               (failed, CellState.FAILED, f"failed or interrupted ({len(failed)})"),
                               (table[table["state"] == REJECTED], REJECTED, "rejected by the builder")):
        if len(rows):
            strip.plot(rows["trial"], np.full(len(rows), 0.5), ls="none", marker="|", ms=14, mew=2,
                       color=STATE_COLOURS[state], label=label)
    for trial, epoch in zip(pruned["trial"], pruned["pruned_at_epoch"]):
        if np.isfinite(epoch):
            strip.text(trial + 0.08, 0.5, f"{epoch:.0f}", va="center", fontsize=7, color=STATE_COLOURS[CellState.PRUNED])
    if len(table):
        ax.set_xlim(table["trial"].min() - 0.5, table["trial"].max() + 0.5)
    strip.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    strip.set(ylim=(0, 1), yticks=[], xlabel="trial")
    strip.set_ylabel("no value", rotation=0, ha="right", va="center", fontsize=8)
    strip.grid(False, axis="y")
    ax.set(ylabel="best validation loss\n(mean over the trial's seeds)", title="Optimisation history")
    handles = [h for a in (ax, strip) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1))
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
    """Value against each knob (a space.Knob), one panel per knob (finished trials), the knob's whole
    space on the x axis, placed as in the parallel coordinates (knob_axis)."""
    cols = min(3, max(1, len(knobs)))
    rows = -(-max(1, len(knobs)) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    done = finished(table)
    for ax, knob in zip(axes, knobs):
        placed, labels = knob_axis(knob, done[knob.path] if knob.path in done else pd.Series(dtype=float))
        ax.scatter(placed, done["value"], c=done["trial"], cmap="viridis", s=24)
        ax.set_xticks([x for x, _ in labels], [text for _, text in labels])
        ax.set_xlim(-0.05, 1.05)
        ax.set(xlabel=knob.path, ylabel="value", title=knob.path)
        if done.empty:  # a partial report before any trial finished: no made-up value axis
            ax.set_yticks([])
            ax.text(0.5, 0.5, "no finished trial yet", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[len(knobs):]:
        ax.set_visible(False)
    fig.suptitle("Slices: value against each knob (colour = trial number)")
    return fig


def knob_axis(knob, values: pd.Series) -> tuple[np.ndarray, list[tuple[float, str]]]:
    """A knob's values placed on a [0, 1] axis, and the axis' labels (position, text): a
    categorical knob's levels evenly spaced in the space's order, a range scaled from its low to its
    high (log-scaled for a log knob)."""
    if knob.choices:
        n = len(knob.choices)
        levels = {c: i / (n - 1) if n > 1 else 0.5 for i, c in enumerate(knob.choices)}
        return (np.array([levels.get(v, math.nan) for v in values], dtype=float),
                [(y, value_text(c)) for c, y in levels.items()])
    scale = np.log10 if knob.log else np.asarray
    low, high = (float(scale(float(x))) for x in (knob.low, knob.high))
    placed = (scale(values.astype(float).to_numpy()) - low) / (high - low)
    inner = ([10.0 ** e for e in range(math.floor(low) + 1, math.ceil(high))] if knob.log
             else [(knob.low + knob.high) / 2])  # decades of a log range, the middle of another
    return placed, [((float(scale(v)) - low) / (high - low), value_text(v)) for v in (knob.low, *inner, knob.high)]


def fig_parallel(table: pd.DataFrame, knobs: list) -> Figure:
    """Parallel coordinates: one vertical axis per knob and a last one for the value, one line per
    finished trial coloured by its value; the best trial in red."""
    done = finished(table).sort_values(["value", "trial"], ascending=False)  # the best drawn last, on top
    names = short_names(k.path for k in knobs)
    xs = np.arange(len(knobs) + 1)
    fig = Figure(figsize=(2 + 1.7 * len(xs), 4.6), layout="constrained")
    ax = fig.subplots()
    ax.vlines(xs, 0, 1, color="0.6", lw=1)
    columns = []
    for x, knob in zip(xs, knobs):
        placed, labels = knob_axis(knob, done[knob.path] if knob.path in done else pd.Series([math.nan] * len(done)))
        columns.append(placed)
        for y, text in labels:
            ax.text(x + 0.04, y, text, va="center", fontsize=7, zorder=5, bbox=LABEL_BOX)
    values = done["value"].to_numpy(dtype=float)
    low, high = (values.min(), values.max()) if len(values) else (0.0, 1.0)
    columns.append((values - low) / (high - low) if high > low else np.full(len(values), 0.5))
    for y, v in ((0.0, low), (1.0, high)) if len(values) else ():
        ax.text(xs[-1] + 0.04, y, num(v, ".4f"), va="center", fontsize=7, zorder=5, bbox=LABEL_BOX)
    colours = ScalarMappable(Normalize(low, high), "viridis")
    best = done["trial"].iloc[-1] if len(done) else None
    for i, row in enumerate(done.itertuples()):
        ys = [column[i] for column in columns]
        if row.trial == best:
            ax.plot(xs, ys, color="tab:red", lw=2.8, zorder=3, label=f"best: trial {row.trial} ({row.value:.4f})")
        else:
            ax.plot(xs, ys, color=colours.to_rgba(row.value), lw=1.3, alpha=0.85)
    if len(done):
        fig.colorbar(colours, ax=ax, label="value (best validation loss)", pad=0.02)
        ax.legend(fontsize=8, frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    else:
        ax.text(0.5, 0.5, "no finished trial", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks(xs, [names[k.path] for k in knobs] + ["value"])
    ax.set_yticks([])
    ax.set(xlim=(-0.3, xs[-1] + 0.5), ylim=(-0.05, 1.05))
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.grid(False)
    ax.set_title("Knobs of each finished trial against its value", pad=22 if len(done) else None)
    return fig


# --- the report ---------------------------------------------------------------------------------

def write_search_report(study, summary, importances: dict[str, float], curve: dict[int, float],
                        margin: float, out_dir: Path | None = None) -> Path:
    """Write the search report (a partial one when summary.interrupted); returns report.md's path."""
    out = Path(out_dir) if out_dir is not None else inside(Path("reports"), summary.name)
    table = trials_table(summary.trials)
    atomic_write_text(out / "trials.csv", table.to_csv(index=False))
    knobs = list(study.space)
    with sns.axes_style("whitegrid"):
        figures = [("history.png", fig_history(table),
                    "Each finished trial's value and the best so far. Below, apart from the loss axis: the trials "
                    "without a value (pruned, labelled with the epoch it was stopped at; failed; rejected)."),
                   ("parallel.png", fig_parallel(table, knobs),
                    "Parallel coordinates: one line per finished trial through its knobs (ranges scaled from the "
                    "space's low to high, log knobs on a log scale; categories evenly spaced) to its value, "
                    "coloured by the value; the best trial in red."),
                   ("importances.png", fig_importances(importances), "fANOVA importance of each knob."),
                   ("slices.png", fig_slices(table, knobs), "Value against each knob (finished trials).")]
    for name, fig, _ in figures:
        save_png(fig, out / "figures" / name)
    blocks = _blocks(study, summary, table, importances, curve, margin,
                     [(f"figures/{name}", caption) for name, _, caption in figures])
    atomic_write_text(out / "report.html", render_html(blocks, out))
    return atomic_write_text(out / "report.md", render_markdown(blocks))


LAST_EPOCH_KEPT = " (never after a trial's last epoch: with one seed that would save nothing)"


def _blocks(study, summary, table: pd.DataFrame, importances, curve, margin, figures) -> list[Block]:
    s = study.search
    counts = table["state"].value_counts()
    done = finished(table).sort_values(["value", "trial"])
    rejected = table[table["state"] == REJECTED]
    failed = table[(table["state"] == CellState.FAILED) & (table["reason"].fillna("") != "")]
    knobs = [k.path for k in study.space]
    pruner = PRUNERS[s.pruner].about.format(margin=margin, epochs=len(curve), seeds=list(s.seeds))
    trained = int(counts.get(CellState.DONE, 0) + counts.get(CellState.PRUNED, 0)) + len(failed)
    blocks: list[Block] = [("h1", f"Search report: {study.name}")]
    if summary.interrupted:
        blocks.append(("p", f"Partial report: the search was interrupted ({summary.interrupted}) with {trained} "
                            f"of its {summary.budget} trials trained; its confirmation has not run. Rerun the same "
                            "command to resume it."))
    blocks += [
        ("p", f"Sampler: {s.sampler}; pruner: {pruner}{LAST_EPOCH_KEPT * (len(s.seeds) == 1)}. "
              f"Budget: {summary.budget} trained trials"
              f"{f' (--trials; the study file says {s.trials})' if summary.budget != s.trials else ''} (rejected "
              f"combinations do not count), seeds per trial: {list(s.seeds)}."),
        ("p", f"Trials: {int(counts.get(CellState.DONE, 0))} finished, {int(counts.get(CellState.PRUNED, 0))} pruned, "
              f"{len(rejected)} rejected by the builder, {int(counts.get(OVER_BUDGET, 0))} over the budget "
              f"(asked by racing workers), {int(counts.get(CellState.FAILED, 0))} failed or interrupted "
              f"(an interrupted trial is re-run with the same knobs)."),
        ("h2", "Best trials"),
        ("table", shown_table(done.head(10), knobs)[["trial", "value", *knobs]]) if len(done) else
        ("p", "No trial has finished yet."),
        ("h2", "Which knobs mattered"),
        ("p", ", ".join(f"`{k}` {v:.2f}" for k, v in importances.items()) or "Not enough finished trials."),
        ("h2", "Figures"), *[("img", path, caption) for path, caption in figures]]
    if len(rejected):
        reasons = rejected["reason"].map(without_trial).value_counts()
        blocks += [("h2", "Rejected combinations"), ("list", [f"{n} x {why}" for why, n in reasons.items()])]
    if len(failed):
        blocks += [("h2", "Failed trials"),
                   ("list", [f"trial {r.trial}: {r.reason.splitlines()[0][:300]}" for r in failed.itertuples()])]
    blocks += [("h2", "Confirmation on fresh seeds")]
    confirmation = summary.confirmation
    if summary.interrupted:
        blocks.append(("p", "Not run yet: the search was interrupted before it. Rerun the same command."))
    elif confirmation is None or confirmation.report is None:
        blocks.append(("p", "Nothing to confirm: no trial finished, or the best configuration was the "
                            "baseline itself."))
    else:
        confirm = read_summary(confirmation.report.parent).fillna({"variance": ""})  # the baseline has none
        blocks += [("p", f"The top {len(confirm) - 1} configurations, re-tested against the baseline as the "
                         f"study `{confirmation.study}` with fresh seeds from {s.confirm_seed} and adaptive seeding "
                         f"(full report: {confirmation.report}). Only these verdicts are findings; the search values "
                         "above are the best of many tries and overstate them."),
                   ("table", verdict_table(confirm))]
    blocks += [("h2", "All trials"),
               ("p", "value: a finished trial's mean lowest validation loss. A pruned trial has none, only its first "
                     "seed's validation loss at the epoch it was stopped, which is not comparable."),
               ("table", shown_table(table, knobs)) if len(table) else ("p", "No trials yet."),
               ("h2", "Method"),
               ("p", "Trials are asked from Optuna's sampler over the knobs of `search.space`; each trains the "
                     "search's seeds and its value is the mean lowest validation loss. A trial whose worker died "
                     "or was stopped is re-queued with the same knobs and resumes from its checkpoint; its budget "
                     "slot carries over. Parameter importances: Optuna's fANOVA evaluator (Hutter et al. 2014) "
                     "over the finished trials. The confirmation study's method is in its own report.")]
    return blocks

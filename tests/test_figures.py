"""The report's curves figure: small multiples, one panel per variant beside the baseline, built
from hand-made summary/table/epochs frames (the columns report.summarize, report.cell_table and
tracking.load_study_runs give)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from chae_ablate import figures
from chae_ablate.metrics import EPOCH_METRICS, Metric
from chae_ablate.records import BASELINE, DECISIONS, Verdict

SEEDS = (0, 1, 2)
N_EPOCHS = 6


def loss_curve(start: float, end: float, seed: int) -> list[float]:
    """A decreasing validation loss, a little different per seed."""
    return list(np.linspace(start, end, N_EPOCHS) + 0.03 * seed * np.cos(np.arange(N_EPOCHS) + seed))


def study(n_variants: int, blown_up: str | None = None) -> dict[str, dict[int, list[float]]]:
    """variant -> seed -> val loss per epoch; `blown_up` has 10x the others' losses."""
    losses = {BASELINE: {s: loss_curve(2.0, 0.6, s) for s in SEEDS}}
    for k in range(n_variants):
        losses[f"v{k}"] = {s: loss_curve(2.0 + 0.05 * k, 0.55 + 0.03 * k, s) for s in SEEDS}
    if blown_up:
        losses[blown_up] = {s: [10 * x for x in ls] for s, ls in losses[blown_up].items()}
    return losses


def frames(losses: dict[str, dict[int, list[float]]]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(summary, table, epochs) with the columns fig_curves reads; every cell in the statistics."""
    verdicts = [Verdict.BASELINE, *DECISIONS, Verdict.PENDING]
    summary = pd.DataFrame({"variant": list(losses), "n": [len(by_seed) for by_seed in losses.values()],
                            "metric": Metric.BEST_VAL_LOSS,
                            "verdict_code": [verdicts[0]] + [verdicts[1 + i % 5] for i in range(len(losses) - 1)]})
    cells = [(v, s, f"r-{v}-{s}") for v, by_seed in losses.items() for s in by_seed]
    table = pd.DataFrame({"variant": [v for v, _, _ in cells], "seed": [s for _, s, _ in cells],
                          "run_id": [r for _, _, r in cells], "in_stats": True,
                          Metric.BEST_VAL_LOSS: [min(losses[v][s]) for v, s, _ in cells]})
    epochs = pd.DataFrame([{"run_id": r, "variant": v, "seed": s, "epoch": e, "train_loss": x - 0.05, "train_acc": 0.7,
                            "val_loss": x, "val_acc": 0.5} for v, s, r in cells for e, x in enumerate(losses[v][s], 1)],
                          columns=["run_id", "variant", "seed", "epoch", *EPOCH_METRICS])
    return summary, table, epochs


def panels(fig) -> list:
    return [ax for ax in fig.axes if ax.get_visible()]


def line(ax, label: str):
    (found,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return found


@pytest.mark.parametrize("n_variants, grid", [(0, (1, 1)), (3, (1, 3)), (13, (4, 4))])
def test_one_panel_per_variant_with_the_baseline_in_each(n_variants, grid):
    losses = study(n_variants)
    fig = figures.fig_curves(*frames(losses))
    shown = panels(fig)
    assert len(fig.axes) == grid[0] * grid[1]
    assert len(shown) == max(1, n_variants)  # the baseline alone: one panel
    assert [ax.get_title() for ax in shown] == (
        [f"{BASELINE} (n=3)"] if n_variants == 0 else [f"v{k} (n=3): {v}" for k, v in
                                                        zip(range(n_variants), frames(losses)[0]["verdict_code"][1:])])
    base = np.mean([losses[BASELINE][s] for s in SEEDS], axis=0)
    for ax in shown:
        assert ax.get_ylim() == shown[0].get_ylim()
        assert ax.get_xlim() == shown[0].get_xlim()
        assert list(line(ax, BASELINE).get_xdata()) == list(range(1, N_EPOCHS + 1))
        assert line(ax, BASELINE).get_ydata() == pytest.approx(base, rel=1e-12)
    for k, ax in enumerate(shown[:n_variants]):
        assert line(ax, f"v{k}").get_ydata() == pytest.approx(np.mean([losses[f"v{k}"][s] for s in SEEDS], axis=0))
    hidden = [ax for ax in fig.axes if not ax.get_visible()]
    assert len(hidden) == grid[0] * grid[1] - max(1, n_variants)
    assert all(ax.get_lines() == [] for ax in hidden)  # nothing drawn where nobody looks
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ([BASELINE, "variant", "±1 sd over seeds"] if n_variants else [BASELINE, "±1 sd over seeds"])


def test_the_figure_grows_with_its_rows():
    heights = [figures.fig_curves(*frames(study(n))).get_figheight() for n in (3, 7, 13)]
    assert heights[0] < heights[1] < heights[2]


def test_a_blown_up_variant_is_off_scale_and_the_others_stay_resolved():
    losses = study(13, blown_up="v4")
    fig = figures.fig_curves(*frames(losses))
    low, high = panels(fig)[0].get_ylim()
    normal = [x for v, by_seed in losses.items() if v != "v4" for ls in by_seed.values() for x in ls]
    assert low <= min(normal) and max(np.mean([losses[v][s] for s in SEEDS], axis=0).max()
                                      for v in losses if v != "v4") <= high
    assert high - low < 2 * (max(normal) - min(normal))  # the 10x curve does not set the scale
    notes = {ax.get_title().split(" ")[0]: " ".join(t.get_text() for t in ax.texts) for ax in panels(fig)}
    peak = np.mean([losses["v4"][s] for s in SEEDS], axis=0).max()
    assert f"off scale, mean peaks at {peak:.3g}" in notes["v4"] and peak > 20
    assert all("off scale" not in text for v, text in notes.items() if v != "v4")


def test_a_diverged_seed_is_noted_where_the_mean_loses_it():
    losses = study(2)
    losses["v1"][0] = losses["v1"][0][:3]  # its history ends before the non-finite epoch
    fig = figures.fig_curves(*frames(losses))
    v1 = panels(fig)[1]
    assert line(v1, "v1").get_ydata()[3] == pytest.approx(np.mean([losses["v1"][s][3] for s in (1, 2)]))
    assert "from epoch 4: mean of fewer seeds" in v1.texts[0].get_text()


def test_no_per_epoch_metrics_logged():
    summary, table, epochs = frames(study(3))
    fig = figures.fig_curves(summary, table, epochs.iloc[:0])
    assert [t.get_text() for ax in fig.axes for t in ax.texts] == ["no per-epoch metrics logged"]


def test_a_variant_without_finished_seeds_keeps_its_panel():
    summary, table, epochs = frames(study(2))
    table.loc[table["variant"] == "v1", "in_stats"] = False  # still running: not in the statistics
    fig = figures.fig_curves(summary, table, epochs)
    v1 = panels(fig)[1]
    assert v1.get_title().startswith("v1 (n=0)") and [t.get_text() for t in v1.texts] == ["no finished seeds"]
    assert [ln.get_label() for ln in v1.get_lines()] == [BASELINE]

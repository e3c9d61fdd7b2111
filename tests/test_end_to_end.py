"""One real end-to-end run: real paintings, the real CLI, MLflow, the report, as a user would."""
from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image

from conftest import ARTISTS11, chae_here

STUDY = f"""
name: artists-e2e
data:
  source: folder
  root: {ARTISTS11}
protocol: {{epochs: 2, batch_size: 32, lr: 0.001, seeds: [0], augment: {{copies: 1}}}}
model: {{resolution: 16}}  # every painting is still decoded and split; training costs a quarter of 32 px's
variants:
  depth1: {{description: "one transformer layer", set: {{model.transformer.depth: 1}}}}
"""


@pytest.mark.slow
def test_run_and_report_on_real_paintings(workdir):
    if not ARTISTS11.is_dir():
        pytest.skip(f"{ARTISTS11} is absent (a user's clone lacks ../shared); the real-data run is skipped")
    (workdir / "study.yaml").write_text(STUDY)
    result = chae_here("run", "study.yaml", "--no-progress")  # in this process: no interpreter to start
    assert result.exit_code == 0, result.output
    assert "report: reports/artists-e2e/report.md" in result.stdout
    table = result.stdout.split("report:")[0]  # the per-variant summary printed at the end
    assert "verdict" in table and "depth1" in table and "1/1" in table

    report = workdir / "reports" / "artists-e2e"
    cells = pd.read_csv(report / "results.csv")
    assert sorted(cells["variant"]) == ["baseline", "depth1"]
    assert (cells["status"] == "done").all()
    assert cells["best_val_loss"].between(0, 5).all() and cells["test_acc"].between(0, 1).all()
    manifest = next((workdir / "runs" / "splits").glob("*.csv"))
    assert len(pd.read_csv(manifest)) == 3902
    text = (report / "report.md").read_text()
    summary = pd.read_csv(report / "summary.csv").set_index("variant")
    assert summary.loc["depth1", "verdict"] == "undecided" and summary.loc["depth1", "n_pairs"] == 1
    assert "`depth1` n=1" in text and "--adaptive" in text  # one seed: undecided, and says how to decide
    figures = sorted(p.name for p in (report / "figures").glob("*.png"))
    assert figures == ["differences.png", "params_vs_metric.png", "val_loss_curves.png"]
    for name in figures:
        with Image.open(report / "figures" / name) as image:
            assert image.size[0] > 100 and image.getextrema() != ((255, 255),) * 3

    rebuilt = chae_here("report", "artists-e2e", "--out", "again")  # from MLflow alone
    assert rebuilt.exit_code == 0, rebuilt.output
    assert pd.read_csv(workdir / "again" / "results.csv")["best_val_loss"].tolist() == cells["best_val_loss"].tolist()

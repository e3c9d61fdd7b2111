"""A user's own model through the whole tool: plan, run, kill -9 and resume, report, and an edit of
the model's file, which makes new cells."""
from __future__ import annotations

import json
import os
import signal
import time

import mlflow
import pytest

import chae_ablate
from conftest import assert_undisturbed_metrics, chae, chae_here, undisturbed_metrics

TINY_CNN = '''
from torch import nn


def build(num_classes, resolution, width=16, blocks=2):
    layers, channels = [], 3
    for _ in range(blocks):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
'''

STUDY = """
name: own
data: {source: synthetic, synthetic_classes: 3, synthetic_per_class: 100}
protocol: {epochs: 6, batch_size: 16, lr: 0.003, seeds: [0, 1], augment: {copies: 1}}
model:
  builder: tiny_cnn:build
  resolution: 32
  kwargs: {width: 16}
variants:
  wide: {set: {model.kwargs.width: 32}}
"""


@pytest.mark.slow
def test_a_user_builder_runs_resumes_after_kill_and_reports(tmp_path, monkeypatch):
    (tmp_path / "tiny_cnn.py").write_text(TINY_CNN)
    study = tmp_path / "own.yaml"
    study.write_text(STUDY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    planned = chae_here("plan", "own.yaml", "--json")
    assert planned.exit_code == 0, planned.output
    rows = {r["variant"]: r for r in json.loads(planned.stdout)["variants"]}
    # by hand: two 3x3 convs with BatchNorm, and the linear head
    params = {w: (3 * 9 * w + w) + 2 * w + (w * 9 * w + w) + 2 * w + (w * 3 + 3) for w in (16, 32)}
    assert (rows["baseline"]["params"], rows["wide"]["params"]) == (params[16], params[32])
    assert rows["wide"]["mflops"] > rows["baseline"]["mflops"] > 0 and rows["baseline"]["tokens"] is None

    victim = chae("run", "own.yaml", "--device", "cpu", "--threads", "1", cwd=tmp_path, start_new_session=True)
    checkpoints = tmp_path / "runs" / "checkpoints" / "own"
    deadline = time.time() + 180
    while time.time() < deadline and not any(checkpoints.glob("*/last.pt")):
        time.sleep(0.1)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    interrupted = {p.parent.name for p in checkpoints.glob("*/last.pt")}
    assert interrupted, "the run was killed before its first checkpoint"

    rerun = chae_here("run", "own.yaml", "--device", "cpu", "--threads", "1")
    assert rerun.exit_code == 0, rerun.output
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("own").experiment_id], "tags.`chae.role` = 'cell'")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)  # each cell trained once
    resumed = {r.data.tags["cell_hash"]: int(r.data.tags["resumed_from_epoch"]) for r in runs
               if "resumed_from_epoch" in r.data.tags}
    assert len(resumed) == 1 and set(resumed) <= interrupted and min(resumed.values()) >= 1  # the killed cell
    assert {r.data.params["model.kwargs.width"] for r in runs} == {"16", "32"}
    assert_undisturbed_metrics(runs, undisturbed_metrics(study, tmp_path / "reference"))

    report = (tmp_path / "reports" / "own" / "report.md").read_text()
    assert "none of this study's changes beats its baseline" in report and "The paper claims" not in report
    results = chae_ablate.load(study, folder=tmp_path)
    verdicts = results.verdicts().set_index("variant")
    assert verdicts.loc["wide", "verdict"] in {"better", "worse", "equivalent", "undecided"}
    assert (results.results()["state"] == "done").all()

    (tmp_path / "tiny_cnn.py").write_text(TINY_CNN.replace("nn.ReLU()", "nn.GELU()"))  # the model changed
    edited = chae_ablate.load(study, folder=tmp_path).results()
    assert (edited["state"] == "missing").all() and set(edited["cell_hash"]).isdisjoint(
        {r.data.tags["cell_hash"] for r in runs})

"""Shared fixtures: paths, a tiny synthetic study, an isolated working directory."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "studies"
ARTISTS11 = REPO.parent / "shared" / "data" / "artists11"


def slow_study(name: str) -> str:
    """A synthetic study whose cells last long enough (a few seconds) to be killed mid-way."""
    return f"""
name: {name}
data: {{source: synthetic, synthetic_classes: 3, synthetic_per_class: 100}}
protocol: {{epochs: 6, batch_size: 16, lr: 0.003, seeds: [0], augment: {{copies: 1}}}}
model:
  resolution: 32
  conv: {{stages: [{{channels: 16}}, {{channels: 16}}, {{channels: 32}}]}}
  transformer: {{depth: 1, heads: 2, dim: 32, mlp_hidden: [64]}}
variants:
  depth2: {{set: {{model.transformer.depth: 2}}}}
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty folder with its own MLflow store, as a user would."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    os.environ.setdefault("TQDM_DISABLE", "1")
    return tmp_path

"""Shared fixtures: paths, a tiny synthetic study, an isolated working directory."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "studies"
ARTISTS11 = REPO.parent / "shared" / "data" / "artists11"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty folder with its own MLflow store, as a user would."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    os.environ.setdefault("TQDM_DISABLE", "1")
    return tmp_path

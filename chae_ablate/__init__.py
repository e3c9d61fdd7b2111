"""chae-ablate: architecture ablation studies with honest verdicts.

From Python (see chae_ablate.api): `chae_ablate.load("studies/quickstart.yaml")` gives a study's
plan, results, curves, verdicts and figures. The API is imported on first use, so the command line
starts without loading torch, pandas or MLflow.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["LedgerStatus", "StudyResults", "ledger_status", "load"]

if TYPE_CHECKING:
    from .api import LedgerStatus, StudyResults, ledger_status, load


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'chae_ablate' has no attribute {name!r}")

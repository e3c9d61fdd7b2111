"""The study plan: every cell's shape and cost, computed without training."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .config import DataConfig
from .data import class_names
from .model import build_model, count_parameters, forward_flops
from .study import Study, changed_paths

PAPER_CLASSES = 11


def expected_classes(data: DataConfig) -> tuple[int, str]:
    """Number of classes the data will have, and where that number comes from."""
    if data.source == "digits":
        return 10, "digits"
    if data.source == "synthetic":
        return data.synthetic_classes, "synthetic"
    root = Path(data.root or "")
    if root.is_dir():
        return len(class_names(root)), str(root)
    return PAPER_CLASSES, f"{root} not found; the paper's {PAPER_CLASSES} classes assumed"


def plan_table(study: Study) -> tuple[pd.DataFrame, str]:
    """One row per variant (params, MFLOPs, tokens) and a footer line with the cell count."""
    num_classes, origin = expected_classes(study.baseline.config.data)
    rows = []
    for v in study.variants:
        m = v.config.model
        rows.append({
            "variant": v.name,
            "changes": changed_paths(v),
            "resolution": m.resolution,
            "tokens": m.tokens,
            "params": count_parameters(build_model(m, num_classes)),
            "MFLOPs/img": forward_flops(m, num_classes) / 1e6,
            "seeds": len(v.config.protocol.seeds),
        })
    table = pd.DataFrame(rows)
    cells = int(table["seeds"].sum())
    footer = (f"{len(rows)} variants x seeds = {cells} cells, "
              f"{study.baseline.config.protocol.epochs} epochs each; classes: {num_classes} ({origin})")
    return table, footer


def format_plan(table: pd.DataFrame) -> str:
    return table.to_string(index=False, formatters={
        "params": "{:,}".format, "MFLOPs/img": "{:,.1f}".format})
